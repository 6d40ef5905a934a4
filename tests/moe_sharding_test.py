"""Expert-axis annotations, sharding over an `expert` mesh axis, and divisibility errors."""
import jax
import numpy as np
import pytest
from flax import nnx

from mtl import sharding as shd
from mtl.nn.heads import Regression
from mtl.nn.moe import MMoE, SparseMoE, build_architecture, build_moe_model
from mtl.tasks import Task

TASKS = [Task("a", Regression(1)), Task("b", Regression(2))]
D = 4


def mesh():
    return shd.make_mesh({"data": 2, "expert": 4})


def home_model():
    # meta pool: 2 shared + 2 groups x 1 = 4 experts; task pool: 2 shared + 2 group = 4 experts
    return build_moe_model("home", TASKS, D, task_groups=[["a"], ["b"]], num_shared=2, experts_per_group=1,
                           experts_per_task=0, expert_dim=6, feature_gate_rank=2, rngs=nnx.Rngs(0))


def test_params_carry_expert_axis():
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(home_model)
    layer = model.architecture.layers[0]
    for v in (layer.experts.w, layer.experts.b, layer.experts.scale, layer.fg_down, layer.fg_up):
        assert shd.logical_names(v)[0] == "expert"
    assert shd.logical_names(layer.gate_kernel) == ("task", "embed", "expert")
    with nnx.use_eager_sharding(False):
        moe = nnx.eval_shape(lambda: SparseMoE(D, 8, 4, k=2, router="multi_gate", num_tasks=2, rngs=nnx.Rngs(0)))
    assert shd.logical_names(moe.experts.w_up) == ("expert", "embed", "mlp")
    assert shd.logical_names(moe.experts.w_down) == ("expert", "mlp", "embed")
    assert shd.logical_names(moe.router.kernel) == ("task", "embed", "expert")


def test_experts_shard_over_expert_axis_and_match_single_device():
    m = mesh()
    with nnx.use_eager_sharding(False):   # abstract model outside the mesh, as the trainer does
        graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(home_model), nnx.Param, ...)
    shardings = shd.state_shardings(abs_params, m)
    arch = shardings["architecture"]["layers"]
    assert arch[0]["experts"]["w"].spec == jax.P("expert")
    assert arch[1]["gate_kernel"].spec == jax.P(None, None, "expert")

    def init():
        with nnx.use_eager_sharding(False):
            return nnx.split(home_model(), nnx.Param, ...)[1:]

    with jax.set_mesh(m):
        params, rest = jax.jit(init, out_shardings=(shardings, None))()
    w = params["architecture"]["layers"][0]["experts"]["w"][...]
    assert w.sharding.spec == jax.P("expert")
    assert {s.data.shape for s in w.addressable_shards} == {(1, D, 6)}        # one expert per device
    layer0 = params["architecture"]["layers"][0]
    assert np.all(np.asarray(layer0["fg_up"][...]) == 0)                       # feature gate starts at 1
    assert np.all(np.asarray(layer0["experts"]["scale"][...]) == 1)

    x = np.random.default_rng(0).normal(size=(8, D)).astype(np.float32)
    fwd = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x))
    with jax.set_mesh(m):
        xs = jax.device_put(x, shd.batch_sharding(m, 2))
        sharded = fwd(params, rest, xs)
    host = jax.tree.map(np.asarray, (params, rest))
    single = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x))(*host, x)
    for t in ("a", "b"):
        np.testing.assert_allclose(sharded[t], single[t], rtol=1e-5, atol=1e-6)


def shapes(factory):
    """Trace the build (the expert-count check runs at construction) without allocating."""
    return jax.eval_shape(lambda: nnx.state(factory()))


def test_expert_count_must_divide_expert_axis():
    with jax.set_mesh(mesh()), nnx.use_eager_sharding(False):
        with pytest.raises(ValueError, match=r"6 experts.* cannot be split over the mesh.s expert axis of size 4"):
            shapes(lambda: MMoE(D, ["a", "b"], num_experts=6, rngs=nnx.Rngs(0)))
        with pytest.raises(ValueError, match="6 experts cannot be split"):
            shapes(lambda: SparseMoE(D, 8, 6, k=2, rngs=nnx.Rngs(0)))
        with pytest.raises(ValueError, match="5 experts in this layer's pool"):   # CGC: 3 shared + 2 tasks
            shapes(lambda: build_architecture("cgc", D, ["a", "b"], num_shared=3, rngs=nnx.Rngs(0)))
        shapes(lambda: MMoE(D, ["a", "b"], num_experts=8, rngs=nnx.Rngs(0)))    # divisible: fine
        with shd.logical_rules([("expert", None)]):                                # expert axis unmapped
            shapes(lambda: MMoE(D, ["a", "b"], num_experts=6, rngs=nnx.Rngs(0)))
    with nnx.use_eager_sharding(False):                                             # no mesh: no constraint
        shapes(lambda: MMoE(D, ["a", "b"], num_experts=6, rngs=nnx.Rngs(0)))
