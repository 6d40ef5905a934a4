"""Slimmable layers: run at width ``w`` on the first ``ceil(w * C)`` units by static slicing.

Every layer owns full-width parameters and, called with a (static, Python) width, slices
them before the matmul/convolution: a narrower width is a smaller program with fewer
FLOPs, not a mask over the full one. The *input* width of a layer is read from the
input's last axis (so a layer follows whatever width the previous one produced); the
*output* width is ``active(width, out_features)``, or all outputs when ``slim_out=False``
(task output layers: the number of classes does not shrink).

Norms are *switchable*: one set of affine parameters per width of the set (each of size
``ceil(w * C)``); statistics are computed over the active channels only, so each width
normalises with its own statistics (layer/group norm keep no running state).

Parameters carry logical axis names (``mtl.sharding``) like ``mtl.nn.layers``; build
under ``nnx.use_eager_sharding(False)`` or under a mesh.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.nn.layers import default_kernel_init, zeros
from mtl.nn.slimmable.widths import WIDTHS, active, check_widths
from mtl.sharding import constrain


def _param(rngs, init, shape, names):
    return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape)))


def _in_width(x, full: int, what: str) -> int:
    c = int(x.shape[-1])
    if c > full:
        raise ValueError(f"{what}: input has {c} features but the layer has only {full} input units")
    return c


class SlimDense(nnx.Module):
    """``y = x @ W[:c_in, :c_out] + b[:c_out]`` with ``c_in = x.shape[-1]``."""

    def __init__(self, in_features: int, out_features: int, names=("embed", "mlp"), *, rngs: nnx.Rngs,
                 use_bias: bool = True, kernel_init=default_kernel_init):
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.kernel = _param(rngs, kernel_init, (self.in_features, self.out_features), names)
        self.bias = _param(rngs, zeros, (self.out_features,), names[1:]) if use_bias else None

    def __call__(self, x, width: float = 1.0, *, slim_out: bool = True):
        cin = _in_width(x, self.in_features, "SlimDense")
        cout = active(width, self.out_features) if slim_out else self.out_features
        y = x @ self.kernel[...][:cin, :cout].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...][:cout].astype(y.dtype)
        return y


class SlimConv(nnx.Module):
    """2-D convolution (NHWC) over the first ``x.shape[-1]`` input and ``ceil(w*C)`` output channels."""

    def __init__(self, in_features: int, out_features: int, kernel_size=(3, 3), strides: int = 1, *,
                 rngs: nnx.Rngs, use_bias: bool = True, padding="SAME"):
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.strides = (int(strides),) * 2 if isinstance(strides, int) else tuple(strides)
        self.padding = padding
        shape = tuple(kernel_size) + (self.in_features, self.out_features)
        self.kernel = _param(rngs, default_kernel_init, shape, (None, None, "conv_in", "conv_out"))
        self.bias = _param(rngs, zeros, (self.out_features,), ("conv_out",)) if use_bias else None

    def __call__(self, x, width: float = 1.0, *, slim_out: bool = True):
        cin = _in_width(x, self.in_features, "SlimConv")
        cout = active(width, self.out_features) if slim_out else self.out_features
        k = self.kernel[...][:, :, :cin, :cout].astype(x.dtype)
        y = jax.lax.conv_general_dilated(x, k, self.strides, self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.bias is not None:
            y = y + self.bias[...][:cout].astype(y.dtype)
        return y


def group_count(groups: int, full: int, width: float) -> int:
    """Groups of a switchable group norm at ``width``: ``ceil(width * groups)`` (keeping the
    full width's channels per group), reduced to the largest divisor of the active channels."""
    c = active(width, full)
    return math.gcd(c, active(width, min(groups, full)))


class SwitchableNorm(nnx.Module):
    """Layer norm (``kind='layer'``, last axis) or group norm (``kind='group'``, NHWC) with
    private affine parameters per width: ``scale[i], bias[i]`` of size ``ceil(widths[i] * C)``.

    At width ``w`` the mean/variance are taken over the active channels (and, for group
    norm, the spatial axes of each of :func:`group_count` groups), then width ``w``'s own
    scale and bias are applied. Training one width never touches another's parameters.
    """

    def __init__(self, features: int, widths: Sequence[float] = WIDTHS, kind: str = "layer",
                 groups: int = 8, epsilon: float = 1e-6, names=("embed",), *, rngs: nnx.Rngs):
        if kind not in ("layer", "group"):
            raise ValueError(f"SwitchableNorm kind must be 'layer' or 'group'; got {kind!r}")
        self.features, self.kind, self.groups, self.epsilon = int(features), kind, int(groups), float(epsilon)
        self.widths = check_widths(widths)
        ones = nnx.initializers.ones_init()
        self.scale = nnx.List([_param(rngs, ones, (active(w, self.features),), names) for w in self.widths])
        self.bias = nnx.List([_param(rngs, zeros, (active(w, self.features),), names) for w in self.widths])

    def index(self, width: float) -> int:
        for i, w in enumerate(self.widths):
            if abs(w - float(width)) < 1e-9:
                return i
        raise ValueError(f"norm width {width} is not in the trained width set {self.widths}; "
                         "switchable norms have parameters only for those widths")

    def __call__(self, x, width: float = 1.0):
        i = self.index(width)
        c = active(width, self.features)
        if x.shape[-1] != c:
            raise ValueError(f"SwitchableNorm at width {width} expects {c} channels; got {x.shape[-1]}")
        xf = x.astype(jnp.float32)
        if self.kind == "layer":
            mean = xf.mean(-1, keepdims=True)
            var = jnp.mean((xf - mean) ** 2, -1, keepdims=True)
            y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        else:
            g = group_count(self.groups, self.features, width)
            xg = xf.reshape(x.shape[:-1] + (g, c // g))
            axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
            mean = xg.mean(axes, keepdims=True)
            var = jnp.mean((xg - mean) ** 2, axes, keepdims=True)
            y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        y = y * self.scale[i][...] + self.bias[i][...]
        return y.astype(x.dtype)


class SlimMLPBlock(nnx.Module):
    """Linear(d -> h) -> GELU -> Linear(h -> d) using ``ceil(w*h)`` hidden units; the output
    has as many features as the input (the residual stream's width)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.up = SlimDense(dim, hidden, ("embed", "mlp"), rngs=rngs)
        self.down = SlimDense(hidden, dim, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x, width: float = 1.0):
        h = jax.nn.gelu(self.up(x, width))
        h = constrain(h, ("batch",) + (None,) * (h.ndim - 2) + ("mlp",))
        return self.down(h, width)


class SlimAttention(nnx.Module):
    """Multi-head self-attention using the first ``ceil(w*H)`` heads (head size fixed) and
    producing ``ceil(w*dim)`` features. Kernels: ``qkv [dim, 3, H, Dh]``, ``out [H, Dh, dim]``."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = int(dim), int(num_heads), dim // num_heads
        self.qkv = _param(rngs, default_kernel_init, (dim, 3, num_heads, self.head_dim),
                          ("embed", None, "heads", "kv"))
        self.qkv_bias = _param(rngs, zeros, (3, num_heads, self.head_dim), (None, "heads", "kv"))
        self.out = _param(rngs, nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
                          (num_heads, self.head_dim, dim), ("heads", "kv", "embed"))
        self.out_bias = _param(rngs, zeros, (dim,), ("embed",))

    def __call__(self, x, width: float = 1.0):
        cin = _in_width(x, self.dim, "SlimAttention")
        h, cout = active(width, self.num_heads), cin
        w = self.qkv[...][:cin, :, :h].astype(x.dtype)
        qkv = jnp.einsum("bnd,dthk->tbnhk", x, w) + self.qkv_bias[...][:, None, None, :h].astype(x.dtype)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = constrain(q, ("batch", "length", "heads", "kv"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim).astype(q.dtype)
        probs = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return jnp.einsum("bqhd,hde->bqe", y, self.out[...][:h, :, :cout].astype(y.dtype)) + \
            self.out_bias[...][:cout].astype(y.dtype)


class SlimTransformerBlock(nnx.Module):
    """Pre-norm block ``x + Attn(LN(x)); x + MLP(LN(x))`` at the residual stream's width."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, widths: Sequence[float] = WIDTHS, *,
                 rngs: nnx.Rngs):
        self.norm1 = SwitchableNorm(dim, widths, "layer", rngs=rngs)
        self.attn = SlimAttention(dim, num_heads, rngs=rngs)
        self.norm2 = SwitchableNorm(dim, widths, "layer", rngs=rngs)
        self.mlp = SlimMLPBlock(dim, int(dim * mlp_ratio), rngs=rngs)

    def __call__(self, x, width: float = 1.0):
        x = x + self.attn(self.norm1(x, width), width)
        x = constrain(x, ("batch", "length", "embed"))
        x = x + self.mlp(self.norm2(x, width), width)
        return constrain(x, ("batch", "length", "embed"))
