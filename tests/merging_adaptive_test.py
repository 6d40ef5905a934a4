"""AdaMerging / AdaMerging++ / aTLAS against numpy re-derivations; sharded == unsharded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl.merging as mm
from mtl.merging import adaptive as ad

TASKS = ["t0", "t1", "t2"]
K = len(TASKS)
D_IN, D_H, C = 16, 16, 4


def toy(seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    pre = {"enc": {"w": f(D_IN, D_H) * 0.5, "b": f(D_H) * 0.1},
           "heads": {t: {"w": f(D_H, C), "b": f(C) * 0.1} for t in TASKS}}
    fts = []
    for _ in range(K):
        ft = {"enc": {k: v + f(*v.shape) * scale for k, v in pre["enc"].items()}, "heads": pre["heads"]}
        fts.append(ft)
    tvs = mm.task_vectors(fts, pre, exclude=["heads/*"])
    xs = {t: f(8, D_IN) for t in TASKS}
    return pre, fts, tvs, xs


def apply_fn(params, x):
    h = jax.nn.relu(x @ params["enc"]["w"] + params["enc"]["b"])
    return {t: h @ params["heads"][t]["w"] + params["heads"][t]["b"] for t in TASKS}


def np_entropy_objective(flat, xs):
    h = np.maximum(xs_cat(xs) @ flat["enc/w"] + flat["enc/b"], 0)
    ents = []
    for i, t in enumerate(TASKS):
        z = h[i * 8:(i + 1) * 8] @ flat[f"heads/{t}/w"] + flat[f"heads/{t}/b"]
        z = z - z.max(-1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        ents.append(np.mean(-np.sum(p * np.log(p), -1)))
    return float(np.mean(ents))


def xs_cat(xs):
    return np.concatenate([np.asarray(xs[t], np.float64) for t in TASKS])


def np_merge(pre, tvs, coeff_of):
    """θ0 + Σ_k c_k(path) τ_k in float64; coeff_of(path, k) -> scalar or array of the tensor's shape."""
    fpre = {p: np.asarray(v, np.float64) for p, v in mm.flatten(pre).items()}
    ftv = [mm.flatten(t) for t in tvs]
    out = {}
    for p, v in fpre.items():
        out[p] = v if ftv[0][p] is None else v + sum(coeff_of(p, k) * np.asarray(ftv[k][p], np.float64)
                                                     for k in range(K))
    return out


def test_layerwise_frozen_equals_task_arithmetic_and_objective_matches_numpy():
    pre, fts, tvs, xs = toy()
    ada = ad.AdaptiveMerge(apply_fn, pre, tvs, TASKS, granularity="layer", init_value=0.3, lr=0.0)
    coeffs, opt = ada.init()
    for _ in range(3):  # lr = 0: frozen coefficients
        coeffs, opt, loss = ada.step(coeffs, opt, xs)
    merged = mm.flatten(ada.merged(coeffs))
    ta = mm.flatten(mm.task_arithmetic(pre, tvs, lam=0.3))
    for p in ta:
        np.testing.assert_allclose(np.asarray(merged[p]), np.asarray(ta[p]), rtol=1e-6, atol=1e-6)
    ref = np_entropy_objective(np_merge(pre, tvs, lambda p, k: 0.3), xs)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    # excluded heads are copied from the pretrained model
    np.testing.assert_array_equal(np.asarray(merged["heads/t1/w"]), pre["heads"]["t1"]["w"])


def test_taskwise_gradient_matches_numpy_finite_differences():
    pre, fts, tvs, xs = toy(1)
    ada = ad.AdaptiveMerge(apply_fn, pre, tvs, TASKS, granularity="task", clamp=None)
    c = np.array([0.2, 0.5, 0.7])
    g = np.asarray(ada.grad(jnp.asarray(c, jnp.float32), xs))
    eps = 1e-4
    fd = []
    for k in range(K):
        e = np.eye(K)[k] * eps
        fp = np_entropy_objective(np_merge(pre, tvs, lambda p, j: (c + e)[j]), xs)
        fm = np_entropy_objective(np_merge(pre, tvs, lambda p, j: (c - e)[j]), xs)
        fd.append((fp - fm) / (2 * eps))
    np.testing.assert_allclose(g, fd, rtol=2e-3, atol=1e-5)


def test_entropy_falls_and_only_coefficients_change():
    pre, fts, tvs, xs = toy(2)
    ada = ad.AdaptiveMerge(apply_fn, pre, tvs, TASKS, granularity="layer", lr=1e-2)
    coeffs, hist = ada.fit(lambda i: xs, 60)
    assert hist[-1] < hist[0] - 0.02, hist[::10]
    assert all(0.0 <= float(v) <= 1.0 for c in coeffs.values() for v in np.asarray(c))  # clamp
    assert any(not np.allclose(np.asarray(c), 0.3) for c in coeffs.values())
    merged = mm.flatten(ada.merged(coeffs))
    ref = np_merge(pre, tvs, lambda p, k: float(np.asarray(coeffs[p])[k]))
    for p, v in ref.items():
        np.testing.assert_allclose(np.asarray(merged[p]), v, rtol=1e-5, atol=1e-6)
    # the pretrained weights and task vectors the step read are untouched
    np.testing.assert_array_equal(np.asarray(ada.theta0["enc/w"]), pre["enc"]["w"])
    np.testing.assert_allclose(np.asarray(ada.stacked["enc/w"][1]), np.asarray(mm.flatten(tvs[1])["enc/w"]))


