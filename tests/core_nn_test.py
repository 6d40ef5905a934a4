"""Encoders, heads, attention and MultiTaskModel vs shapes and numpy re-implementations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl.nn.build import model_factory
from mtl.nn.encoders import ENCODERS, build_encoder
from mtl.nn.heads import Classification, MultiLabel, Regression
from mtl.nn.layers import Attention
from mtl.nn.multitask import MultiTaskModel
from mtl.tasks import Task


def _build(fn):
    """A real (eager) build, as the library does it."""
    with nnx.use_eager_sharding(False):
        return fn()


def _random_model(fn, seed, scale=0.3):
    """``fn``'s module built abstractly, every parameter (biases too) filled with N(0, scale^2).

    Skips the per-initializer compiles of an eager build; the tests that use it check
    the forward computation against numpy, not the initialisation.
    """
    with nnx.use_eager_sharding(False):
        graph, state = nnx.split(nnx.eval_shape(fn))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32) * scale), state)
    return nnx.merge(graph, state)


def _jit_apply(module, **kw):
    """``module(x, **kw)`` under ``jax.jit`` via split/merge (one compile instead of op-by-op dispatch)."""
    graph, state = nnx.split(module)
    f = jax.jit(lambda s, x: nnx.merge(graph, s)(x, **kw))
    return lambda x: f(state, x)


TINY = {
    "mlp": ((4, 3), dict(hidden=(8, 6)), 6),
    "cnn": ((8, 8, 3), dict(widths=(4, 8), groups=2), 8),
    "vit": ((8, 8, 3), dict(patch=4, dim=8, depth=1, num_heads=2), 8),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_pooled_encoder_and_model_shapes(name):
    shape, kw, feat = TINY[name]
    tasks = [Task("c", Classification(out=5)), Task("r", Regression(out=2, hidden=(7,))),
             Task("m", MultiLabel(out=3))]
    def make():
        return MultiTaskModel(build_encoder(name, shape, rngs=nnx.Rngs(0), **kw), tasks, rngs=nnx.Rngs(1))

    # a real eager build for the MLP; the others are built abstractly and filled with random
    # values (an eager build compiles every initializer separately, which is slow on CPU)
    model = _build(make) if name == "mlp" else _random_model(make, 0, scale=0.2)
    assert model.encoder.out_features == feat
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3,) + shape).astype(np.float32))
    assert _jit_apply(model.encoder)(x).shape == (3, feat)
    out = _jit_apply(model)(x)
    assert model.task_names == ["c", "r", "m"] and set(out) == {"c", "r", "m"}
    assert out["c"].shape == (3, 5) and out["r"].shape == (3, 2) and out["m"].shape == (3, 3)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in out.values())


def test_vit_pooling_variants():
    x = jnp.ones((2, 8, 8, 3))
    for pool, want in (("cls", (2, 8)), ("mean", (2, 8)), (None, (2, 5, 8))):  # 4 patches + cls
        def make():
            return build_encoder("vit", (8, 8, 3), rngs=nnx.Rngs(0), patch=4, dim=8, depth=1, num_heads=2, pool=pool)
        with nnx.use_eager_sharding(False):
            enc = nnx.eval_shape(make)
        assert nnx.eval_shape(lambda e: e(x), enc).shape == want
    with pytest.raises(ValueError, match="divisible by patch"):
        with nnx.use_eager_sharding(False):
            nnx.eval_shape(lambda: build_encoder("vit", (8, 8, 3), rngs=nnx.Rngs(0), patch=3))


def test_byte_transformer_shapes_and_per_token_heads():
    tasks = [Task("next", Classification(out=256)), Task("tag", Classification(out=3))]
    model = _random_model(lambda: MultiTaskModel(
        build_encoder("byte_transformer", (16,), rngs=nnx.Rngs(0), dim=8, depth=1, num_heads=2), tasks,
        rngs=nnx.Rngs(1)), 0, scale=0.2)
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(2, 16)))
    assert _jit_apply(model.encoder)(tok).shape == (2, 16, 8)
    out = _jit_apply(model)(tok)
    assert out["next"].shape == (2, 16, 256) and out["tag"].shape == (2, 16, 3)
    assert nnx.eval_shape(lambda e: e(tok[:, :10]), model.encoder).shape == (2, 10, 8)  # shorter is fine
    with pytest.raises(ValueError, match="exceeds"):
        nnx.eval_shape(lambda e: e(jnp.zeros((1, 17), jnp.int32)), model.encoder)


def test_mlp_forward_equals_numpy():
    enc = _random_model(lambda: build_encoder("mlp", (2, 3), rngs=nnx.Rngs(0), hidden=(5, 4, 3)), 1)
    x = np.random.default_rng(2).normal(size=(4, 2, 3)).astype(np.float32)
    h = x.reshape(4, -1).astype(np.float64)
    for layer in enc.layers:
        W = np.asarray(layer.kernel[...], np.float64)
        b = np.asarray(layer.bias[...], np.float64)
        h = np.maximum(h @ W + b, 0.0)
    assert h.shape == (4, 3)
    np.testing.assert_allclose(np.asarray(_jit_apply(enc)(jnp.asarray(x))), h, rtol=1e-5, atol=1e-6)


def test_model_heads_equal_numpy_on_features():
    task = Task("r", Regression(out=2, hidden=(3,)))
    model = _random_model(lambda: MultiTaskModel(
        build_encoder("mlp", (4,), rngs=nnx.Rngs(0), hidden=(5,)), [task], rngs=nnx.Rngs(1)), 3)
    x = np.random.default_rng(4).normal(size=(6, 4)).astype(np.float32)
    enc = model.encoder.layers[0]
    z = np.maximum(x @ np.asarray(enc.kernel[...], np.float64) + np.asarray(enc.bias[...]), 0)
    head = model.heads["r"]
    h = np.maximum(z @ np.asarray(head.hidden[0].kernel[...]) + np.asarray(head.hidden[0].bias[...]), 0)
    want = h @ np.asarray(head.out.kernel[...]) + np.asarray(head.out.bias[...])
    np.testing.assert_allclose(np.asarray(_jit_apply(model)(jnp.asarray(x))["r"]), want, rtol=1e-5, atol=1e-6)


def test_byte_transformer_is_causal():
    enc = _random_model(lambda: build_encoder("byte_transformer", (12,), rngs=nnx.Rngs(0), dim=8, depth=2,
                                              num_heads=2), 5, scale=0.5)
    f = _jit_apply(enc)
    rng = np.random.default_rng(6)
    tok = rng.integers(0, 256, size=(2, 12))
    base = np.asarray(f(jnp.asarray(tok)))
    for j in (0, 5, 11):
        tok2 = tok.copy()
        tok2[:, j] = (tok2[:, j] + 17) % 256
        out = np.asarray(f(jnp.asarray(tok2)))
        np.testing.assert_allclose(out[:, :j], base[:, :j], rtol=0, atol=1e-6, err_msg=f"j={j}")
        assert np.abs(out[:, j:] - base[:, j:]).max(axis=-1).min() > 1e-4, f"positions >= {j} should change"


def _np_attention(attn, x, causal, prefix=None, gate=None):
    H, Dh = attn.num_heads, attn.head_dim
    x = x.astype(np.float64)
    W = np.asarray(attn.qkv.kernel[...], np.float64)     # [D, 3H, Dh]
    bqkv = np.asarray(attn.qkv.bias[...], np.float64)    # [3H, Dh]
    qkv = np.einsum("bnd,dhk->bnhk", x, W) + bqkv
    q, k, v = qkv[:, :, :H], qkv[:, :, H:2 * H], qkv[:, :, 2 * H:]
    B, N = x.shape[:2]
    n_pre = 0
    if prefix is not None:
        pk, pv = (np.broadcast_to(np.asarray(a, np.float64), (B,) + a.shape[1:]) for a in prefix)
        n_pre = pk.shape[1]
        k = np.concatenate([pk, k], 1)
        v = np.concatenate([pv, v], 1)
    out = np.zeros((B, N, H, Dh))
    for b in range(B):
        for h in range(H):
            for i in range(N):
                # prefix entries are visible to every query; tokens j <= i (or all when not causal)
                toks = [n_pre + j for j in range(N) if (j <= i or not causal)]
                # plain: one softmax over prefix + tokens; gated: one each, the prefix's x tanh(gate)
                groups = [(list(range(n_pre)) + toks, 1.0)] if gate is None else \
                    [(toks, 1.0), (list(range(n_pre)), np.tanh(float(gate[h])))]
                for visible, scale in groups:
                    s = np.array([q[b, i, h] @ k[b, kk, h] for kk in visible]) / np.sqrt(Dh)
                    p = np.exp(s - s.max())
                    p /= p.sum()
                    out[b, i, h] += scale * sum(pi * v[b, kk, h] for pi, kk in zip(p, visible))
    Wo = np.asarray(attn.out.kernel[...], np.float64)    # [H, Dh, D]
    return np.einsum("bnhk,hkd->bnd", out, Wo) + np.asarray(attn.out.bias[...], np.float64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("prefix_batch", [None, 1, 2])
def test_attention_with_kv_prefix_matches_numpy(causal, prefix_batch):
    attn = _random_model(lambda: Attention(8, 2, rngs=nnx.Rngs(0)), 7, scale=0.5)
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)
    prefix = None
    if prefix_batch is not None:
        prefix = tuple(rng.normal(size=(prefix_batch, 3, 2, 4)).astype(np.float32) for _ in range(2))
    got = attn(jnp.asarray(x), causal=causal,
               kv_prefix=None if prefix is None else tuple(jnp.asarray(p) for p in prefix))
    np.testing.assert_allclose(np.asarray(got), _np_attention(attn, x, causal, prefix), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_gated_prefix_attention_matches_numpy_and_zero_gate_is_no_prefix(causal):
    attn = _random_model(lambda: Attention(8, 2, rngs=nnx.Rngs(0)), 7, scale=0.5)
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)
    prefix = tuple(rng.normal(size=(1, 3, 2, 4)).astype(np.float32) for _ in range(2))
    gate = np.array([0.7, -1.3], np.float32)
    got = attn(jnp.asarray(x), causal=causal, kv_prefix=tuple(jnp.asarray(p) for p in prefix) + (jnp.asarray(gate),))
    np.testing.assert_allclose(np.asarray(got), _np_attention(attn, x, causal, prefix, gate), rtol=1e-4, atol=1e-5)
    zero = attn(jnp.asarray(x), causal=causal, kv_prefix=tuple(jnp.asarray(p) for p in prefix) + (jnp.zeros(2),))
    np.testing.assert_allclose(np.asarray(zero), _np_attention(attn, x, causal), rtol=1e-4, atol=1e-5)
    # (to float rounding: the token part is computed as a slice of the longer logits)
    np.testing.assert_allclose(np.asarray(zero), np.asarray(attn(jnp.asarray(x), causal=causal)), rtol=1e-5,
                               atol=1e-6)


def test_causal_attention_first_query_sees_prefix_and_itself_only():
    # query 0 under causal attention sees the prefix and token 0 only: changing tokens 1..
    # leaves output 0 unchanged, changing the prefix does not
    attn = _random_model(lambda: Attention(4, 1, rngs=nnx.Rngs(0)), 9)
    rng = np.random.default_rng(10)
    x = rng.normal(size=(1, 4, 4)).astype(np.float32)
    pre = tuple(jnp.asarray(rng.normal(size=(1, 2, 1, 4)).astype(np.float32)) for _ in range(2))
    y1 = np.asarray(attn(jnp.asarray(x), causal=True, kv_prefix=pre))
    x2 = x.copy()
    x2[:, 1:] += 1.0
    y2 = np.asarray(attn(jnp.asarray(x2), causal=True, kv_prefix=pre))
    np.testing.assert_allclose(y1[:, 0], y2[:, 0], atol=1e-6)
    y3 = np.asarray(attn(jnp.asarray(x), causal=True, kv_prefix=(pre[0] + 1.0, pre[1] - 1.0)))
    assert np.abs(y3[:, 0] - y1[:, 0]).max() > 1e-4


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        nnx.eval_shape(lambda: Attention(6, 4, rngs=nnx.Rngs(0)))


def test_unknown_encoder_name_lists_names_and_suggests():
    with pytest.raises(ValueError) as e:
        build_encoder("vitt", (8, 8, 3), rngs=nnx.Rngs(0))
    msg = str(e.value)
    for n in ENCODERS:
        assert n in msg
    assert "Did you mean 'vit'" in msg


def test_unknown_encoder_kwarg_names_it():
    with pytest.raises(TypeError) as e:
        with nnx.use_eager_sharding(False):
            nnx.eval_shape(lambda: build_encoder("mlp", (4,), rngs=nnx.Rngs(0), hiden=(8,)))
    assert "hiden" in str(e.value) and "hidden" in str(e.value)


def test_model_factory_errors_early():
    tasks = [Task("a", Regression())]
    with pytest.raises(TypeError, match="widthz"):
        model_factory({"encoder": "cnn", "encoder_kwargs": {"widthz": (4,)}}, tasks, (8, 8, 3))
    with pytest.raises(ValueError, match="Did you mean 'shared'"):
        model_factory({"arch": "sharde"}, tasks, (4,))
    factory = model_factory({"encoder": "mlp", "encoder_kwargs": {"hidden": (3,)}}, tasks, (4,))
    with nnx.use_eager_sharding(False):
        m = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    assert nnx.eval_shape(lambda mm: mm(jnp.zeros((2, 4))), m)["a"].shape == (2, 1)


# Regression test: MultiTaskModel once stored its TaskSet (a tuple subclass) as an attribute;
# nnx treats every tuple as a pytree node while jax flattens the subclass as one leaf, so
# nnx.jit / nnx.iter_graph on the model raised IndexError.
def test_multitask_model_works_with_nnx_transforms():
    model = _random_model(lambda: MultiTaskModel(
        build_encoder("mlp", (4,), rngs=nnx.Rngs(0), hidden=(3,)), [Task("a", Regression())], rngs=nnx.Rngs(1)), 0)
    x = jnp.ones((2, 4))
    want = _jit_apply(model)(x)["a"]
    got = nnx.jit(lambda m, x: m(x))(model, x)["a"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert [p for p, _ in nnx.iter_graph(model)]
    assert model.tasks.names == ["a"] and model.tasks["a"].name == "a"
