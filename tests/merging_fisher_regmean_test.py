"""Fisher merging, Fisher estimation and RegMean against numpy / closed forms."""
import jax
import numpy as np
import pytest

import mtl.merging as mm

K = 3


def np_flat(tree):
    return {p: (None if v is None else np.asarray(v)) for p, v in mm.flatten(tree).items()}


def setup(seed=0, d=5, o=4):
    rng = np.random.default_rng(seed)
    pre = {"dense": {"kernel": rng.normal(size=(d, o)).astype(np.float32), "bias": rng.normal(size=(o,)).astype(np.float32)},
           "scale": rng.normal(size=(o,)).astype(np.float32)}
    fts = [jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(np.float32), pre) for _ in range(K)]
    return rng, pre, fts, mm.task_vectors(fts, pre)


# ---------------------------------------------------------------- Fisher merging

def test_fisher_matches_numpy_weighted_average():
    rng, pre, fts, tvs = setup(0)
    fishers = [jax.tree.map(lambda a: rng.uniform(0, 2, size=a.shape).astype(np.float32), pre) for _ in range(K)]
    fishers[0]["scale"][:] = 0  # one model without information on `scale`
    coeffs = [1.0, 2.0, 0.5]
    out = np_flat(mm.fisher(pre, tvs, fishers=fishers, coeffs=coeffs, eps=1e-8))
    ff, fth = [np_flat(f) for f in fishers], [np_flat(f) for f in fts]
    for p in out:
        w = [c * (f[p].astype(np.float64) + 1e-8) for c, f in zip(coeffs, ff)]
        ref = sum(wk * t[p] for wk, t in zip(w, fth)) / sum(w)
        np.testing.assert_allclose(out[p], ref, rtol=1e-5, atol=1e-5, err_msg=p)


