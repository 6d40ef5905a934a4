"""Building blocks shared by every encoder: dense/conv layers with logical axis names,
multi-head attention that accepts extra key/value prefixes, and a transformer block.

Parameters are annotated with logical axis names through ``nnx.with_partitioning``;
``mtl.sharding`` maps them to mesh axes. Build modules under
``nnx.use_eager_sharding(False)`` (the trainer does) or under a mesh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.nn import taps
from mtl.sharding import constrain

default_kernel_init = nnx.initializers.lecun_normal()
zeros = nnx.initializers.zeros_init()


def dense(in_features: int, out_features: int, names=("embed", "mlp"), *, rngs: nnx.Rngs,
          use_bias: bool = True, kernel_init=default_kernel_init, dtype=None) -> taps.Linear:
    """``nnx.Linear`` whose kernel is annotated ``names`` and bias ``names[1:]`` (tapped for
    the Jacobian-free Gramian, :mod:`mtl.nn.taps`)."""
    return taps.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype,
        kernel_init=nnx.with_partitioning(kernel_init, tuple(names)),
        bias_init=nnx.with_partitioning(zeros, tuple(names[1:])),
        rngs=rngs)


def conv(in_features: int, out_features: int, kernel_size=(3, 3), strides=1, *, rngs: nnx.Rngs,
         use_bias: bool = True, padding="SAME") -> nnx.Conv:
    return nnx.Conv(
        in_features, out_features, kernel_size=kernel_size, strides=strides, padding=padding,
        use_bias=use_bias,
        kernel_init=nnx.with_partitioning(default_kernel_init, (None, None, "conv_in", "conv_out")),
        bias_init=nnx.with_partitioning(zeros, ("conv_out",)),
        rngs=rngs)


def layer_norm(features: int, *, rngs: nnx.Rngs, eps: float = 1e-6) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        features, epsilon=eps,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        bias_init=nnx.with_partitioning(zeros, ("embed",)),
        rngs=rngs)


#: MLP activations by name: ``gelu_tanh`` (the default; Hugging Face's ``gelu_new``), exact ``gelu``
#: (erf), and CLIP's ``quick_gelu`` (x sigmoid(1.702 x))
ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLPBlock(nnx.Module):
    """Linear(d -> h) -> activation (GELU, tanh form, by default) -> Linear(h -> d)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, act: str = "gelu_tanh"):
        self.up = dense(dim, hidden, ("embed", "mlp"), rngs=rngs)
        self.down = dense(hidden, dim, ("mlp", "embed"), rngs=rngs)
        self.act = act
        activation(act)

    def __call__(self, x):
        h = activation(self.act)(self.up(x))
        h = constrain(h, ("batch",) + (None,) * (h.ndim - 2) + ("mlp",))
        return self.down(h)


def attend(q, k, v, allowed=None, n_prefix: int = 0, gate=None):
    """Softmax attention ``[B, Q, H, Dh]`` of ``q`` over ``k``/``v`` (``[B, K, H, Dh]``) whose
    first ``n_prefix`` slots are a prefix; ``allowed`` (``[Q, K]`` bool) masks slots out.

    ``gate=None``: one softmax over all slots (the prefix is plainly concatenated).
    ``gate`` (``[H]``): *zero-init gated prefix* (LLaMA-Adapter style): the tokens and the
    prefix get a softmax each and ``y = attn_tokens + tanh(gate_h) · attn_prefix``, so with
    ``gate = 0`` the output is exactly that of attention without the prefix."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    if allowed is not None:
        logits = jnp.where(allowed[None, None], logits, jnp.finfo(logits.dtype).min)
    if gate is None or not n_prefix:
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    y_tok = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits[..., n_prefix:], axis=-1), v[:, n_prefix:])
    y_pre = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits[..., :n_prefix], axis=-1), v[:, :n_prefix])
    return y_tok + jnp.tanh(gate).astype(y_pre.dtype)[:, None] * y_pre


class Attention(nnx.Module):
    """Multi-head self-attention with optional causal mask and key/value prefixes.

    ``kv_prefix=(k, v)`` with shapes ``[B or 1, n_prefix, heads, head_dim]`` is prepended
    to the keys/values: every query sees every prefix entry, and prefixes take no
    token position (ParScale's per-stream prefixes use this). ``kv_prefix=(k, v, gate)``
    (``gate [heads]``) attends to the prefix through its own softmax, added with weight
    ``tanh(gate)`` (:func:`attend`; zero gate = no prefix).
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        init = nnx.with_partitioning(default_kernel_init, ("embed", "heads", "kv"))
        self.qkv = taps.LinearGeneral(dim, (3 * num_heads, self.head_dim), kernel_init=init,
                                     bias_init=nnx.with_partitioning(zeros, ("heads", "kv")), rngs=rngs)
        self.out = taps.LinearGeneral((num_heads, self.head_dim), dim, axis=(-2, -1),
                                     kernel_init=nnx.with_partitioning(default_kernel_init, ("heads", "kv", "embed")),
                                     bias_init=nnx.with_partitioning(zeros, ("embed",)), rngs=rngs)

    def __call__(self, x, *, causal: bool = False, kv_prefix=None):
        b, n, _ = x.shape
        qkv = self.qkv(x)  # [B, N, 3H, Dh]
        q, k, v = jnp.split(qkv, 3, axis=2)
        q = constrain(q, ("batch", "length", "heads", "kv"))
        n_pre, gate = 0, None
        if kv_prefix is not None:
            pk, pv = kv_prefix[:2]
            gate = kv_prefix[2] if len(kv_prefix) > 2 else None
            n_pre = pk.shape[1]
            pk = jnp.broadcast_to(pk, (b,) + pk.shape[1:]).astype(k.dtype)
            pv = jnp.broadcast_to(pv, (b,) + pv.shape[1:]).astype(v.dtype)
            k = jnp.concatenate([pk, k], axis=1)
            v = jnp.concatenate([pv, v], axis=1)
        allowed = None
        if causal:
            allowed = jnp.tril(jnp.ones((n, n), bool))
            allowed = jnp.concatenate([jnp.ones((n, n_pre), bool), allowed], axis=1)
        return self.out(attend(q, k, v, allowed, n_pre, gate))


class TransformerBlock(nnx.Module):
    """Pre-norm transformer block: x + Attn(LN(x)); x + MLP(LN(x)).

    ``act`` names the MLP activation (:data:`ACTIVATIONS`), ``norm_eps`` the layer norms' epsilon.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, rngs: nnx.Rngs,
                 act: str = "gelu_tanh", norm_eps: float = 1e-6):
        self.norm1 = layer_norm(dim, rngs=rngs, eps=norm_eps)
        self.attn = Attention(dim, num_heads, rngs=rngs)
        self.norm2 = layer_norm(dim, rngs=rngs, eps=norm_eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), rngs=rngs, act=act)

    def __call__(self, x, *, causal: bool = False, kv_prefix=None):
        x = x + self.attn(self.norm1(x), causal=causal, kv_prefix=kv_prefix)
        x = constrain(x, ("batch", "length", "embed"))
        x = x + self.mlp(self.norm2(x))
        return constrain(x, ("batch", "length", "embed"))
