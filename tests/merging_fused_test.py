"""Fused merge kernels == the pre-fusion kernels bit for bit; sampled TIES threshold == a numpy sort.

The reference kernels below are the implementation the fused ones replaced
(τ materialised first, TIES over a stacked ``[K, ...]`` array), copied here
unchanged; thresholds come from sorting every magnitude in numpy.
"""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mtl.merging as mm
from mtl.merging import dare_mask, topk
from mtl.merging.sources import MergeInputs

K = 4


# ---------------------------------------------------------------- the reference (pre-fusion kernels, copied)

def ct_of(dtype):
    return jnp.promote_types(dtype, jnp.float32)


@jax.jit
def ref_average(theta0, taus):
    ct = ct_of(theta0.dtype)
    total = functools.reduce(jnp.add, [t.astype(ct) for t in taus])
    return (theta0.astype(ct) + total / len(taus)).astype(theta0.dtype)


@jax.jit
def ref_combine(theta0, taus, coeffs):
    ct = ct_of(theta0.dtype)
    acc = theta0.astype(ct)
    for t, c in zip(taus, coeffs):
        acc = acc + jnp.asarray(c, ct) * t.astype(ct)
    return acc.astype(theta0.dtype)


@functools.partial(jax.jit, static_argnames="mode")
def ref_ties(theta0, taus, thresholds, lam, mode):
    ct = ct_of(theta0.dtype)
    mag = lambda t: jnp.abs(t).astype(jnp.float32)  # noqa: E731
    kept = jnp.stack([jnp.where(mag(t) >= thresholds[k], t.astype(ct), 0) for k, t in enumerate(taus)])
    elected = jnp.sign(jnp.sum(kept, axis=0))
    agree = (jnp.sign(kept) == elected) & (elected != 0)
    picked = jnp.where(agree, kept, 0)
    if mode == "sum":
        merged = jnp.sum(picked, axis=0)
    elif mode == "mean":
        merged = jnp.sum(picked, axis=0) / jnp.maximum(jnp.sum(agree, axis=0), 1).astype(ct)
    else:
        merged = elected * jnp.max(jnp.abs(picked), axis=0)
    return (theta0.astype(ct) + lam * merged).astype(theta0.dtype)


def ref_dare(tau, key, keep_prob, scale):
    """DARE's drop with the mask re-derived in numpy from the per-tensor key (see mtl.merging.dare_mask)."""
    w = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
    keep = dare_mask.keep_mask_np(tau.shape, w, dare_mask.threshold(keep_prob))
    return jnp.where(jnp.asarray(keep), tau * scale, 0).astype(tau.dtype)


def np_thresholds(flat_tvs, k):
    """Per task: the round(k N / 100)-th largest float32 magnitude (inf if none kept), by sorting."""
    out = []
    for tv in flat_tvs:
        mags = np.sort(np.concatenate([np.abs(np.asarray(v, np.float32)).ravel() for v in tv.values()
                                       if v is not None]))[::-1]
        n = int(round(k * mags.size / 100))
        out.append(np.float32(np.inf) if n == 0 else mags[n - 1])
    return np.array(out, np.float32)


def ref_merge(name, pre, tvs, hp):
    """The reference merge on flat trees: excluded (None) paths copy θ0."""
    fpre, ftv = mm.flatten(pre), [mm.flatten(t) for t in tvs]
    if name == "dare":
        key = jax.random.key(hp.get("seed", 0))
        keep, scale = 1.0 - hp["p"], 1.0 / (1.0 - hp["p"])
        ftv = [{p: None if v is None else ref_dare(v, jax.random.fold_in(jax.random.fold_in(key, i),
                                                                          zlib.crc32(p.encode())), keep, scale)
                for p, v in f.items()} for i, f in enumerate(ftv)]
        name, hp = hp.get("then", "task_arithmetic"), {k: v for k, v in hp.items() if k not in ("p", "seed", "then")}
    if name == "ties":
        thr = jnp.asarray(np_thresholds(ftv, hp.get("k", 20.0)))
    out = {}
    for p, x0 in fpre.items():
        taus = [f[p] for f in ftv]
        if taus[0] is None:
            out[p] = x0
        elif name == "average":
            out[p] = ref_average(x0, taus)
        elif name == "task_arithmetic":
            out[p] = ref_combine(x0, taus, [hp.get("lam", 0.3)] * len(taus))
        elif name == "ties":
            out[p] = ref_ties(x0, taus, thr, hp.get("lam", 1.0), hp.get("mode", "mean"))
    return out