def test_fisher_with_equal_fishers_is_averaging():
    rng, pre, fts, tvs = setup(1)
    f = jax.tree.map(lambda a: rng.uniform(0.1, 3, size=a.shape).astype(np.float32), pre)
    out, avg = np_flat(mm.fisher(pre, tvs, fishers=[f] * K)), np_flat(mm.average(pre, tvs))
    zero = np_flat(mm.fisher(pre, tvs, fishers=[jax.tree.map(np.zeros_like, pre)] * K))
    for p in out:
        np.testing.assert_allclose(out[p], avg[p], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(zero[p], avg[p], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="scale"):
        mm.fisher(pre, tvs, fishers=[{"dense": f["dense"]}] * K)


def _logreg():
    rng = np.random.default_rng(2)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
    x = rng.normal(size=(50, 4)).astype(np.float32)
    return params, x, (lambda p, xb: xb @ p["w"] + p["b"])


def _np_grads(params, x):
    """Per-example squared-gradient terms for softmax regression: d log p_y / dW = x (e_y − p)ᵀ."""
    logits = x.astype(np.float64) @ params["w"] + params["b"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p, lambda e: (np.einsum("ni,nc->nic", x, e - p) ** 2, (e - p) ** 2)


def test_estimate_fisher_argmax_and_expected_match_numpy():
    params, x, fn = _logreg()
    p, sq = _np_grads(params, x)
    eye = np.eye(3)
    gw, gb = sq(eye[p.argmax(1)])
    f = mm.estimate_fisher(fn, params, x, labels="argmax", batch_size=16)
    np.testing.assert_allclose(f["w"], gw.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f["b"], gb.mean(0), rtol=1e-4, atol=1e-6)
    ew = sum(p[:, c, None, None] * sq(np.broadcast_to(eye[c], p.shape))[0] for c in range(3)).mean(0)
    eb = sum(p[:, c, None] * sq(np.broadcast_to(eye[c], p.shape))[1] for c in range(3)).mean(0)
    f = mm.estimate_fisher(fn, params, [x[:20], x[20:]], labels="expected")
    np.testing.assert_allclose(f["w"], ew, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f["b"], eb, rtol=1e-4, atol=1e-6)


def test_estimate_fisher_sample_is_unbiased_and_deterministic():
    params, x, fn = _logreg()
    xs = np.tile(x, (40, 1))  # 2000 examples: the sampled estimate approaches the exact expectation
    exact = mm.estimate_fisher(fn, params, x, labels="expected")
    s1 = mm.estimate_fisher(fn, params, xs, labels="sample", key=jax.random.key(0), batch_size=500)
    s2 = mm.estimate_fisher(fn, params, xs, labels="sample", key=jax.random.key(0), batch_size=400)
    np.testing.assert_allclose(s1["w"], s2["w"], rtol=1e-5)  # example i's key does not depend on batching
    np.testing.assert_allclose(np.sum(s1["w"]), np.sum(exact["w"]), rtol=0.1)
    np.testing.assert_allclose(s1["b"], exact["b"], rtol=0.2)
    with pytest.raises(ValueError, match="labels"):
        mm.estimate_fisher(fn, params, x, labels="empirical")


# ---------------------------------------------------------------- RegMean

def _regmean_problem(seed, d=5, o=4, n=30):
    rng, pre, fts, tvs = setup(seed, d, o)
    xs = [rng.normal(size=(n, d)).astype(np.float32) * rng.uniform(0.5, 2, size=d).astype(np.float32) for _ in range(K)]
    return pre, fts, tvs, xs


def test_regmean_is_least_squares_on_concatenated_inputs():
    pre, fts, tvs, xs = _regmean_problem(3)
    grams = [{"dense/kernel": mm.gram(x)} for x in xs]
    out = np_flat(mm.regmean(pre, tvs, grams=grams, alpha=1.0))
    ws = [np.asarray(f["dense"]["kernel"], np.float64) for f in fts]
    X = np.concatenate(xs).astype(np.float64)
    Y = np.concatenate([x @ w for x, w in zip(xs, ws)])
    w_ls = np.linalg.lstsq(X, Y, rcond=None)[0]
    np.testing.assert_allclose(out["dense/kernel"], w_ls, rtol=1e-4, atol=1e-4)
    avg = np_flat(mm.average(pre, tvs))
    for p in ("dense/bias", "scale"):  # no Gram: plain averaging
        np.testing.assert_array_equal(out[p], avg[p])


def test_regmean_shrinkage_and_equal_grams():
    pre, fts, tvs, xs = _regmean_problem(4)
    gs = [x.T.astype(np.float64) @ x for x in xs]
    alpha = 0.5
    out = np_flat(mm.regmean(pre, tvs, grams=[{"dense/kernel": g} for g in gs], alpha=alpha))
    shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in gs]
    ws = [np.asarray(f["dense"]["kernel"], np.float64) for f in fts]
    ref = np.linalg.solve(sum(shrunk), sum(g @ w for g, w in zip(shrunk, ws)))
    np.testing.assert_allclose(out["dense/kernel"], ref, rtol=1e-4, atol=1e-4)
    same = np_flat(mm.regmean(pre, tvs, grams=[{"dense/kernel": gs[0]}] * K))  # default alpha
    np.testing.assert_allclose(same["dense/kernel"], np.mean(ws, axis=0), rtol=1e-5, atol=1e-5)


def test_regmean_dead_input_feature_and_multi_axis_kernel():
    rng = np.random.default_rng(5)
    pre = {"conv": rng.normal(size=(2, 2, 3, 4)).astype(np.float32)}  # [kh, kw, cin, cout], d = 12
    tvs = [{"conv": rng.normal(size=(2, 2, 3, 4)).astype(np.float32)} for _ in range(K)]
    xs = [rng.normal(size=(40, 12)) for _ in range(K)]
    for x in xs:
        x[:, 5] = 0  # feature 5 never fires
    out = np.asarray(mm.regmean(pre, tvs, grams=[{"conv": x.T @ x} for x in xs], alpha=1.0)["conv"]).reshape(12, 4)
    w0, taus = pre["conv"].reshape(12, 4), [t["conv"].reshape(12, 4) for t in tvs]
    np.testing.assert_allclose(out[5], w0[5] + np.mean([t[5] for t in taus], 0), rtol=1e-5, atol=1e-5)
    live = [i for i in range(12) if i != 5]
    X = np.concatenate([x[:, live] for x in xs])
    Y = np.concatenate([x @ (w0 + t) for x, t in zip(xs, taus)])
    np.testing.assert_allclose(out[live], np.linalg.lstsq(X, Y, rcond=None)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="multiply to 7"):
        mm.regmean(pre, tvs, grams=[{"conv": np.eye(7)}] * K)
    with pytest.raises(ValueError, match="missing"):
        mm.regmean(pre, tvs, grams=[{"nope": np.eye(12)}] * K)
