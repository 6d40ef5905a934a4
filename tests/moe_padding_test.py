"""Expert parallelism with a token count that does not divide the token shards: the
shard_map path pads the tokens (routed to no expert) and still equals the dense reference
in outputs, kept flags and gradients on 8 simulated devices (mesh data=2 x expert=4, so 8
token shards), with and without capacity drops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import sharding as shd
from mtl.nn.moe import SparseMoE
from mtl.nn.moe.parallel import check_expert_parallel, expert_parallel_ffn, padded_tokens


def mesh():
    return shd.make_mesh({"data": 2, "expert": 4})


def build(capacity_factor):
    with nnx.use_eager_sharding(False):
        moe = SparseMoE(6, 12, 8, k=2, capacity_factor=capacity_factor, router="multi_gate", num_tasks=2,
                        rngs=nnx.Rngs(0))
    return nnx.split(moe)


def loss_and_grad(gd, st, x, task_id, impl):
    def f(st, x):
        y, aux = nnx.merge(gd, st)(x, task_id, impl=impl)
        return jnp.sum(jnp.sin(3 * y)) + jnp.sum(y * x), (y, aux["kept"], aux["probs"])
    with jax.set_mesh(mesh()):
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(st, x)


@pytest.mark.parametrize("shape,cf", [((3, 5, 6), None), ((3, 5, 6), 0.6), ((1, 3, 6), 1.0)])
def test_non_divisible_token_count_equals_dense(shape, cf):
    n = shape[0] * shape[1]
    assert n % 8                                            # 15 or 3 tokens over 8 token shards
    gd, st = build(cf)
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    task = np.arange(shape[0])[:, None].repeat(shape[1], 1) % 2
    (l0, (y0, kept0, p0)), g0 = loss_and_grad(gd, st, x, task, "dense")
    (l1, (y1, kept1, p1)), g1 = loss_and_grad(gd, st, x, task, "shard_map")
    kept0 = np.asarray(kept0)
    if cf == 0.6:
        assert 0.3 < kept0.mean() < 0.95                    # drops really happen
    assert np.asarray(kept1).shape == (n, 2) and np.asarray(p1).shape == (n, 8)   # statistics: real tokens only
    np.testing.assert_array_equal(np.asarray(kept1), kept0)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_padding_tokens_take_no_slot_and_are_cut():
    """The function itself: 13 tokens on 8 shards run as 16; every real token keeps the slot it
    has in the reference (a tight capacity makes the priority order matter)."""
    rng = np.random.default_rng(4)
    n, e, d, h = 13, 8, 4, 5
    params = {"w_up": rng.normal(size=(e, d, h)), "b_up": rng.normal(size=(e, h)),
              "w_down": rng.normal(size=(e, h, d)), "b_down": rng.normal(size=(e, d))}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, e, (n, 2)), jnp.int32)
    idx = idx.at[:, 1].set((idx[:, 0] + 1 + idx[:, 1] % (e - 1)) % e)       # two distinct experts
    w = jnp.asarray(rng.uniform(size=(n, 2)), jnp.float32)
    assert padded_tokens(n, 8) == 16 and padded_tokens(16, 8) == 16 and padded_tokens(3, 8) == 8
    assert check_expert_parallel(e, n, mesh(), ("data", "expert"), "expert") == (8, 4)
    y_ref, kept_ref = expert_parallel_ffn(x, w, idx, params, num_experts=e, capacity=2)     # no mesh: no padding
    with jax.set_mesh(mesh()):
        y, kept = jax.jit(lambda x, w, i, p: expert_parallel_ffn(x, w, i, p, num_experts=e, capacity=2))(
            x, w, idx, params)
    assert y.shape == (n, d) and kept.shape == (n, 2)
    assert 0 < np.asarray(kept_ref).mean() < 1
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(kept_ref))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs at least one"):
        check_expert_parallel(e, 0, mesh(), ("data", "expert"), "expert")