# ---------------------------------------------------------------- data

def make_models(seed, dtype, ties_heavy=False, shapes=None):
    """θ0 and K fine-tunes; ``ties_heavy``: τ on a coarse grid, so magnitudes tie and signed sums hit 0."""
    rng = np.random.default_rng(seed)
    shapes = shapes or {"enc/layers/0/kernel": (24, 16), "enc/layers/0/bias": (16,), "out/kernel": (16, 5),
                        "scale": ()}
    pre = {p: rng.normal(size=s).astype(np.float32) for p, s in shapes.items()}
    fts = []
    for _ in range(K):
        if ties_heavy:
            d = {p: (rng.integers(-2, 3, size=s) * 0.125).astype(np.float32) for p, s in shapes.items()}
        else:
            d = {p: (rng.normal(size=s) * 0.1).astype(np.float32) for p, s in shapes.items()}
        fts.append({p: (pre[p] + d[p]).astype(np.float32) for p in pre})
    cast = lambda t: {p: jnp.asarray(v).astype(dtype) for p, v in t.items()}  # noqa: E731
    return cast(pre), [cast(f) for f in fts]


CASES = [
    ("average", {}),
    ("task_arithmetic", {"lam": 0.4}),
    ("ties", {"k": 20.0, "mode": "mean"}),
    ("ties", {"k": 35.0, "mode": "sum", "lam": 0.3}),
    ("ties", {"k": 50.0, "mode": "max", "lam": 0.7}),
    ("ties", {"k": 100.0, "mode": "mean"}),
    ("ties", {"k": 0.0, "mode": "mean"}),
    ("dare", {"p": 0.3, "seed": 5}),
    ("dare", {"p": 0.5, "seed": 1, "then": "ties", "k": 100.0, "mode": "mean"}),
    ("dare", {"p": 0.6, "seed": 2, "then": "ties", "k": 30.0, "mode": "sum", "lam": 0.5}),
]
FAST = [CASES[i] for i in (1, 2, 7)]  # the default run: TA, TIES, DARE (all cases: -m slow)


def assert_bits_equal(got, want, msg):
    g, w = np.atleast_1d(np.asarray(got)), np.atleast_1d(np.asarray(want))
    assert g.dtype == w.dtype and g.shape == w.shape, msg
    np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8), err_msg=msg)


@pytest.mark.parametrize("dtype,ties_heavy,cases", [
    (jnp.float32, True, FAST),
    pytest.param(jnp.bfloat16, True, FAST, marks=pytest.mark.slow),
    pytest.param(jnp.float32, False, CASES, marks=pytest.mark.slow),
    pytest.param(jnp.bfloat16, False, CASES, marks=pytest.mark.slow),
    pytest.param(jnp.float32, True, CASES, marks=pytest.mark.slow),
    pytest.param(jnp.bfloat16, True, CASES, marks=pytest.mark.slow)])
def test_fused_equals_reference_bit_for_bit(dtype, ties_heavy, cases):
    pre, fts = make_models(0, dtype, ties_heavy)
    exclude = ["scale"]
    tvs = mm.task_vectors(fts, pre, exclude=exclude)
    for name, hp in cases:
        want = ref_merge(name, pre, tvs, hp)
        got = mm.flatten(mm.MERGERS[name](pre, tvs, **hp))
        streamed = mm.merge_stream(name, pre, fts, exclude=exclude, **hp)
        for p in want:
            assert_bits_equal(got[p], want[p], f"{name} {hp} {p} {dtype.__name__}")
            assert_bits_equal(streamed[p], want[p], f"streamed {name} {hp} {p} {dtype.__name__}")


def test_combine_layerwise_equals_reference():
    pre, fts = make_models(1, jnp.float32)
    tvs = mm.task_vectors(fts, pre)
    coeffs = {p: jnp.linspace(-0.5, 1.0, K) * (i + 1) for i, p in enumerate(pre)}
    got = mm.flatten(mm.combine(pre, tvs, coeffs))
    streamed = mm.merge_stream("combine", pre, fts, coeffs=coeffs)
    for p in pre:
        want = ref_combine(pre[p], [t[p] for t in tvs], [coeffs[p][k] for k in range(K)])
        assert_bits_equal(got[p], want, p)
        assert_bits_equal(streamed[p], want, p)


