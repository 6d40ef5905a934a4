"""Helpers: gramian/aggregate, F-MTL perturbation, sparse masks, diagnostics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl.optim as mo


def _stacked(seed=0, t=3):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(t, 4, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(t, 5)), jnp.float32)}


def _flat(tree):
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], 1)


def test_gramian_and_aggregate_on_pytrees():
    tree = _stacked()
    j = _flat(tree)
    np.testing.assert_allclose(mo.gramian(tree), j @ j.T, rtol=1e-5)
    w = jnp.array([0.5, -1.0, 2.0])
    agg = mo.aggregate(w, tree)
    np.testing.assert_allclose(_flat(jax.tree.map(lambda x: x[None], agg))[0], np.asarray(w) @ j,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="leading axis"):
        mo.gramian({"a": jnp.ones((3, 2)), "b": jnp.ones((2, 2))})


def test_fmtl_perturbation():
    tree = _stacked(1)
    tree = jax.tree.map(lambda x: x.at[1].set(0.0), tree)  # task 1 has a zero gradient
    eps = jax.jit(lambda g: mo.fmtl_perturbation(g, rho=0.05))(tree)
    e, j = _flat(eps), _flat(tree)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), [0.05, 0.0, 0.05], rtol=1e-5)
    for t in (0, 2):  # same direction as g_t
        np.testing.assert_allclose(e[t], 0.05 * j[t] / np.linalg.norm(j[t]), rtol=1e-5, atol=1e-7)
    assert np.isfinite(e).all()


def test_topk_mask_magnitude_and_saliency():
    params = {"a": jnp.array([[0.1, -5.0], [0.3, 2.0]]), "b": jnp.array([-4.0, 0.2, 1.0])}
    m = mo.topk_mask(params, 3 / 7)
    np.testing.assert_array_equal(m["a"], [[False, True], [False, True]])
    np.testing.assert_array_equal(m["b"], [True, False, False])
    grads = {"a": jnp.array([[100.0, 0.0], [1.0, 0.1]]), "b": jnp.array([0.0, 1.0, 3.0])}
    # |θ·g| = a: [[10, 0], [0.3, 0.2]], b: [0, 0.2, 3]
    m = mo.topk_mask(params, 2 / 7, criterion="saliency", grads=grads)
    np.testing.assert_array_equal(m["a"], [[True, False], [False, False]])
    np.testing.assert_array_equal(m["b"], [False, False, True])
    assert sum(int(x.sum()) for x in jax.tree.leaves(mo.topk_mask(params, 0.0))) == 0
    assert sum(int(x.sum()) for x in jax.tree.leaves(mo.topk_mask(params, 1.0))) == 7
    upd = mo.apply_mask(params, m)
    np.testing.assert_array_equal(upd["b"], [0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="grads"):
        mo.topk_mask(params, 0.5, criterion="saliency")
    with pytest.raises(ValueError, match="criterion"):
        mo.topk_mask(params, 0.5, criterion="random")
    with pytest.raises(ValueError, match="fraction"):
        mo.topk_mask(params, 1.5)


def test_gradient_stats_vs_numpy():
    rng = np.random.default_rng(3)
    j = rng.normal(size=(4, 3))
    j[2] = 0.0  # zero gradient: cosines 0, no conflict counted
    s = jax.jit(mo.gradient_stats)(jnp.asarray(j @ j.T, jnp.float32))
    norms = np.linalg.norm(j, axis=1)
    np.testing.assert_allclose(s["norms"], norms, rtol=1e-5)
    cos = np.zeros((4, 4))
    conflicts = 0
    for a in range(4):
        for b in range(4):
            if norms[a] > 0 and norms[b] > 0:
                cos[a, b] = j[a] @ j[b] / (norms[a] * norms[b])
                conflicts += (a < b) and cos[a, b] < 0
    np.testing.assert_allclose(s["cosines"], cos, atol=1e-5)
    np.testing.assert_allclose(s["conflict_fraction"], conflicts / 6, rtol=1e-6)
    # present mask: only pairs among tasks 0, 1, 3
    s = mo.gradient_stats(jnp.asarray(j @ j.T), present=jnp.array([1, 1, 0, 1], bool))
    sub = [(0, 1), (0, 3), (1, 3)]
    np.testing.assert_allclose(s["conflict_fraction"], sum(cos[a, b] < 0 for a, b in sub) / 3)
    s = mo.gradient_stats(jnp.zeros((3, 3)))
    assert float(s["conflict_fraction"]) == 0.0 and np.isfinite(np.asarray(s["cosines"])).all()
