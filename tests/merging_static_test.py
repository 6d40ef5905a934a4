"""Averaging, task arithmetic, combine, TIES and DARE against numpy re-derivations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl.merging as mm

K = 3


def make_tree(rng, scale=1.0):
    return {"enc": {"layers": {0: {"kernel": (rng.normal(size=(4, 6)) * scale).astype(np.float32),
                                   "bias": (rng.normal(size=(6,)) * scale).astype(np.float32)}}},
            "out": {"kernel": (rng.normal(size=(6, 3)) * scale).astype(np.float32)}}


def setup(seed=0, exclude=None):
    rng = np.random.default_rng(seed)
    pre = make_tree(rng)
    fts = [jax.tree.map(lambda a: a + (rng.normal(size=a.shape) * 0.1).astype(np.float32), pre) for _ in range(K)]
    return pre, fts, mm.task_vectors(fts, pre, exclude=exclude)


def np_flat(tree):
    return {p: (None if v is None else np.asarray(v)) for p, v in mm.flatten(tree).items()}


def test_average_and_task_arithmetic():
    pre, fts, tvs = setup()
    avg, ta = np_flat(mm.average(pre, tvs)), np_flat(mm.task_arithmetic(pre, tvs, lam=0.4))
    fpre, ffts = np_flat(pre), [np_flat(f) for f in fts]
    for p in fpre:
        np.testing.assert_allclose(avg[p], np.mean([f[p] for f in ffts], axis=0), rtol=1e-6, atol=1e-6)
        taus = [f[p].astype(np.float64) - fpre[p] for f in ffts]
        np.testing.assert_allclose(ta[p], fpre[p] + 0.4 * np.sum(taus, axis=0), rtol=1e-6, atol=1e-6)
    ta_default = np_flat(mm.task_arithmetic(pre, tvs))  # lam = 0.3
    p = "out/kernel"
    np.testing.assert_allclose(ta_default[p], fpre[p] + 0.3 * sum(f[p] - fpre[p] for f in ffts), atol=1e-6)
    mods = np_flat(mm.average_models(fts, weights=[1, 1, 2]))
    np.testing.assert_allclose(mods[p], (ffts[0][p] + ffts[1][p] + 2 * ffts[2][p]) / 4, atol=1e-6)


def test_combine_taskwise_layerwise_and_grad():
    pre, fts, tvs = setup(1, exclude="*bias")
    fpre, ftv = np_flat(pre), [np_flat(t) for t in tvs]
    c = np.array([0.2, -0.5, 1.5], np.float32)
    out = np_flat(mm.combine(pre, tvs, c))
    lw = mm.layerwise_coeffs(tvs[0], K, init=0.0)
    lw["enc"]["layers"][0]["kernel"] = jnp.array([1.0, 2.0, 3.0])
    lw["out"]["kernel"] = jnp.array([0.5, 0.0, -1.0])
    out_lw = np_flat(mm.combine(pre, tvs, lw))
    trees = [jax.tree.map(lambda v, k=k: None if v is None else v[k], lw, is_leaf=lambda x: x is None)
             for k in range(K)]
    out_list = np_flat(mm.combine(pre, tvs, trees))
    lwn = np_flat(lw)
    for p in fpre:
        if p.endswith("bias"):
            for o in (out, out_lw, out_list):
                np.testing.assert_array_equal(o[p], fpre[p])
            continue
        np.testing.assert_allclose(out[p], fpre[p] + sum(c[k] * ftv[k][p] for k in range(K)), atol=1e-6)
        ref = fpre[p] + sum(lwn[p][k] * ftv[k][p] for k in range(K))
        np.testing.assert_allclose(out_lw[p], ref, atol=1e-6)
        np.testing.assert_allclose(out_list[p], ref, atol=1e-6)
    # combine is differentiable in the coefficients: d/dc_k sum(merged) = sum(τ_k)
    g = jax.grad(lambda c: sum(jnp.sum(x) for x in jax.tree.leaves(mm.combine(pre, tvs, c))))(jnp.asarray(c))
    np.testing.assert_allclose(g, [sum(float(np.sum(v)) for v in t.values() if v is not None) for t in ftv],
                               rtol=1e-5)
    # task arithmetic is combine with equal coefficients
    ta = np_flat(mm.task_arithmetic(pre, tvs, lam=0.7))
    same = np_flat(mm.combine(pre, tvs, jnp.full((K,), 0.7)))
    for p in ta:
        np.testing.assert_array_equal(ta[p], same[p])
    with pytest.raises(ValueError, match="shape"):
        mm.combine(pre, tvs, np.ones(4))


# ---------------------------------------------------------------- TIES

def np_ties(pre, tvs, k, lam, mode):
    """TIES re-derived in numpy: global sort for the threshold, explicit loops for the merge."""
    fpre, ftv = np_flat(pre), [np_flat(t) for t in tvs]
    paths = [p for p, v in ftv[0].items() if v is not None]
    thr = []
    for f in ftv:
        mags = np.sort(np.concatenate([np.abs(f[p]).ravel() for p in paths]))[::-1]
        n = int(round(k * mags.size / 100))
        thr.append(mags[n - 1] if n > 0 else np.inf)
    out = dict(fpre)
    for p in paths:
        trimmed = np.stack([np.where(np.abs(f[p]) >= t, f[p], 0) for f, t in zip(ftv, thr)])
        merged = np.zeros_like(fpre[p])
        for idx in np.ndindex(fpre[p].shape):
            vals = trimmed[(slice(None),) + idx]
            s = np.sign(vals.sum())
            agree = [v for v in vals if s != 0 and np.sign(v) == s]
            if not agree:
                continue
            merged[idx] = {"mean": np.mean(agree), "sum": np.sum(agree),
                           "max": s * max(abs(v) for v in agree)}[mode]
        out[p] = fpre[p] + lam * merged
    return out, np.array(thr, np.float32)


@pytest.mark.parametrize("mode", ["mean", "sum", "max"])
def test_ties_matches_numpy(mode):
    pre, fts, tvs = setup(2, exclude="out/*")
    ref, thr = np_ties(pre, tvs, k=30, lam=0.8, mode=mode)
    np.testing.assert_array_equal(np.asarray(mm.ties_thresholds(tvs, 30)), thr)
    out = np_flat(mm.ties(pre, tvs, k=30, lam=0.8, mode=mode))
    for p in ref:
        np.testing.assert_allclose(out[p], ref[p], rtol=1e-6, atol=1e-6, err_msg=p)
    np.testing.assert_array_equal(out["out/kernel"], np_flat(pre)["out/kernel"])


def test_ties_hand_worked_trim_and_zero_sum_tie():
    pre = {"w": np.zeros(5, np.float32)}
    t1 = {"w": np.array([3, -1, 0.5, 2, -0.1], np.float32)}
    t2 = {"w": np.array([-1, 4, 0, -2, 0.2], np.float32)}
    # k=40: each keeps its 2 largest magnitudes: [3,0,0,2,0] and [0,4,0,-2,0]; entry 3 sums to 0 -> no sign
    np.testing.assert_array_equal(mm.ties(pre, [t1, t2], k=40, lam=1.0)["w"], [3, 4, 0, 0, 0])
    # k=100: signs [+, +, +, 0, +]; entry 0: only 3 agrees; entry 3 ties at zero again
    np.testing.assert_allclose(mm.ties(pre, [t1, t2], k=100, mode="mean")["w"], [3, 4, 0.5, 0, 0.2])
    a, b, c = ({"w": np.array([v], np.float32)} for v in (2, 4, -1))
    z = {"w": np.zeros(1, np.float32)}
    for mode, want in [("mean", 3), ("sum", 6), ("max", 4)]:
        np.testing.assert_allclose(mm.ties(z, [a, b, c], k=100, mode=mode, lam=0.5)["w"], [want / 2])


def test_ties_keeps_all_entries_tied_at_threshold():
    pre = {"w": np.zeros(4, np.float32)}
    tv = {"w": np.array([1, -1, 1, 0.5], np.float32)}  # k=50 -> n=2, threshold 1, three entries tie
    np.testing.assert_array_equal(np.asarray(mm.ties_thresholds([tv], 50)), [1.0])
    np.testing.assert_array_equal(mm.ties(pre, [tv], k=50)["w"], [1, -1, 1, 0])
    np.testing.assert_array_equal(mm.ties(pre, [tv], k=0)["w"], [0, 0, 0, 0])


def test_ties_jit_equals_eager():
    pre, _, tvs = setup(3)
    eager = mm.ties(pre, tvs, k=20, mode="max")
    jitted = jax.jit(lambda p, t: mm.ties(p, t, k=20, mode="max"))(pre, tvs)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(a, b)


def test_ties_bad_args():
    pre, _, tvs = setup(4)
    with pytest.raises(ValueError, match="mode"):
        mm.ties(pre, tvs, mode="median")
    with pytest.raises(ValueError, match="percentage"):
        mm.ties(pre, tvs, k=120)


# ---------------------------------------------------------------- DARE

def test_dare_drop_rate_rescale_and_determinism():
    rng = np.random.default_rng(5)
    tv = {"big": rng.normal(size=(400, 500)).astype(np.float32), "small": rng.normal(size=(7,)).astype(np.float32),
          "skip": None}
    p = 0.3
    key = jax.random.key(42)
    d1, d2 = mm.dare([tv, tv], p=p, key=key)
    out = np.asarray(d1["big"])
    kept = out != 0
    assert abs((1 - kept.mean()) - p) < 0.005
    np.testing.assert_array_equal(out[kept], (tv["big"] * np.float32(1 / (1 - p)))[kept])
    assert d1["skip"] is None
    again = mm.dare([tv, tv], p=p, key=key)
    np.testing.assert_array_equal(again[0]["big"], d1["big"])
    np.testing.assert_array_equal(again[1]["small"], d2["small"])
    assert not np.array_equal(np.asarray(d1["big"]) != 0, np.asarray(d2["big"]) != 0)  # per-task keys differ
    other = mm.dare([tv], p=p, key=jax.random.key(43))[0]
    assert not np.array_equal(other["big"], d1["big"])
    np.testing.assert_array_equal(mm.dare([tv], p=0.0, key=key)[0]["big"], tv["big"])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        mm.dare([tv], p=1.0)


def test_dare_mask_matches_numpy_and_behaves_like_independent_coins():
    """The hash mask (mtl.merging.dare_mask) equals its numpy re-derivation bit for bit, and its statistics are
    those of independent Bernoulli(keep) draws: the kept fraction, neighbour and lag correlations, the
    agreement between two tasks' masks, and runs of equal bits, each within 5 binomial standard deviations."""
    from mtl.merging import dare_mask

    shape, keep = (512, 1000), 0.3
    n = shape[0] * shape[1]
    spec_words = [np.asarray(dare_mask.words(jax.random.fold_in(jax.random.key(9), t))) for t in range(2)]
    thresh = dare_mask.threshold(keep)
    masks = []
    for w in spec_words:
        got = np.asarray(jax.jit(dare_mask.keep_mask, static_argnums=0)(shape, w, np.uint32(thresh)))
        np.testing.assert_array_equal(got, dare_mask.keep_mask_np(shape, w, thresh))
        masks.append(got.ravel())
    a, b = (m.astype(np.float64) for m in masks)
    sd = lambda q, m: 5 * np.sqrt(q * (1 - q) / m)  # noqa: E731
    assert abs(a.mean() - keep) < sd(keep, n)
    for lag in (1, 2, 1000, 4096):  # neighbours along a row, down a column, and a power of two
        both = (a[:-lag] * a[lag:]).mean()
        assert abs(both - keep**2) < sd(keep**2, n - lag), lag
    assert abs((a * b).mean() - keep**2) < sd(keep**2, n)  # two tasks' masks are independent
    switches = np.count_nonzero(masks[0][1:] != masks[0][:-1]) / (n - 1)  # a run-length statistic
    assert abs(switches - 2 * keep * (1 - keep)) < sd(2 * keep * (1 - keep), n)
    assert dare_mask.threshold(1.0) == 2**32 - 1 and dare_mask.keep_mask_np((5,), spec_words[0], 2**32 - 1).all()
    with pytest.raises(ValueError, match="keep probability"):
        dare_mask.threshold(0.0)