@pytest.mark.parametrize("dtype,cases", [pytest.param(jnp.bfloat16, FAST[1:], marks=pytest.mark.slow),
                                         pytest.param(jnp.float32, CASES, marks=pytest.mark.slow),
                                         pytest.param(jnp.bfloat16, CASES, marks=pytest.mark.slow)])
def test_sharded_equals_unsharded(dtype, cases):
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    pre, fts = make_models(2, dtype, ties_heavy=True)

    def shard(t):
        return {p: jax.device_put(v, NamedSharding(mesh, P("fsdp", *[None] * (v.ndim - 1)) if v.ndim and
                                                   v.shape[0] % 8 == 0 else P())) for p, v in t.items()}

    spre, sfts = shard(pre), [shard(f) for f in fts]
    assert len(spre["enc/layers/0/kernel"].sharding.device_set) == 8
    tvs, stvs = mm.task_vectors(fts, pre), mm.task_vectors(sfts, spre)
    for name, hp in cases:
        want = mm.flatten(mm.MERGERS[name](pre, tvs, **hp))
        got = mm.flatten(mm.MERGERS[name](spre, stvs, **hp))
        streamed = mm.merge_stream(name, spre, sfts, **hp)
        for p in want:
            assert_bits_equal(got[p], want[p], f"sharded {name} {hp} {p}")
            assert_bits_equal(streamed[p], want[p], f"sharded streamed {name} {hp} {p}")


# ---------------------------------------------------------------- the TIES threshold

def big_task_vectors(seed, n_rows, ties_heavy, num_tasks=K):
    rng = np.random.default_rng(seed)
    tvs = []
    for k in range(num_tasks):
        if ties_heavy:  # few distinct magnitudes: the threshold sits inside a huge tie
            a = (rng.integers(-3, 4, size=(n_rows, 256)) * 0.5).astype(np.float32)
        else:  # heavy tails and exact zeros, a different scale per task
            a = (rng.standard_t(3, size=(n_rows, 256)) * 10.0 ** -k).astype(np.float32)
            a[rng.random(a.shape) < 0.1] = 0
        tvs.append({"a": jnp.asarray(a), "b": jnp.asarray(a[:7, :33] * 2), "skip": None})
    return tvs


@pytest.mark.parametrize("ties_heavy", [False, True])
def test_sampled_threshold_equals_sort(ties_heavy):
    tvs = big_task_vectors(3, 1400, ties_heavy)  # ~358k entries per task: the sample is strided
    assert 1400 * 256 > topk._SAMPLES
    for k in [0.0, 0.001, 3.0, 20.0, 50.0, 99.9, 100.0]:
        got = np.asarray(mm.ties_thresholds(tvs, k))
        np.testing.assert_array_equal(got, np_thresholds([mm.flatten(t) for t in tvs], k), err_msg=f"k={k}")


def test_sampled_threshold_of_many_tasks_on_host_and_device_paths(monkeypatch):
    """11 tasks (two code groups, the second partial): the host gather (plain task vectors) and the
    device one (``relative``: τ formed inside the kernels, here from θ0 = 0) both equal the sort,
    without falling back to the radix select."""
    monkeypatch.setattr(topk, "radix_thresholds", lambda *a: pytest.fail("fell back to the radix select"))
    tvs = big_task_vectors(8, 2200, False, num_tasks=11)  # strided sample
    flat = [mm.flatten(t) for t in tvs]
    paths = ("a", "b")
    for k in [0.5, 20.0, 90.0]:
        want = np_thresholds(flat, k)
        np.testing.assert_array_equal(np.asarray(mm.ties_thresholds(tvs, k)), want, err_msg=f"k={k}")
        inp = MergeInputs(paths=paths, num_tasks=11, theta0=lambda p: jnp.zeros_like(flat[0][p]),
                          operands=lambda p: [f[p] for f in flat], relative=True)
        np.testing.assert_array_equal(np.asarray(topk.ties_thresholds_of(inp, k)), want, err_msg=f"relative k={k}")


