"""Routing: top-k, capacity and overflow, dispatch/combine, routers, SparseMoE."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl.nn.moe import routing as R
from mtl.nn.moe.layer import SparseMoE
from random_models import build




def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_gelu(x):  # jax.nn.gelu's default tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_top_k_matches_numpy_and_is_not_renormalised():
    logits = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    r = R.route(jnp.asarray(logits), k=2)
    p = np_softmax(logits)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :2]
    np.testing.assert_allclose(r.probs, p, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(r.indices, idx)
    np.testing.assert_allclose(r.weights, np.take_along_axis(p, idx, -1), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(r.weights).sum(-1) < 1.0)          # not renormalised
    w, _ = R.top_k(jnp.asarray(p), 2, renormalize=True)
    np.testing.assert_allclose(w, np.take_along_axis(p, idx, -1) / np.take_along_axis(p, idx, -1).sum(-1, keepdims=True),
                               rtol=1e-5)
    dense = R.scatter_gates(r.weights, r.indices, 5)
    ref = np.zeros_like(p)
    np.put_along_axis(ref, idx, np.take_along_axis(p, idx, -1), -1)
    np.testing.assert_allclose(dense, ref, rtol=1e-5, atol=1e-7)


def test_k_larger_than_experts_raises():
    with pytest.raises(ValueError, match="k=5 with num_experts=4"):
        R.top_k(jnp.ones((2, 4)) / 4, 5)
    with pytest.raises(ValueError, match="k=0"):
        R.expert_capacity(8, 4, 0, 1.0)
    with pytest.raises(ValueError, match="k=3 with num_experts=2"):
        SparseMoE(4, 4, 2, k=3, rngs=nnx.Rngs(0))


def test_masked_softmax_gives_exact_zeros():
    p = R.softmax_gate(jnp.asarray([[1.0, 50.0, -2.0]]), np.array([True, False, True]))
    assert float(p[0, 1]) == 0.0
    np.testing.assert_allclose(p[0, [0, 2]], np_softmax(np.array([1.0, -2.0])), rtol=1e-6)


def test_capacity_formula():
    assert R.expert_capacity(10, 4, 2, 1.0) == 5          # ceil(1.0 * 10 * 2 / 4)
    assert R.expert_capacity(10, 3, 1, 1.25) == math.ceil(1.25 * 10 / 3)
    assert R.expert_capacity(10, 4, 2, None) == 10
    with pytest.raises(ValueError, match="capacity_factor"):
        R.expert_capacity(10, 4, 2, 0.0)


def test_overflow_hand_worked_case():
    # 4 tokens, 3 experts, top-2, capacity ceil(0.75 * 4 * 2 / 3) = 2.
    # Slots are given choice-major, token order: first choices t0->e0 (slot 0), t1->e0 (1),
    # t2->e0 (2: dropped), t3->e1 (0); then second choices t0->e1 (1), t1->e2 (0),
    # t2->e1 (2: dropped), t3->e0 (3: dropped). Token 2 loses both choices.
    indices = jnp.asarray([[0, 1], [0, 2], [0, 1], [1, 0]], jnp.int32)
    weights = jnp.asarray([[0.5, 0.2], [0.6, 0.3], [0.7, 0.1], [0.4, 0.35]], jnp.float32)
    cap = R.expert_capacity(4, 3, 2, 0.75)
    assert cap == 2
    np.testing.assert_array_equal(R.assignment_slots(indices, 3), [[0, 1], [1, 0], [2, 2], [0, 3]])
    disp, comb, kept = R.dispatch_and_combine(weights, indices, 3, cap)
    np.testing.assert_array_equal(kept, [[True, True], [True, True], [False, False], [True, False]])
    want_disp = np.zeros((4, 3, 2), bool)
    want_comb = np.zeros((4, 3, 2), np.float32)
    for n, e, c, w in [(0, 0, 0, .5), (1, 0, 1, .6), (3, 1, 0, .4), (0, 1, 1, .2), (1, 2, 0, .3)]:
        want_disp[n, e, c], want_comb[n, e, c] = True, w
    np.testing.assert_array_equal(disp, want_disp)
    np.testing.assert_allclose(comb, want_comb)
    # dispatch/combine with identity experts: kept weight sums; dropped token -> 0 (residual carries it)
    x = jnp.asarray(np.arange(8, dtype=np.float32).reshape(4, 2) + 1)
    buf = R.dispatch(x, disp)
    np.testing.assert_allclose(buf[0], np.asarray(x)[[0, 1]])
    np.testing.assert_allclose(buf[2], np.stack([np.asarray(x)[1], np.zeros(2)]))
    y = R.combine(buf, comb)
    np.testing.assert_allclose(y, np.asarray(x) * np.array([[.7], [.9], [0.], [.4]]), rtol=1e-6)


def test_dispatch_combine_random_vs_numpy():
    rng = np.random.default_rng(1)
    n, e, k = 9, 4, 2
    probs = np_softmax(rng.normal(size=(n, e)))
    w, idx = R.top_k(jnp.asarray(probs, jnp.float32), k)
    cap = R.expert_capacity(n, e, k, 1.0)
    _, comb, kept = R.dispatch_and_combine(w, idx, e, cap)
    fill = np.zeros(e, int)
    ref = np.zeros((n, e))
    ref_kept = np.zeros((n, k), bool)
    for j in range(k):
        for t in range(n):
            ex = int(idx[t, j])
            if fill[ex] < cap:
                ref[t, ex] = float(w[t, j])
                ref_kept[t, j] = True
            fill[ex] += 1
    np.testing.assert_array_equal(kept, ref_kept)
    np.testing.assert_allclose(np.asarray(comb).sum(-1), ref, rtol=1e-6)


def test_sparse_moe_without_dropping_matches_dense_numpy():
    moe = build(lambda: SparseMoE(4, 6, 4, k=2, capacity_factor=None, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(2).normal(size=(2, 3, 4)).astype(np.float32)
    y, aux = nnx.jit(lambda m, x: m(x))(moe, jnp.asarray(x))
    t = x.reshape(-1, 4)
    p = np_softmax(t @ np.asarray(moe.router.kernel[...]))
    w1, b1 = np.asarray(moe.experts.w_up[...]), np.asarray(moe.experts.b_up[...])
    w2, b2 = np.asarray(moe.experts.w_down[...]), np.asarray(moe.experts.b_down[...])
    ref = np.zeros_like(t)
    for n in range(t.shape[0]):
        for ex in np.argsort(-p[n], kind="stable")[:2]:
            ref[n] += p[n, ex] * (np_gelu(t[n] @ w1[ex] + b1[ex]) @ w2[ex] + b2[ex])
    np.testing.assert_allclose(y, ref.reshape(x.shape), rtol=1e-4, atol=1e-5)
    assert bool(np.all(aux["kept"]))


def test_routers_and_task_ids():
    mg = build(lambda: R.MultiGateRouter(3, 4, num_tasks=2, rngs=nnx.Rngs(0)))
    tc = build(lambda: R.TaskConditionedRouter(3, 4, num_tasks=2, task_features=2, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(3).normal(size=(5, 3)).astype(np.float32)
    k = np.asarray(mg.kernel[...])
    np.testing.assert_allclose(mg(jnp.asarray(x), 1), x @ k[1], rtol=1e-5)
    ids = np.array([0, 1, 1, 0, 1])
    np.testing.assert_allclose(mg(jnp.asarray(x), jnp.asarray(ids)), np.einsum("nd,nde->ne", x, k[ids]), rtol=1e-5)
    np.testing.assert_allclose(mg.all_tasks(jnp.asarray(x))[0], x @ k[0], rtol=1e-5)
    emb = np.asarray(tc.task_embedding[...])
    ref = np.concatenate([x, np.broadcast_to(emb[1], (5, 2))], -1) @ np.asarray(tc.router.kernel[...])
    np.testing.assert_allclose(tc(jnp.asarray(x), 1), ref, rtol=1e-5)
    for router in (mg, tc):
        with pytest.raises(ValueError, match=r"task id\(s\) \[2\] out of range for 2 tasks"):
            router(jnp.asarray(x), 2)
        with pytest.raises(ValueError, match=r"\[-1, 3\]"):
            router(jnp.asarray(x), np.array([0, 3, -1, 0, 1]))


def test_noisy_gating_uses_explicit_key():
    r = build(lambda: R.Router(3, 4, noisy=True, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3)), jnp.float32)
    clean = r(x)
    a, b = r(x, key=jax.random.key(1)), r(x, key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    std = np.log1p(np.exp(np.asarray(x) @ np.asarray(r.noise_kernel[...])))  # softplus(x W_noise)
    noise = np.asarray(jax.random.normal(jax.random.key(1), (2, 4)))
    np.testing.assert_allclose(a, np.asarray(clean) + std * noise, rtol=1e-5, atol=1e-6)
    assert not np.allclose(a, r(x, key=jax.random.key(2)))


def test_sparse_moe_task_routing_and_jit():
    moe = build(lambda: SparseMoE(4, 4, 4, k=1, capacity_factor=1.0, router="multi_gate", num_tasks=3,
                                  rngs=nnx.Rngs(0)))
    x = jnp.ones((2, 4, 4))
    y, aux = nnx.jit(lambda m, x: m(x, 2))(moe, x)
    assert y.shape == x.shape and aux["capacity"] == 2
    with pytest.raises(ValueError, match="needs a task_id"):
        moe(x)
    with pytest.raises(ValueError, match=r"\[3\]"):
        moe(x, 3)
