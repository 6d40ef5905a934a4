"""Slimmable layers at width w vs plain layers / numpy built from the first ceil(wC) weights."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl.nn import slimmable as S
from mtl.nn.encoders import MLP
from mtl.nn.layers import Attention
from random_models import build

WIDTHS = S.WIDTHS


def _np(a):
    return np.asarray(a, np.float64)


def test_active_units_is_ceil_of_width_times_units():
    assert [S.active(w, 10) for w in WIDTHS] == [3, 5, 8, 10]
    assert [S.active(w, 6) for w in WIDTHS] == [2, 3, 5, 6]
    assert S.active(0.3, 10) == 3 and S.active(0.01, 10) == 1
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        S.active(1.5, 4)
    with pytest.raises(ValueError, match="must contain 1.0"):
        S.check_widths((0.25, 0.5))


@pytest.mark.parametrize("w_in,w_out", [(1.0, 0.25), (0.5, 0.75), (0.25, 1.0)])
def test_dense_equals_numpy_on_leading_rows_and_columns(w_in, w_out):
    layer = build(lambda: S.SlimDense(10, 6, rngs=nnx.Rngs(0)), seed=1)
    cin, cout = math.ceil(w_in * 10), math.ceil(w_out * 6)
    x = np.random.default_rng(2).normal(size=(4, cin)).astype(np.float32)
    y = layer(jnp.asarray(x), w_out)
    k, b = _np(layer.kernel[...]), _np(layer.bias[...])
    np.testing.assert_allclose(_np(y), _np(x) @ k[:cin, :cout] + b[:cout], rtol=1e-5, atol=1e-5)
    assert layer(jnp.asarray(x), w_out, slim_out=False).shape == (4, 6)
    with pytest.raises(ValueError, match="input has 11 features but the layer has only 10"):
        layer(jnp.ones((1, 11)), 1.0)


@pytest.mark.parametrize("w", WIDTHS)
def test_conv_equals_plain_conv_built_from_sliced_kernel(w):
    layer = build(lambda: S.SlimConv(8, 12, (3, 3), 2, rngs=nnx.Rngs(0)), seed=3)
    cin, cout = math.ceil(w * 8), math.ceil(w * 12)
    plain = build(lambda: nnx.Conv(cin, cout, (3, 3), strides=2, padding="SAME", rngs=nnx.Rngs(0)))
    plain.kernel[...] = layer.kernel[...][:, :, :cin, :cout]
    plain.bias[...] = layer.bias[...][:cout]
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 9, 9, cin)).astype(np.float32))
    np.testing.assert_allclose(_np(layer(x, w)), _np(plain(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w", WIDTHS)
def test_attention_equals_plain_attention_with_leading_heads(w):
    dim, heads = 32, 4
    slim = build(lambda: S.SlimAttention(dim, heads, rngs=nnx.Rngs(0)), seed=5)
    h, d = math.ceil(w * heads), math.ceil(w * dim)
    assert d == h * (dim // heads)
    with nnx.use_eager_sharding(False):
        plain = Attention(d, h, rngs=nnx.Rngs(0))
    # the plain layer's qkv kernel is [d, 3h, Dh] laid out as q heads | k heads | v heads
    plain.qkv.kernel[...] = slim.qkv[...][:d, :, :h].reshape(d, 3 * h, dim // heads)
    plain.qkv.bias[...] = slim.qkv_bias[...][:, :h].reshape(3 * h, dim // heads)
    plain.out.kernel[...] = slim.out[...][:h, :, :d]
    plain.out.bias[...] = slim.out_bias[...][:d]
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 5, d)).astype(np.float32))
    np.testing.assert_allclose(_np(slim(x, w)), _np(plain(x)), rtol=1e-4, atol=1e-5)


def test_mlp_block_equals_numpy():
    blk = build(lambda: S.SlimMLPBlock(8, 16, rngs=nnx.Rngs(0)), seed=7)
    x = np.random.default_rng(8).normal(size=(3, 4)).astype(np.float32)   # width 0.5 stream
    h = math.ceil(0.5 * 16)
    up = _np(x) @ _np(blk.up.kernel[...])[:4, :h] + _np(blk.up.bias[...])[:h]
    gelu = np.asarray(jax.nn.gelu(jnp.asarray(up, jnp.float32)), np.float64)
    want = gelu @ _np(blk.down.kernel[...])[:h, :4] + _np(blk.down.bias[...])[:4]
    np.testing.assert_allclose(_np(blk(jnp.asarray(x), 0.5)), want, rtol=1e-4, atol=1e-5)


def test_slim_mlp_encoder_equals_plain_mlp_from_sliced_weights():
    enc = build(lambda: S.SlimMLP((3, 4), hidden=(12, 8), rngs=nnx.Rngs(0)), seed=9)
    w = 0.25
    h1, h2 = math.ceil(w * 12), math.ceil(w * 8)
    with nnx.use_eager_sharding(False):
        plain = MLP((3, 4), hidden=(h1, h2), rngs=nnx.Rngs(0))
    for p, s, (ci, co) in zip(plain.layers, enc.layers, ((12, h1), (h1, h2))):
        p.kernel[...] = s.kernel[...][:ci, :co]
        p.bias[...] = s.bias[...][:co]
    x = jnp.asarray(np.random.default_rng(10).normal(size=(5, 3, 4)).astype(np.float32))
    np.testing.assert_allclose(_np(enc(x, w)), _np(plain(x)), rtol=1e-5, atol=1e-5)


def _np_group_norm(x, g, scale, bias, eps=1e-6):
    b, hh, ww, c = x.shape
    xg = x.reshape(b, hh, ww, g, c // g)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_switchable_group_norm_uses_per_width_statistics_and_parameters():
    norm = build(lambda: S.SwitchableNorm(16, WIDTHS, "group", groups=8, rngs=nnx.Rngs(0)), seed=11)
    rng = np.random.default_rng(12)
    for i, w in enumerate(WIDTHS):
        c = math.ceil(w * 16)
        g = S.layers.group_count(8, 16, w)
        assert g == {0.25: 2, 0.5: 4, 0.75: 6, 1.0: 8}[w]      # 2 channels per group at every width
        assert norm.scale[i][...].shape == (c,)
        x = rng.normal(2.0, 3.0, size=(2, 3, 3, c))
        want = _np_group_norm(x, g, _np(norm.scale[i][...]), _np(norm.bias[i][...]))
        np.testing.assert_allclose(_np(norm(jnp.asarray(x, jnp.float32), w)), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="expects 4 channels; got 5"):
        norm(jnp.ones((1, 2, 2, 5)), 0.25)
    with pytest.raises(ValueError, match="not in the trained width set"):
        norm(jnp.ones((1, 2, 2, 5)), 0.3)


def test_switchable_layer_norm_trains_only_its_width():
    norm = build(lambda: S.SwitchableNorm(8, WIDTHS, "layer", rngs=nnx.Rngs(0)), seed=13)
    x = jnp.asarray(np.random.default_rng(14).normal(size=(4, 4)).astype(np.float32))
    graph, params = nnx.split(norm, nnx.Param)

    def loss(p):
        return jnp.sum(nnx.merge(graph, p)(x, 0.5) ** 2 * jnp.arange(4.0))

    grads = jax.grad(loss)(params)
    for i in range(len(WIDTHS)):
        nz = float(jnp.abs(grads["scale"][i][...]).sum() + jnp.abs(grads["bias"][i][...]).sum())
        assert (nz > 0) == (i == 1), (i, nz)
    xn = _np(x)
    want = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-6)
    want = want * _np(norm.scale[1][...]) + _np(norm.bias[1][...])
    np.testing.assert_allclose(_np(norm(x, 0.5)), want, rtol=1e-4, atol=1e-4)