@pytest.mark.parametrize("then,hp", [("task_arithmetic", {"lam": 0.5}), ("ties", {"k": 50, "mode": "sum"})])
def test_dare_merge_composes(then, hp):
    pre, _, tvs = setup(6)
    got = mm.dare_merge(pre, tvs, p=0.4, seed=7, then=then, **hp)
    want = mm.MERGERS[then](pre, mm.dare(tvs, p=0.4, key=jax.random.key(7)), **hp)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_bf16_params_keep_dtype():
    pre, fts, _ = setup(7)
    pre16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), pre)
    tvs16 = mm.task_vectors([jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), f) for f in fts], pre16)
    for name in ("task_arithmetic", "ties"):
        out = mm.MERGERS[name](pre16, tvs16)
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out)), name


def test_method_modules_do_not_import_the_registry():
    """The registry imports the methods; no method module imports the registry (no import circle)."""
    import ast
    import pathlib

    root = pathlib.Path(mm.__file__).parent
    for name in ("static", "fisher", "regmean", "topk", "sources", "tree", "adaptive", "dare_mask", "twin"):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "mtl.merging.registry" not in imported, name
        # `from mtl.merging import X` is allowed only for submodules other than the registry
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module == "mtl.merging":
                for a in n.names:
                    assert a.name != "registry" and (root / f"{a.name}.py").exists(), (name, a.name)
