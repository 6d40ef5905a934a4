"""Expert parallelism: the shard_map path (all-to-all + ragged_dot) and the capacity-buffer
path equal the dense one-hot dispatch reference in outputs and gradients on 8 simulated
devices (mesh data=2 x expert=4), with and without capacity drops; errors name the numbers.
A token count that does not divide the 8 token shards is padded (padding routed to no
expert) and still equals the dense reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import sharding as shd
from mtl.flops import function_flops
from mtl.nn.moe import SparseMoE
from mtl.nn.moe.parallel import check_expert_parallel, expert_parallel_ffn, padded_tokens


def mesh():
    return shd.make_mesh({"data": 2, "expert": 4})


def build(router="multi_gate", capacity_factor=None, num_experts=8, k=2):
    with nnx.use_eager_sharding(False):
        moe = SparseMoE(6, 12, num_experts, k=k, capacity_factor=capacity_factor, router=router,
                        num_tasks=2 if router != "single" else None, rngs=nnx.Rngs(0))
    return nnx.split(moe)


def loss_and_grad(gd, st, x, task_id, impl):
    def f(st, x):
        y, aux = nnx.merge(gd, st)(x, task_id, impl=impl)
        return jnp.sum(jnp.sin(3 * y)) + jnp.sum(y * x), (y, aux["kept"], aux["probs"])
    with jax.set_mesh(mesh()):
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(st, x)


def assert_same(got, ref):
    """Loss, outputs, kept flags and gradients of two ``loss_and_grad`` results agree."""
    (l1, (y1, kept1, _)), g1 = got
    (l0, (y0, kept0, _)), g0 = ref
    np.testing.assert_array_equal(np.asarray(kept1), np.asarray(kept0))
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("router,cf", [("multi_gate", None), ("multi_gate", 0.6),
                                       pytest.param("single", 1.0, marks=pytest.mark.slow),
                                       pytest.param("task_conditioned", 0.8, marks=pytest.mark.slow)])
def test_shard_map_and_capacity_equal_dense(router, cf):
    gd, st = build(router, cf)
    x = np.random.default_rng(1).normal(size=(4, 8, 6)).astype(np.float32)
    task = None if router == "single" else np.array([0, 1, 1, 0])[:, None].repeat(8, 1)
    ref = loss_and_grad(gd, st, x, task, "dense")
    kept0 = np.asarray(ref[0][1][1])
    if cf is None:
        assert kept0.all()
    elif cf < 1:
        assert 0.3 < kept0.mean() < 0.95          # the drop regime is really exercised
    for impl in ("shard_map", "capacity"):
        assert_same(loss_and_grad(gd, st, x, task, impl), ref)


def test_shard_map_really_exchanges_tokens_and_uses_grouped_matmul():
    gd, st = build()
    x = np.zeros((4, 8, 6), np.float32)
    with jax.set_mesh(mesh()):
        hlo = jax.jit(lambda s, x: nnx.merge(gd, s)(x, 0, impl="shard_map")[0]).lower(st, x).as_text()
    assert "all_to_all" in hlo and "all_gather" in hlo


def test_no_mesh_runs_locally_and_matches_dense():
    gd, st = build(capacity_factor=0.7)
    x = np.random.default_rng(2).normal(size=(16, 6)).astype(np.float32)
    f = jax.jit(lambda s, x, impl: nnx.merge(gd, s)(x, 1, impl=impl)[0], static_argnums=2)
    y0, y1 = f(st, x, "dense"), f(st, x, "shard_map")
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)


def test_expert_count_must_divide():
    m = mesh()
    x = jnp.zeros((32, 6))
    idx = jnp.zeros((32, 2), jnp.int32)
    params = {"w_up": jnp.zeros((6, 6, 12)), "b_up": jnp.zeros((6, 12)), "w_down": jnp.zeros((6, 12, 6)),
              "b_down": jnp.zeros((6, 6))}
    with pytest.raises(ValueError, match=r"6 experts cannot be split over the mesh's 'expert' axis of size 4"):
        expert_parallel_ffn(x, jnp.zeros((32, 2)), idx, params, num_experts=6, capacity=8, mesh=m)
    # a token count that does not divide the token shards is padded (test_non_divisible_token_count_equals_dense)
    with pytest.raises(ValueError, match="unknown MoE impl 'ragged'"):
        SparseMoE(6, 12, 8, impl="ragged", rngs=nnx.Rngs(0))


def test_capacity_impl_flops_scale_with_capacity_not_with_experts():
    """XLA cost analysis: the capacity path costs ~ E*C expert evaluations (C = cf*N*k/E),
    while the dense one-hot path also pays the [N, E, C] dispatch/combine einsums."""
    x = jnp.zeros((256, 32))
    flops = {}
    for impl, cf in (("capacity", 1.0), ("capacity", 2.0), ("dense", 1.0)):
        with nnx.use_eager_sharding(False):
            moe = SparseMoE(32, 128, 8, k=2, capacity_factor=cf, impl=impl, rngs=nnx.Rngs(0))
        gd, st = nnx.split(moe)
        flops[impl, cf] = function_flops(lambda s, x: nnx.merge(gd, s)(x)[0], st, x)
    expert = 2 * 2 * 32 * 128        # up + down matmuls per token-expert evaluation (mul+add)
    ideal = 256 * 2 * expert         # N * k evaluations = E * C at capacity factor 1
    assert ideal <= flops["capacity", 1.0] < 1.15 * ideal
    extra = flops["capacity", 2.0] - flops["capacity", 1.0]     # E * (C2 - C1) more evaluations
    assert 0.98 * ideal < extra < 1.12 * ideal   # + bias adds and the GELU on the extra slots
    assert flops["dense", 1.0] > 1.8 * flops["capacity", 1.0]


@pytest.mark.parametrize("shape,cf", [((3, 5, 6), None), ((3, 5, 6), 0.6), ((1, 3, 6), 1.0)])
def test_non_divisible_token_count_equals_dense(shape, cf):
    n = shape[0] * shape[1]
    assert n % 8                                            # 15 or 3 tokens over 8 token shards
    gd, st = build(capacity_factor=cf)
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    task = np.arange(shape[0])[:, None].repeat(shape[1], 1) % 2
    ref = loss_and_grad(gd, st, x, task, "dense")
    got = loss_and_grad(gd, st, x, task, "shard_map")
    if cf == 0.6:
        assert 0.3 < np.asarray(ref[0][1][1]).mean() < 0.95          # drops really happen
    _, (_, kept1, p1) = got[0]
    assert np.asarray(kept1).shape == (n, 2) and np.asarray(p1).shape == (n, 8)   # statistics: real tokens only
    assert_same(got, ref)


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
