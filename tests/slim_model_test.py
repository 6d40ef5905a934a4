"""SlimmableMultiTask: configurations, errors, compile cache, FLOPs, model_factory, sharding."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mtl import sharding as shd
from mtl.nn import slimmable as S
from mtl.nn.build import model_factory
from mtl.nn.heads import Classification, DenseRegression, Edges, Segmentation
from mtl.tasks import Task
from random_models import build

TASKS = [Task("seg", Segmentation(5)), Task("depth", DenseRegression(1)), Task("edges", Edges()),
         Task("cls", Classification(3))]
NAMES = [t.name for t in TASKS]


def _cnn_model(seed=0, shape=(16, 16, 1)):
    return build(lambda: S.SlimmableMultiTask(S.SlimCNN(shape, channels=(8, 16), groups=4, rngs=nnx.Rngs(0)),
                                              TASKS, output_hw=shape[:2], decoder_channels=8, groups=4,
                                              rngs=nnx.Rngs(1)), seed=seed, scale=0.3)


def test_outputs_compose_encoder_and_per_task_decoder_widths():
    m = _cnn_model()
    graph, state = nnx.split(m)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32))
    cfg = S.WidthConfig(0.5, {"seg": 0.25, "cls": 0.75})
    widths = {"seg": 0.25, "depth": 1.0, "edges": 1.0, "cls": 0.75}

    @jax.jit
    def run(state, x):   # one compile instead of op-by-op dispatch
        m = nnx.merge(graph, state)
        out = m.forward(x, cfg)
        z = m.encoder(x, 0.5)
        return dict(outputs=out.outputs, features=out.features, z=z, view=m.at(cfg)(x), full=m(x),
                    full1=m(x, 1.0), heads={k: m.heads[k](z, w) for k, w in widths.items()},
                    full_features=m.features(x))

    r = run(state, x)
    assert r["features"].shape == (2, 8, 8, 8)     # ceil(0.5 * 16) channels at half resolution
    np.testing.assert_allclose(r["features"], r["z"], rtol=1e-6)
    for name in widths:
        np.testing.assert_allclose(r["outputs"][name], r["heads"][name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["view"][name], r["outputs"][name], rtol=1e-6)
        np.testing.assert_allclose(r["full"][name], r["full1"][name], rtol=1e-6)
    assert r["outputs"]["seg"].shape == (2, 16, 16, 5) and r["outputs"]["cls"].shape == (2, 3)
    # no widths = the widest configuration (what the trainer runs), which differs from cfg
    assert not np.allclose(r["full"]["seg"], r["outputs"]["seg"])
    sub, shared = S.shared_channels(r["features"], r["full_features"])
    assert shared.shape == sub.shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="not a width slice"):
        S.shared_channels(r["full_features"], r["features"])


def test_width_outside_trained_set_or_unknown_task_is_a_clear_error():
    m = _cnn_model()
    x = jnp.ones((1, 16, 16, 1))
    with pytest.raises(ValueError, match=r"encoder width 0.3 is not in the trained width set \(0.25, 0.5, 0.75, 1.0\)"):
        m(x, S.WidthConfig(0.3))
    with pytest.raises(ValueError, match="decoder 'seg' width 0.6 is not in the trained width set"):
        m.at(S.WidthConfig(0.5, {"seg": 0.6}))
    with pytest.raises(ValueError, match=r"names decoder\(s\) \['sgm'\] but the model's tasks are"):
        m(x, S.WidthConfig(0.5, {"sgm": 0.5}))
    with pytest.raises(ValueError, match="not in the trained width set"):
        S.flops(m, 0.3, (16, 16, 1))


def test_switching_widths_after_warm_up_compiles_nothing():
    m = _cnn_model()
    graph, state = nnx.split(m)
    x = jnp.ones((2, 16, 16, 1))
    configs = [m.widest, m.narrowest, S.WidthConfig(0.5, {"seg": 0.25}), S.WidthConfig(0.75, {"depth": 0.5})]
    before = S.forward._cache_size()
    outs = [S.forward(graph, state, x, c) for c in configs]
    warm = S.forward._cache_size()
    assert warm == before + len(configs)          # one program per configuration
    for _ in range(3):
        for c in reversed(configs):
            S.forward(graph, state, x, S.WidthConfig(c.encoder, dict(c.decoders)))  # equal, not identical
    assert S.forward._cache_size() == warm   # switching widths: no recompilation
    assert not np.allclose(outs[0]["seg"], outs[1]["seg"])


def test_flops_of_dense_stack_at_half_width_match_hand_count():
    hidden, d_in, batch = (256, 256, 128), 64, 8
    tasks = [Task("cls", Classification(10))]
    m = build(lambda: S.SlimmableMultiTask(S.SlimMLP((d_in,), hidden, rngs=nnx.Rngs(0)), tasks,
                                           decoder_hidden=(64,), rngs=nnx.Rngs(1)))

    def hand(w):
        dims = [d_in] + [math.ceil(w * h) for h in hidden] + [math.ceil(w * 64), 10]
        return sum(2 * batch * a * b for a, b in zip(dims[:-1], dims[1:]))

    for w in (0.5, 1.0):
        got = S.flops(m, w, (d_in,), batch=batch)
        # matmuls dominate; bias adds, ReLUs and the pooling reshape add < 2%
        assert hand(w) <= got <= 1.02 * hand(w), (w, got, hand(w))


@pytest.mark.parametrize("encoder", ["cnn", "vit"])
def test_narrowest_costs_at_most_15_percent_of_widest(encoder):
    shape = (32, 32, 1)
    enc = (lambda: S.SlimCNN(shape, channels=(16, 32, 64), rngs=nnx.Rngs(0))) if encoder == "cnn" else \
        (lambda: S.SlimViT(shape, patch=4, dim=64, depth=2, num_heads=4, rngs=nnx.Rngs(0)))
    m = build(lambda: S.SlimmableMultiTask(enc(), TASKS[:3], output_hw=(32, 32), rngs=nnx.Rngs(1)))
    wide, narrow = S.flops(m, 1.0, shape), S.flops(m, 0.25, shape)
    assert narrow <= 0.15 * wide, (narrow / wide)
    mid = S.flops(m, S.WidthConfig(1.0, {"seg": 0.25}), shape)
    assert narrow < mid < wide                    # a decoder's width alone changes the program


def _cfg(encoder, **enc_kwargs):
    return ml_collections.ConfigDict({"arch": "slimmable", "encoder": encoder, "encoder_kwargs": enc_kwargs,
                                      "arch_kwargs": {"widths": (0.25, 0.5, 1.0), "decoder_channels": 8}})


@pytest.mark.parametrize("encoder,kw", [("mlp", {"hidden": (32,)}), ("cnn", {"channels": (8, 16), "groups": 4}),
                                        ("vit", {"dim": 16, "depth": 1, "num_heads": 4, "patch": 4})])
def test_model_factory_builds_slimmable_for_each_encoder(encoder, kw):
    factory = model_factory(_cfg(encoder, **kw), TASKS, (16, 16, 1))
    with nnx.use_eager_sharding(False):
        m = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    assert isinstance(m, S.SlimmableMultiTask) and m.widths == (0.25, 0.5, 1.0)
    graph, state = nnx.split(m)
    shapes = jax.eval_shape(lambda s: nnx.merge(graph, s)(jnp.ones((2, 16, 16, 1)), 0.25), state)
    assert shapes["seg"].shape == (2, 16, 16, 5) and shapes["depth"].shape == (2, 16, 16, 1)
    assert shapes["cls"].shape == (2, 3)
    with pytest.raises(ValueError, match="not in the trained width set"):
        m.config(0.75)


def test_model_factory_errors_name_the_fix():
    bad = _cfg("cnn")
    bad.arch_kwargs = {"decoder_width": 3}
    with pytest.raises(TypeError, match="no arch_kwargs \\['decoder_width'\\]"):
        model_factory(bad, TASKS, (16, 16, 1))
    with pytest.raises(ValueError, match="unknown slimmable encoder 'byte_transformer'"):
        model_factory(_cfg("byte_transformer"), TASKS, (16, 16, 1))
    shared = ml_collections.ConfigDict({"arch": "shared", "encoder": "cnn", "encoder_kwargs": {"widths": (8,)}})
    with pytest.raises(ValueError, match="needs a dense decoder: use model.arch='slimmable'"):
        model_factory(shared, TASKS, (16, 16, 1))


def test_sharded_forward_equals_single_device():
    factory = model_factory(_cfg("cnn", channels=(8, 16), groups=4), TASKS, (16, 16, 1))
    m = build(lambda: factory(nnx.Rngs(0)), scale=0.3)
    graph, state = nnx.split(m)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 1)).astype(np.float32))
    cfg = S.WidthConfig(0.5, {"seg": 0.25})
    single = jax.jit(lambda s, x: nnx.merge(graph, s)(x, cfg))(state, x)
    mesh = shd.make_mesh({"data": 4, "tensor": 2})
    with nnx.use_eager_sharding(False):
        abstract = nnx.state(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))
    shardings = shd.state_shardings(abstract, mesh)
    with jax.set_mesh(mesh):
        sharded_state = jax.device_put(state, shardings)
        xs = jax.device_put(x, shd.batch_sharding(mesh, 4))
        out = jax.jit(lambda s, x: nnx.merge(graph, s)(x, cfg))(sharded_state, xs)
    for k in single:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(single[k]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encoder,shape,kw", [("mlp", (8,), {"hidden": (16,)}),
                                              ("cnn", (12, 12, 1), {"channels": (8,), "groups": 4})])
def test_image_level_tasks_get_pooled_decoders(encoder, shape, kw):
    """MultiTab-style regression on vectors and MultiFashion-style classification on images."""
    from mtl.nn.heads import Regression

    tasks = [Task("a", Regression(1)), Task("b", Classification(10))]
    factory = model_factory(_cfg(encoder, **kw), tasks, shape)
    m = build(lambda: factory(nnx.Rngs(0)), scale=0.3)
    assert all(isinstance(m.heads[t], S.PooledDecoder) for t in ("a", "b"))
    graph, state = nnx.split(m)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3,) + shape).astype(np.float32))
    run = jax.jit(lambda s, x, cfg: nnx.merge(graph, s)(x, cfg), static_argnums=2)
    out, half = run(state, x, S.WidthConfig(1.0)), run(state, x, S.WidthConfig(0.5, {"b": 0.25}))
    assert out["a"].shape == half["a"].shape == (3, 1) and out["b"].shape == (3, 10)
    # the head at width 0.25 on half-width features, by hand from the decoder's own weights
    z = np.asarray(jax.jit(lambda s, x: nnx.merge(graph, s).features(x, 0.5))(state, x))
    z = z if z.ndim == 2 else z.mean(axis=(1, 2))
    dec = m.heads["b"]
    h = math.ceil(0.25 * dec.hidden[0].out_features)
    hid = np.maximum(z @ np.asarray(dec.hidden[0].kernel[...])[:z.shape[-1], :h] + np.asarray(dec.hidden[0].bias[...])[:h], 0)
    want = hid @ np.asarray(dec.out.kernel[...])[:h] + np.asarray(dec.out.bias[...])
    np.testing.assert_allclose(np.asarray(half["b"]), want, rtol=1e-4, atol=1e-5)
