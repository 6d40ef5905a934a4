"""Meshes and logical-axis rules (8 simulated CPU devices, see conftest.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mtl import sharding as shd
from mtl.nn.encoders import build_encoder
from mtl.nn.heads import Classification, Regression
from mtl.nn.multitask import MultiTaskModel
from mtl.tasks import Task


def _shape(mesh):
    return dict(mesh.shape)


def test_eight_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("axes,want", [
    (None, {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}),
    ({"data": -1}, {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}),
    ({"data": 2, "fsdp": -1}, {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}),
    ({"tensor": 2, "data": -1, "expert": 2}, {"data": 2, "fsdp": 1, "tensor": 2, "expert": 2}),
    ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}),
    ({"fsdp": 8}, {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}),
])
def test_make_mesh_sizes(axes, want):
    mesh = shd.make_mesh(axes)
    assert _shape(mesh) == want
    assert mesh.axis_names == ("data", "fsdp", "tensor", "expert")
    assert mesh.devices.size == 8 and len(set(d.id for d in mesh.devices.flat)) == 8


def test_make_mesh_on_a_device_subset():
    mesh = shd.make_mesh({"data": -1, "tensor": 2}, devices=jax.devices()[:4])
    assert _shape(mesh)["data"] == 2 and _shape(mesh)["tensor"] == 2


@pytest.mark.parametrize("axes,match", [
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 3}, "needs 3 devices but 8"),
    ({"data": 2, "fsdp": 2}, "needs 4 devices but 8"),
    ({"data": 3, "fsdp": -1}, "not divisible"),
    ({"model": 2, "data": -1}, "unknown mesh axes.*model"),
    ({"data": 0}, "positive"),
    ({"data": -2, "fsdp": 4}, "positive"),
])
def test_make_mesh_errors(axes, match):
    with pytest.raises(ValueError, match=match):
        shd.make_mesh(axes)


MESH = None


def _mesh():
    global MESH
    if MESH is None:
        MESH = shd.make_mesh({"data": 2, "fsdp": 4})
    return MESH


def test_spec_for_default_rules():
    m = _mesh()
    # batch -> (data, fsdp, expert): expert has size 1 and is dropped
    assert shd.spec_for(("batch", None), (16, 3), m) == P(("data", "fsdp"))
    # a mesh axis is used at most once per array: embed -> fsdp is already taken by batch
    assert shd.spec_for(("batch", "embed"), (16, 8), m) == P(("data", "fsdp"))
    assert shd.spec_for(("embed", "embed"), (8, 8), m) == P("fsdp")
    assert shd.spec_for(("embed", "mlp"), (8, 8), m) == P("fsdp")           # tensor has size 1
    assert shd.spec_for(("mlp", "embed"), (8, 8), m) == P(None, "fsdp")
    assert shd.spec_for(("kv", "length", None), (8, 8, 8), m) == P()       # rules map these to nothing
    assert shd.spec_for(("no_such_name",), (8,), m) == P()


def test_spec_for_non_divisible_dims_are_replicated():
    m = _mesh()
    assert shd.spec_for(("embed",), (6,), m) == P()                           # 6 % 4
    assert shd.spec_for(("embed", None), (10, 8), m) == P()
    # batch 6: data*fsdp = 8 does not divide it, data = 2 does
    assert shd.spec_for(("batch",), (6,), m) == P("data")
    assert shd.spec_for(("batch",), (3,), m) == P()
    # without a shape nothing is dropped for divisibility
    assert shd.spec_for(("batch", "embed")) == P()                            # no mesh: replicated
    assert shd.spec_for(("batch",), None, m) == P(("data", "fsdp"))


def test_spec_for_custom_rules_and_first_rule_wins():
    m = _mesh()
    rules = [("embed", "data"), ("embed", "fsdp"), ("mlp", ["data", "fsdp"]), ("heads", "none")]
    assert shd.spec_for(("embed",), (8,), m, rules) == P("data")
    assert shd.spec_for(("mlp",), (8,), m, rules) == P(("data", "fsdp"))
    # mlp would want data too, but embed already holds it; fsdp is left
    assert shd.spec_for(("embed", "mlp"), (8, 8), m, rules) == P("data", "fsdp")
    assert shd.spec_for(("heads",), (8,), m, rules) == P()
    with shd.logical_rules(rules):
        assert shd.spec_for(("embed",), (8,), m) == P("data")
        assert shd.current_rules()[0] == ("embed", "data")
    assert shd.current_rules() == shd.DEFAULT_RULES


def test_normalize_rules_errors():
    assert shd.normalize_rules([["a", "None"], ["b", ["data", "fsdp"]]]) == (("a", None), ("b", ("data", "fsdp")))
    with pytest.raises(ValueError, match="'model'"):
        shd.normalize_rules([("embed", "model")])
    with pytest.raises(ValueError, match="pair"):
        shd.normalize_rules([("embed", "fsdp", "data")])


def test_batch_sharding():
    m = _mesh()
    assert shd.batch_sharding(m, 3).spec == P(("data", "fsdp"))
    assert shd.replicated(m).spec == P()


def test_constrain_is_noop_outside_a_mesh_and_shards_inside():
    x = jnp.arange(16.0).reshape(8, 2)
    assert shd.constrain(x, ("batch", None)) is x
    m = _mesh()

    @jax.jit
    def f(x):
        return shd.constrain(x * 2, ("batch", None))

    with jax.set_mesh(m):
        y = f(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
    assert y.sharding.spec == P(("data", "fsdp"))


def test_state_shardings_put_fsdp_on_embed_dims():
    tasks = [Task("c", Classification(out=3)), Task("r", Regression(out=2, hidden=(6,)))]
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: MultiTaskModel(
            build_encoder("mlp", (4, 3), rngs=nnx.Rngs(0), hidden=(8, 16)), tasks, rngs=nnx.Rngs(1)))
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    state = nnx.state(model, nnx.Param)
    sh = shd.state_shardings(state, mesh)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): s
            for path, s in jax.tree_util.tree_flatten_with_path(sh)[0]}
    flat = {k.removesuffix("/value"): v for k, v in flat.items()}
    # hand-derived: kernel names (embed, mlp) or (mlp, embed); fsdp (4) goes on the embed dim
    # when it divides it; mlp -> tensor (size 1) is dropped; bias carries names[1:]
    want = {
        "encoder/layers/0/kernel": P("fsdp"),          # (12, 8)  embed, mlp
        "encoder/layers/0/bias": P(),                  # (8,)     mlp
        "encoder/layers/1/kernel": P(None, "fsdp"),    # (8, 16)  mlp, embed
        "encoder/layers/1/bias": P("fsdp"),            # (16,)    embed
        "heads/c/out/kernel": P("fsdp"),               # (16, 3)  embed, None
        "heads/c/out/bias": P(),                       # (3,)     None
        "heads/r/hidden/0/kernel": P("fsdp"),          # (16, 6)  embed, mlp
        "heads/r/hidden/0/bias": P(),                  # (6,)     mlp
        "heads/r/out/kernel": P(),                     # (6, 2)   embed: 6 % 4 != 0
        "heads/r/out/bias": P(),
    }
    assert set(flat) == set(want)
    for k, spec in want.items():
        assert flat[k].spec == spec, k
        assert flat[k].mesh.shape == mesh.shape
