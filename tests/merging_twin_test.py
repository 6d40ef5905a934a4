"""Twin-Merging: SVD truncation vs numpy; full rank + one-hot router reproduces each fine-tune."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl.merging as mm
from mtl.merging import twin as tw

TASKS = ["a", "b", "c"]
K = len(TASKS)


def toy(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    pre = {"enc": {"w": f(10, 12) * 0.4, "b": f(12) * 0.1, "w2": f(12, 8) * 0.4},
           "heads": {t: {"w": f(8, 3)} for t in TASKS}}
    fts = [{"enc": {k: v + f(*v.shape) * 0.3 for k, v in pre["enc"].items()}, "heads": pre["heads"]}
           for _ in range(K)]
    return pre, fts, mm.task_vectors(fts, pre, exclude=["heads/*"])


def features(params, x):
    h = jax.nn.relu(x @ params["enc"]["w"] + params["enc"]["b"])
    return jnp.tanh(h @ params["enc"]["w2"])


def apply_fn(params, x):
    z = features(params, x)
    return {t: z @ params["heads"][t]["w"] for t in TASKS}


def test_compress_is_numpy_best_rank_r():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(4, 5, 20)).astype(np.float32)  # a conv-like tensor -> [20, 20] matrix
    c = tw.compress(v, rank_frac=0.25)
    assert c["u"].shape == (20, 5) and c["vt"].shape == (5, 20)
    u, s, vt = np.linalg.svd(v.reshape(20, 20).astype(np.float64))
    ref = (u[:, :5] * s[:5]) @ vt[:5]
    np.testing.assert_allclose(np.asarray(tw.decompress(c)).reshape(20, 20), ref, atol=1e-4)
    assert tw.compress(np.ones(3, np.float32), keep_vectors=False) is None
    assert tw.compress(np.ones(3, np.float32))["dense"].shape == (3,)


@pytest.mark.parametrize("mode", ["soft", "top1"])
def test_full_rank_one_hot_router_reproduces_each_finetune(mode):
    pre, fts, tvs = toy()
    twin = tw.TwinMerge.build(pre, tvs, TASKS, lam=0.3, rank_frac=1.0)
    x = np.random.default_rng(2).normal(size=(6, 10)).astype(np.float32)
    route = np.array([0, 1, 2, 2, 1, 0])
    f = twin.make_apply(apply_fn, features, mode=mode, chunk=4)
    out = f(x, weights=np.eye(K)[route])
    for i, t in enumerate(route):
        ref = apply_fn(fts[t], x[i:i + 1])
        for name in TASKS:
            np.testing.assert_allclose(np.asarray(out[name][i]), np.asarray(ref[name][0]), rtol=1e-4, atol=1e-4)


def test_soft_mixture_matches_numpy_and_low_rank_differs():
    pre, fts, tvs = toy(3)
    twin = tw.TwinMerge.build(pre, tvs, TASKS, lam=0.3, rank_frac=1.0)
    x = np.random.default_rng(4).normal(size=(3, 10)).astype(np.float32)
    w = np.array([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]], np.float32)
    out = twin.make_apply(apply_fn, features)(x, weights=w)
    shared = mm.flatten(mm.task_arithmetic(pre, tvs, lam=0.3))
    for i in range(3):  # θ(x) = θ* + Σ w_t (θ_t − θ*) = Σ w_t θ_t (weights sum to 1, full rank)
        p = mm.unflatten({k: sum(w[i, t] * np.asarray(mm.flatten(fts[t])[k], np.float64) for t in range(K))
                          if not k.startswith("heads") else np.asarray(shared[k]) for k in shared}, like=pre)
        ref = apply_fn(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p), x[i:i + 1])
        np.testing.assert_allclose(np.asarray(out["a"][i]), np.asarray(ref["a"][0]), rtol=1e-4, atol=1e-4)
    low = tw.TwinMerge.build(pre, tvs, TASKS, lam=0.3, rank_frac=0.1)
    stored, dense = low.num_stored()
    assert stored < dense
    out_low = low.make_apply(apply_fn, features)(x, weights=w)
    assert not np.allclose(np.asarray(out_low["a"]), np.asarray(out["a"]), atol=1e-4)


def test_router_learns_to_route():
    rng = np.random.default_rng(5)
    pre, fts, tvs = toy(5)
    twin = tw.TwinMerge.build(pre, tvs, TASKS)
    centers = rng.normal(size=(K, 10)).astype(np.float32) * 3
    batches = lambda i: [centers[k] + rng.normal(size=(16, 10)).astype(np.float32) * 0.3 for k in range(K)]  # noqa
    router = tw.train_router(features, twin.shared, batches, K, steps=150, lr=5e-2)
    twin = twin.with_router(router)
    xs = batches(0)
    acc = np.mean([np.mean(np.argmax(np.asarray(twin.weights(features, xs[k])), -1) == k) for k in range(K)])
    assert acc > 0.9
    with pytest.raises(ValueError, match="router"):
        tw.TwinMerge.build(pre, tvs, TASKS).weights(features, xs[0])


def test_sharded_fsdp_equals_unsharded():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    from mtl.merging.adaptive import fsdp_shard
    from mtl.sharding import make_mesh

    pre, fts, tvs = toy(6)
    x = np.random.default_rng(7).normal(size=(5, 10)).astype(np.float32)
    w = np.random.default_rng(8).dirichlet(np.ones(K), size=5).astype(np.float32)
    ref = tw.TwinMerge.build(pre, tvs, TASKS, rank_frac=0.5).make_apply(apply_fn, features)(x, weights=w)
    mesh = make_mesh({"fsdp": 8})
    shard = lambda t: mm.unflatten(fsdp_shard(mm.flatten(t), mesh), like=t)  # noqa: E731
    with jax.set_mesh(mesh):
        twin = tw.TwinMerge.build(shard(pre), [shard(t) for t in tvs], TASKS, rank_frac=0.5)
        assert "fsdp" in str(mm.flatten(twin.shared)["enc/w2"].sharding.spec)
        out = twin.make_apply(apply_fn, features)(x, weights=w)
    for t in TASKS:
        np.testing.assert_allclose(np.asarray(out[t]), np.asarray(ref[t]), rtol=1e-4, atol=1e-5)