def test_threshold_fallback_when_the_bracket_misses(monkeypatch):
    """A bracket that cannot hold the answer (forced) and an over-full one both fall back to the radix select."""
    tvs = big_task_vectors(4, 300, False)
    want = np_thresholds([mm.flatten(t) for t in tvs], 20.0)
    calls = []
    real = topk.radix_thresholds
    monkeypatch.setattr(topk, "radix_thresholds", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(topk, "_bracket", lambda s, n, t: (s[0], s[0]))  # only the sample's largest value
    np.testing.assert_array_equal(np.asarray(mm.ties_thresholds(tvs, 20.0)), want)
    assert calls == [1]
    monkeypatch.undo()
    monkeypatch.setattr(topk, "radix_thresholds", lambda *a: calls.append(2) or real(*a))
    monkeypatch.setattr(topk, "_MAX_INSIDE", 10)
    np.testing.assert_array_equal(np.asarray(mm.ties_thresholds(tvs, 20.0)), want)
    assert calls == [1, 2]


def test_threshold_under_jit_equals_eager():
    tvs = big_task_vectors(5, 64, True)
    got = jax.jit(lambda t: mm.ties_thresholds(t, 30.0))(tvs)
    np.testing.assert_array_equal(np.asarray(got), np_thresholds([mm.flatten(t) for t in tvs], 30.0))


# ---------------------------------------------------------------- the checks, from the kernels' flags

@pytest.mark.parametrize("name,hp", [("ties", {"k": 20.0}), ("dare", {"p": 0.9, "seed": 0}),
                                     ("task_arithmetic", {})])
def test_non_finite_inputs_raise_even_where_the_merge_drops_them(name, hp):
    pre, fts = make_models(6, jnp.float32)
    bad = dict(fts[2])
    bad["out/kernel"] = bad["out/kernel"].at[3, 1].set(jnp.nan)  # NaN: TIES' trim and DARE's drop discard it
    names = ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match=r"'out/kernel' of 'c' has non-finite"):
        mm.merge_stream(name, pre, fts[:2] + [bad] + fts[3:], names=names, **hp)
    tvs = mm.task_vectors(fts, pre)
    btv = dict(tvs[1])
    btv["enc/layers/0/bias"] = btv["enc/layers/0/bias"].at[0].set(-jnp.inf)
    with pytest.raises(ValueError, match=r"'enc/layers/0/bias' of 'task vector 2' has non-finite"):
        mm.MERGERS[name](pre, [tvs[0], btv] + tvs[2:], **hp)
    bpre = dict(pre, scale=jnp.float32(jnp.inf))
    with pytest.raises(ValueError, match=r"'scale' of 'pretrained' has non-finite"):
        mm.merge_stream(name, bpre, fts, **hp)
    assert not np.isfinite(mm.merge_stream(name, bpre, fts, check_finite=False, **hp)["scale"])


def test_overflow_of_finite_inputs_is_not_an_input_error():
    big = {"w": jnp.full((4,), 3e38, jnp.float32)}
    out = mm.task_arithmetic({"w": jnp.zeros(4)}, [big, big], lam=1.0)  # 6e38 overflows to inf
    assert np.all(np.isinf(np.asarray(out["w"])))


def test_identical_warning_is_exact_beyond_the_sample():
    pre, fts = make_models(7, jnp.float32)
    sparse = {p: v for p, v in pre.items()}
    sparse["enc/layers/0/kernel"] = pre["enc/layers/0/kernel"].at[5, 7].add(1.0)  # off the strided sample
    sl = tuple(slice(None, None, max(1, n // 8)) for n in (24, 16))
    assert not np.asarray(jnp.zeros((24, 16)).at[5, 7].set(1.0)[sl]).any()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mm.merge_stream("average", pre, fts[:1] + [sparse], names=["a", "b"])
    with pytest.warns(UserWarning, match="'b' is identical to 'pretrained'"):
        mm.merge_stream("ties", pre, [fts[0], dict(pre)], names=["a", "b"], k=50.0)
    tvs = mm.task_vectors(fts[:2], pre)
    zero = {p: jnp.zeros_like(v) for p, v in tvs[0].items()}
    with pytest.warns(UserWarning, match="'task vector 2' is all zeros"):
        mm.average(pre, [tvs[0], zero])