def test_adamerging_plus_plus_vectors_recover_ties_mean():
    pre, fts, tvs, xs = toy(3)
    masked = ad.ties_masked_vectors(tvs, k=30)
    fm = [mm.flatten(m) for m in masked]
    ties = mm.flatten(mm.ties(pre, tvs, k=30, mode="mean", lam=1.0))
    fpre = mm.flatten(pre)
    for p in ["enc/w", "enc/b"]:
        stack = np.stack([np.asarray(f[p]) for f in fm])
        n = np.maximum((stack != 0).sum(0), 1)
        np.testing.assert_allclose(np.asarray(fpre[p]) + stack.sum(0) / n, np.asarray(ties[p]), rtol=1e-5, atol=1e-6)
    assert fm[0]["heads/t0/w"] is None


def test_atlas_blocks_match_numpy_and_supervised_loss_falls():
    pre, fts, tvs, xs = toy(4)
    R = 3
    ada = ad.AdaptiveMerge(apply_fn, pre, tvs, TASKS, granularity="block", num_parts=R, init_value=0.0,
                           clamp=None, objective="xent", lr=5e-2, seed=7, l2=1e-3)
    rng = np.random.default_rng(0)
    coeffs = {p: jnp.asarray(rng.normal(size=(K, R)), jnp.float32) for p in ada.stacked}
    merged = mm.flatten(ada.merged(coeffs))
    parts = {p: np.asarray(v) for p, v in ada.partitions.items()}
    assert set(np.unique(parts["enc/w"])) == set(range(R))
    ref = np_merge(pre, tvs, lambda p, k: np.asarray(coeffs[p])[k][parts[p]])
    for p, v in ref.items():
        np.testing.assert_allclose(np.asarray(merged[p]), v, rtol=1e-5, atol=1e-5)
    # same seed -> same partitions (coefficients reusable without the partition arrays)
    assert np.array_equal(np.asarray(ad.random_partitions(ada.stacked, R, 7)["enc/b"]), parts["enc/b"])
    ys = {t: rng.integers(0, C, size=8) for t in TASKS}
    batch = {t: (xs[t], ys[t]) for t in TASKS}
    c, hist = ada.fit(lambda i: batch, 40)
    assert hist[-1] < hist[0] - 0.05, hist[::10]


def test_coefficients_roundtrip(tmp_path):
    pre, fts, tvs, xs = toy(5)
    ada = ad.AdaptiveMerge(apply_fn, pre, tvs, TASKS, granularity="layer", lr=1e-2)
    coeffs, _ = ada.fit(lambda i: xs, 5)
    path = ad.save_coeffs(str(tmp_path / "c.json"), coeffs, {"method": "adamerging"})
    loaded, meta = ad.load_coeffs(path)
    assert meta["method"] == "adamerging"
    a, b = mm.flatten(ada.merged(coeffs)), mm.flatten(ada.merged(loaded))
    for p in a:
        np.testing.assert_array_equal(np.asarray(a[p]), np.asarray(b[p]))


def test_errors_name_the_problem():
    pre, fts, tvs, xs = toy(6)
    with pytest.raises(ValueError, match="granularity"):
        ad.AdaptiveMerge(apply_fn, pre, tvs, TASKS, granularity="row")
    bad = ad.stack_task_vectors(tvs)
    bad["enc/w"] = bad["enc/w"][:, :, :3]
    with pytest.raises(ValueError, match=r"enc/w.*\(16, 16\).*\(16, 3\)"):
        ad.AdaptiveMerge(apply_fn, pre, None, TASKS, stacked=bad)
    with pytest.raises(ValueError, match="2 tasks on axis 0, expected 3"):
        ad.AdaptiveMerge(apply_fn, pre, None, TASKS, stacked={p: v[:2] for p, v in ad.stack_task_vectors(tvs).items()})


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_sharded_fsdp_equals_unsharded(granularity):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    from mtl.sharding import make_mesh

    pre, fts, tvs, xs = toy(7)
    kw = dict(granularity=granularity, lr=1e-2, num_parts=2, clamp=(0.0, 1.0))
    ref = ad.AdaptiveMerge(apply_fn, pre, tvs, TASKS, **kw)
    c_ref, h_ref = ref.fit(lambda i: xs, 5)
    mesh = make_mesh({"fsdp": 8})
    pre_s = mm.unflatten(ad.fsdp_shard(mm.flatten(pre), mesh), like=pre)
    stacked_s = ad.fsdp_shard(ad.stack_task_vectors(tvs), mesh, skip_leading=1)
    assert "fsdp" in str(stacked_s["enc/w"].sharding.spec)
    with jax.set_mesh(mesh):
        sh = ad.AdaptiveMerge(apply_fn, pre_s, None, TASKS, stacked=stacked_s, **kw)
        c_sh, h_sh = sh.fit(lambda i: xs, 5)
        merged = mm.flatten(sh.merged(c_sh))
    np.testing.assert_allclose(h_sh, h_ref, rtol=1e-5)
    for p in c_ref:
        np.testing.assert_allclose(np.asarray(c_sh[p]), np.asarray(c_ref[p]), rtol=1e-5, atol=1e-6)
    ref_merged = mm.flatten(ref.merged(c_ref))
    for p in ref_merged:
        np.testing.assert_allclose(np.asarray(merged[p]), np.asarray(ref_merged[p]), rtol=1e-5, atol=1e-6)
