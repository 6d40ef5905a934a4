"""Shared encoders: MLP, a small ResNet-style CNN, ViT, and a byte-level causal transformer.

Every encoder is an ``nnx.Module`` with ``out_features`` and
``__call__(x) -> features``: ``[B, out_features]`` for the pooled encoders,
``[B, L, out_features]`` for the byte transformer (a per-token representation).
Encoders are built by name from config through ``ENCODERS`` / ``build_encoder``.
"""
from __future__ import annotations

import difflib
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.nn.layers import TransformerBlock, conv, dense, layer_norm
from mtl.sharding import constrain


class MLP(nnx.Module):
    """Flatten -> [Linear -> ReLU] x len(hidden)."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (256, 256), *, rngs: nnx.Rngs):
        d = int(math.prod(input_shape))
        self.input_shape = tuple(input_shape)
        layers = []
        for i, h in enumerate(hidden):
            layers.append(dense(d, int(h), ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed"), rngs=rngs))
            d = int(h)
        self.layers = nnx.List(layers)
        self.out_features = d

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return x


class ResBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int, *, rngs: nnx.Rngs):
        self.conv1 = conv(cin, cout, (3, 3), stride, rngs=rngs, use_bias=False)
        self.norm1 = nnx.GroupNorm(cout, num_groups=min(groups, cout), rngs=rngs)
        self.conv2 = conv(cout, cout, (3, 3), 1, rngs=rngs, use_bias=False)
        self.norm2 = nnx.GroupNorm(cout, num_groups=min(groups, cout), rngs=rngs)
        self.proj = conv(cin, cout, (1, 1), stride, rngs=rngs, use_bias=False) if (stride != 1 or cin != cout) else None

    def __call__(self, x):
        h = jax.nn.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        skip = self.proj(x) if self.proj is not None else x
        return jax.nn.relu(h + skip)


class CNN(nnx.Module):
    """Small ResNet: stem conv, one residual block per stage (stride 2 after the first),
    GroupNorm (no running statistics, so per-task and sharded steps stay exact),
    global average pooling."""

    def __init__(self, input_shape: Sequence[int], widths: Sequence[int] = (32, 64, 128),
                 groups: int = 8, *, rngs: nnx.Rngs):
        if len(input_shape) != 3:
            raise ValueError(f"CNN expects input_shape (H, W, C); got {tuple(input_shape)}")
        self.input_shape = tuple(input_shape)
        c = int(input_shape[-1])
        self.stem = conv(c, int(widths[0]), (3, 3), 1, rngs=rngs)
        blocks = []
        cin = int(widths[0])
        for i, w in enumerate(widths):
            blocks.append(ResBlock(cin, int(w), 1 if i == 0 else 2, groups, rngs=rngs))
            cin = int(w)
        self.blocks = nnx.List(blocks)
        self.out_features = cin

    def __call__(self, x):
        x = jax.nn.relu(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return x.mean(axis=(1, 2))


def patchify(x, patch: int):
    """``[B, H, W, C]`` -> ``[B, (H/p)(W/p), p*p*C]`` non-overlapping patches in row-major order."""
    b, h, w, c = x.shape
    p = patch
    return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)


class ViT(nnx.Module):
    """Vision transformer: patch embedding, learned positions, a class token, pre-norm
    blocks, final norm; ``pool='cls'`` or ``'mean'`` gives [B, dim], ``pool=None`` the tokens.

    ``act`` (MLP activation, :data:`mtl.nn.layers.ACTIVATIONS`), ``norm_eps`` and
    ``pre_norm`` (a layer norm on the tokens before the first block, as in CLIP)
    exist to match other checkpoints (:mod:`mtl.io.hf`); the defaults are unchanged.
    """

    def __init__(self, input_shape: Sequence[int], patch: int = 4, dim: int = 128, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, pool: str | None = "cls", *, rngs: nnx.Rngs,
                 act: str = "gelu_tanh", norm_eps: float = 1e-6, pre_norm: bool = False):
        h, w, c = (int(s) for s in input_shape)
        if h % patch or w % patch:
            raise ValueError(f"ViT: image {h}x{w} is not divisible by patch {patch}")
        if pool not in ("cls", "mean", None):
            raise ValueError(f"ViT: pool must be 'cls', 'mean' or None; got {pool!r}")
        self.input_shape = (h, w, c)
        self.patch, self.pool = patch, pool
        n = (h // patch) * (w // patch)
        self.embed = dense(patch * patch * c, dim, (None, "embed"), rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.pos = nnx.Param(nnx.with_partitioning(init, (None, "embed"))(rngs.params(), (n + 1, dim)))
        self.cls = nnx.Param(nnx.with_partitioning(init, ("embed",))(rngs.params(), (dim,)))
        self.pre_norm = layer_norm(dim, rngs=rngs, eps=norm_eps) if pre_norm else None
        self.blocks = nnx.List([TransformerBlock(dim, num_heads, mlp_ratio, rngs=rngs, act=act, norm_eps=norm_eps)
                                for _ in range(depth)])
        self.norm = layer_norm(dim, rngs=rngs, eps=norm_eps)
        self.out_features = dim

    def tokens(self, x):
        """Patch embeddings with the class token first, plus learned positions."""
        x = self.embed(patchify(x, self.patch))
        cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos[...][None]
        return constrain(x, ("batch", "length", "embed"))

    def __call__(self, x):
        x = self.tokens(x)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.pool == "cls":
            return x[:, 0]
        if self.pool == "mean":
            return x[:, 1:].mean(axis=1)
        return x


class ByteTransformer(nnx.Module):
    """Byte-level causal transformer (decoder only): token + learned position embeddings,
    pre-norm causal blocks, final norm. Returns per-token features [B, L, dim].

    ``kv_prefixes`` (one ``(k, v)`` pair per layer, each ``[B or 1, n, heads, head_dim]``)
    are passed to every attention layer; this is the hook parallel scaling uses.
    ``act`` and ``norm_eps`` as for :class:`ViT` (GPT-2: ``gelu_tanh``, ``1e-5``).
    """

    def __init__(self, input_shape: Sequence[int] = (128,), vocab_size: int = 256, dim: int = 128,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, *, rngs: nnx.Rngs,
                 act: str = "gelu_tanh", norm_eps: float = 1e-6):
        (seq_len,) = (int(s) for s in input_shape)
        self.input_shape = (seq_len,)
        self.vocab_size, self.num_heads, self.depth = vocab_size, num_heads, depth
        init = nnx.initializers.normal(0.02)
        self.tok = nnx.Embed(vocab_size, dim, embedding_init=nnx.with_partitioning(init, ("vocab", "embed")), rngs=rngs)
        self.pos = nnx.Param(nnx.with_partitioning(init, (None, "embed"))(rngs.params(), (seq_len, dim)))
        self.blocks = nnx.List([TransformerBlock(dim, num_heads, mlp_ratio, rngs=rngs, act=act, norm_eps=norm_eps)
                                for _ in range(depth)])
        self.norm = layer_norm(dim, rngs=rngs, eps=norm_eps)
        self.out_features = dim

    def __call__(self, tokens, kv_prefixes=None):
        b, n = tokens.shape
        if n > self.pos.shape[0]:
            raise ValueError(f"sequence length {n} exceeds the model's maximum {self.pos.shape[0]}")
        x = self.tok(tokens.astype(jnp.int32)) + self.pos[...][None, :n]
        x = constrain(x, ("batch", "length", "embed"))
        for i, blk in enumerate(self.blocks):
            x = blk(x, causal=True, kv_prefix=None if kv_prefixes is None else kv_prefixes[i])
        return self.norm(x)


ENCODERS = {"mlp": MLP, "cnn": CNN, "vit": ViT, "byte_transformer": ByteTransformer}


def unknown_name_error(kind: str, name: str, valid) -> ValueError:
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}.{hint}")


def build_encoder(name: str, input_shape, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """Build a registered encoder by name; kwargs are its hyper-parameters."""
    if name not in ENCODERS:
        raise unknown_name_error("encoder", name, ENCODERS)
    cls = ENCODERS[name]
    try:
        return cls(tuple(input_shape), **kwargs, rngs=rngs)
    except TypeError:
        import inspect
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "rngs", "input_shape")]
        bad = [k for k in kwargs if k not in params]
        if bad:
            raise TypeError(f"encoder {name!r} has no option(s) {bad}; its options are {params}") from None
        raise
