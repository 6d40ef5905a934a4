"""Router losses vs numpy formulas: LBL (micro / global / accumulated / shard_map), CV², z-loss."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mtl.nn.moe import losses as L
from mtl.sharding import make_mesh

E, K = 4, 2


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sample(n, seed):
    rng = np.random.default_rng(seed)
    probs = np_softmax(rng.normal(size=(n, E)) * 2).astype(np.float32)
    idx = np.argsort(-probs, -1, kind="stable")[:, :K].astype(np.int32)
    return probs, idx


def np_lbl(probs, idx):
    f = np.bincount(idx.ravel(), minlength=E) / idx.size
    return E * np.sum(f * probs.mean(0))


def test_lbl_matches_numpy_and_f_has_no_gradient():
    probs, idx = sample(12, 0)
    np.testing.assert_allclose(L.load_balancing_loss(jnp.asarray(probs), jnp.asarray(idx)), np_lbl(probs, idx), rtol=1e-5)
    g = jax.grad(lambda p: L.load_balancing_loss(p, jnp.asarray(idx)))(jnp.asarray(probs))
    f = np.bincount(idx.ravel(), minlength=E) / idx.size
    np.testing.assert_allclose(g, np.broadcast_to(E * f / 12, probs.shape), rtol=1e-5)
    # uniform routing and probabilities -> 1
    u = jnp.full((8, E), 1 / E)
    np.testing.assert_allclose(L.load_balancing_loss(u, jnp.arange(8)[:, None] % E), 1.0, rtol=1e-6)
    # a mask drops padded tokens from f and p
    mask = np.arange(12) < 7
    np.testing.assert_allclose(L.load_balancing_loss(jnp.asarray(probs), jnp.asarray(idx), mask=jnp.asarray(mask)),
                               np_lbl(probs[:7], idx[:7]), rtol=1e-5)


def test_accumulated_lbl_one_micro_batch_equals_micro_batch_lbl():
    probs, idx = sample(10, 1)
    c, p = L.routing_stats(jnp.asarray(probs), jnp.asarray(idx))
    want = np_lbl(probs, idx)
    for pooled in (True, False):
        np.testing.assert_allclose(L.accumulated_load_balancing_loss(c[None], p[None], pooled=pooled), want, rtol=1e-5)


def test_accumulated_lbl_several_micro_batches():
    stats = [sample(6, s) for s in (2, 3, 4)]
    counts = np.stack([np.bincount(i.ravel(), minlength=E) for _, i in stats]).astype(np.float32)
    means = np.stack([p.mean(0) for p, _ in stats])
    f_pool = counts.sum(0) / counts.sum()
    pooled = np.mean([E * np.sum(f_pool * m) for m in means])
    micro = np.mean([np_lbl(p, i) for p, i in stats])
    got_pooled = L.accumulated_load_balancing_loss(jnp.asarray(counts), jnp.asarray(means), pooled=True)
    got_micro = L.accumulated_load_balancing_loss(jnp.asarray(counts), jnp.asarray(means), pooled=False)
    np.testing.assert_allclose(got_pooled, pooled, rtol=1e-5)
    np.testing.assert_allclose(got_micro, micro, rtol=1e-5)
    assert abs(pooled - micro) > 1e-3
    # equal micro-batches: pooled LBL == LBL on the concatenated global batch
    allp, alli = np.concatenate([p for p, _ in stats]), np.concatenate([i for _, i in stats])
    np.testing.assert_allclose(got_pooled, np_lbl(allp, alli), rtol=1e-5)
    np.testing.assert_allclose(L.micro_batch_load_balancing_loss(jnp.asarray(allp), jnp.asarray(alli), 3), micro,
                               rtol=1e-5)


def test_global_lbl_lets_micro_batches_specialise():
    # micro-batch 0 routes everything to expert 0, micro-batch 1 to expert 1 (E=2, top-1):
    # each micro-batch LBL is 2 (maximally unbalanced), the global one is 1 (balanced).
    counts = jnp.asarray([[5.0, 0.0], [0.0, 5.0]])
    means = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(L.accumulated_load_balancing_loss(counts, means, pooled=False), 2.0)
    np.testing.assert_allclose(L.accumulated_load_balancing_loss(counts, means, pooled=True), 1.0)
    with pytest.raises(ValueError, match="micro_batches, experts"):
        L.accumulated_load_balancing_loss(counts[0], means[0])


def test_global_lbl_over_data_axis_in_shard_map():
    probs, idx = sample(16, 5)
    mesh = make_mesh({"data": 8})

    def per_shard(p, i):
        local = L.load_balancing_loss(p, i, axis_name="data")
        return local[None], jax.lax.pmean(local, "data")

    f = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=(P("data"), P())))
    local, mean = f(jnp.asarray(probs), jnp.asarray(idx))
    f_glob = np.bincount(idx.ravel(), minlength=E) / idx.size
    want_local = [E * np.sum(f_glob * probs[2 * s:2 * s + 2].mean(0)) for s in range(8)]
    np.testing.assert_allclose(local, want_local, rtol=1e-5)
    np.testing.assert_allclose(mean, np_lbl(probs, idx), rtol=1e-5)   # == global-batch LBL


def test_cv_squared_and_importance_load_loss():
    probs, idx = sample(9, 6)
    x = np.array([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(L.cv_squared(jnp.asarray(x)), x.var() / x.mean() ** 2, rtol=1e-6)
    imp = probs.sum(0)
    load = np.bincount(idx.ravel(), minlength=E).astype(float)
    want = 0.01 * (imp.var() / imp.mean() ** 2 + load.var() / load.mean() ** 2)
    np.testing.assert_allclose(L.importance_load_loss(jnp.asarray(probs), jnp.asarray(idx)), want, rtol=1e-5)
    np.testing.assert_allclose(L.importance_load_loss(jnp.asarray(probs), load=jnp.ones(E), weight=1.0),
                               imp.var() / imp.mean() ** 2, rtol=1e-5)


def test_smooth_load_matches_numpy():
    rng = np.random.default_rng(7)
    clean = rng.normal(size=(5, E)).astype(np.float32)
    std = np.abs(rng.normal(size=(5, E))).astype(np.float32) + 0.5
    noisy = clean + std * rng.normal(size=(5, E)).astype(np.float32)
    want = np.zeros(E)
    for n in range(5):
        for i in range(E):
            others = np.sort(np.delete(noisy[n], i))[::-1]
            want[i] += 0.5 * (1 + math.erf((clean[n, i] - others[K - 1]) / std[n, i] / math.sqrt(2)))
    np.testing.assert_allclose(L.smooth_load(jnp.asarray(clean), jnp.asarray(noisy), jnp.asarray(std), K), want,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="k=4 with num_experts=4"):
        L.smooth_load(jnp.asarray(clean), jnp.asarray(noisy), jnp.asarray(std), E)


def test_router_z_loss():
    z = np.random.default_rng(8).normal(size=(3, 2, E)).astype(np.float32) * 3
    lse = np.log(np.exp(z).sum(-1))
    np.testing.assert_allclose(L.router_z_loss(jnp.asarray(z)), np.mean(lse ** 2), rtol=1e-5)
    mask = np.array([True, False, True, True, False, True])
    np.testing.assert_allclose(L.router_z_loss(jnp.asarray(z), mask=mask), np.mean(lse.reshape(-1)[mask] ** 2),
                               rtol=1e-5)


def test_lbl_in_jit_on_data_sharded_batch_is_global():
    probs, idx = sample(16, 9)
    mesh = make_mesh({"data": 8})
    sh = jax.sharding.NamedSharding(mesh, P("data"))
    p, i = jax.device_put(jnp.asarray(probs), sh), jax.device_put(jnp.asarray(idx), sh)
    np.testing.assert_allclose(jax.jit(L.load_balancing_loss)(p, i), np_lbl(probs, idx), rtol=1e-5)
    np.testing.assert_allclose(L.expert_counts(jnp.asarray(idx[:, 0]), E), np.bincount(idx[:, 0], minlength=E))
