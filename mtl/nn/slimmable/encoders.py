"""Slimmable encoders: MLP, small ResNet-style CNN, ViT; ``encoder(x, width) -> features``.

* ``SlimMLP``: flattened input -> ``[B, ceil(w*D)]`` (``spatial = False``).
* ``SlimCNN``: a feature *map* ``[B, H/s, W/s, ceil(w*C)]`` (``spatial = True``, ``stride = s``):
  dense decoders upsample it, image-level decoders average-pool it.
* ``SlimViT``: patch tokens as a map ``[B, H/p, W/p, ceil(w*dim)]`` (no class token; heads,
  embedding and MLP hidden width all slim with ``w``).

The first layer reads the full input (its input channels never shrink); every other
dimension that is "model width" uses its first ``ceil(w*C)`` units.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.nn.encoders import patchify
from mtl.nn.slimmable.layers import SlimConv, SlimDense, SlimTransformerBlock, SwitchableNorm
from mtl.nn.slimmable.widths import WIDTHS, active, check_widths
from mtl.sharding import constrain


class SlimMLP(nnx.Module):
    """Flatten -> [SlimDense -> ReLU] x len(hidden)."""

    spatial = False

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (256, 256),
                 widths: Sequence[float] = WIDTHS, *, rngs: nnx.Rngs):
        d = int(math.prod(input_shape))
        self.input_shape, self.widths = tuple(input_shape), check_widths(widths)
        layers = []
        for i, h in enumerate(hidden):
            layers.append(SlimDense(d, int(h), ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed"), rngs=rngs))
            d = int(h)
        self.layers = nnx.List(layers)
        self.out_features = d

    def __call__(self, x, width: float = 1.0):
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = jax.nn.relu(layer(x, width))
        return x


class SlimResBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int, widths, *, rngs: nnx.Rngs):
        self.conv1 = SlimConv(cin, cout, (3, 3), stride, rngs=rngs, use_bias=False)
        self.norm1 = SwitchableNorm(cout, widths, "group", groups, names=("conv_out",), rngs=rngs)
        self.conv2 = SlimConv(cout, cout, (3, 3), 1, rngs=rngs, use_bias=False)
        self.norm2 = SwitchableNorm(cout, widths, "group", groups, names=("conv_out",), rngs=rngs)
        self.proj = SlimConv(cin, cout, (1, 1), stride, rngs=rngs, use_bias=False) \
            if (stride != 1 or cin != cout) else None

    def __call__(self, x, width: float = 1.0):
        h = jax.nn.relu(self.norm1(self.conv1(x, width), width))
        h = self.norm2(self.conv2(h, width), width)
        skip = self.proj(x, width) if self.proj is not None else x
        return jax.nn.relu(h + skip)


class SlimCNN(nnx.Module):
    """Stem conv, one residual block per stage (stride 2 after the first), switchable group norms.
    Returns the last stage's map (``stride = 2 ** (len(channels) - 1)``)."""

    spatial = True

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = (32, 64, 128), groups: int = 8,
                 widths: Sequence[float] = WIDTHS, *, rngs: nnx.Rngs):
        if len(input_shape) != 3:
            raise ValueError(f"SlimCNN expects input_shape (H, W, C); got {tuple(input_shape)}")
        self.input_shape, self.widths = tuple(input_shape), check_widths(widths)
        c0 = int(channels[0])
        self.stem = SlimConv(int(input_shape[-1]), c0, (3, 3), 1, rngs=rngs)
        blocks, cin = [], c0
        for i, c in enumerate(channels):
            blocks.append(SlimResBlock(cin, int(c), 1 if i == 0 else 2, groups, self.widths, rngs=rngs))
            cin = int(c)
        self.blocks = nnx.List(blocks)
        self.out_features = cin
        self.stride = 2 ** (len(channels) - 1)

    def __call__(self, x, width: float = 1.0):
        x = jax.nn.relu(self.stem(x, width))
        for b in self.blocks:
            x = b(x, width)
        return constrain(x, ("batch", None, None, "conv_out"))


class SlimViT(nnx.Module):
    """Patch embedding, learned positions, pre-norm slimmable blocks, final switchable norm;
    returns the patch tokens as a ``[B, H/p, W/p, ceil(w*dim)]`` map."""

    spatial = True

    def __init__(self, input_shape: Sequence[int], patch: int = 4, dim: int = 128, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, widths: Sequence[float] = WIDTHS, *,
                 rngs: nnx.Rngs):
        h, w, c = (int(s) for s in input_shape)
        if h % patch or w % patch:
            raise ValueError(f"SlimViT: image {h}x{w} is not divisible by patch {patch}")
        self.input_shape, self.patch, self.widths = (h, w, c), int(patch), check_widths(widths)
        self.grid = (h // patch, w // patch)
        self.embed = SlimDense(patch * patch * c, dim, (None, "embed"), rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.pos = nnx.Param(nnx.with_partitioning(init, (None, "embed"))(rngs.params(), (math.prod(self.grid), dim)))
        self.blocks = nnx.List([SlimTransformerBlock(dim, num_heads, mlp_ratio, self.widths, rngs=rngs)
                                for _ in range(depth)])
        self.norm = SwitchableNorm(dim, self.widths, "layer", rngs=rngs)
        self.out_features = dim
        self.stride = self.patch

    def __call__(self, x, width: float = 1.0):
        t = self.embed(patchify(x, self.patch), width)
        t = t + self.pos[...][None, :, :t.shape[-1]].astype(t.dtype)
        t = constrain(t, ("batch", "length", "embed"))
        for blk in self.blocks:
            t = blk(t, width)
        t = self.norm(t, width)
        return t.reshape((t.shape[0],) + self.grid + (t.shape[-1],))


SLIM_ENCODERS = {"mlp": SlimMLP, "cnn": SlimCNN, "vit": SlimViT}


def build_slim_encoder(name: str, input_shape, widths=WIDTHS, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """A slimmable encoder by name (``mlp``, ``cnn``, ``vit``); kwargs are its options.

    ``cnn`` takes ``channels=`` (what the plain CNN calls ``widths``: here ``widths`` is the
    set of width fractions, given by the model). 2-D inputs get a channel axis for cnn/vit.
    """
    from mtl.nn.encoders import unknown_name_error

    if name not in SLIM_ENCODERS:
        raise unknown_name_error("slimmable encoder", name, SLIM_ENCODERS)
    cls = SLIM_ENCODERS[name]
    import inspect

    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "rngs", "input_shape", "widths")]
    bad = [k for k in kwargs if k not in params]
    if bad:
        raise TypeError(f"slimmable encoder {name!r} has no option(s) {bad}; its options are {params}")
    shape = tuple(input_shape) + ((1,) if name != "mlp" and len(input_shape) == 2 else ())
    return cls(shape, widths=widths, rngs=rngs, **kwargs)


def pool(features):
    """``[B, D]`` unchanged; a map ``[B, h, w, C]`` averaged over its spatial axes."""
    return features if features.ndim == 2 else jnp.mean(features, axis=tuple(range(1, features.ndim - 1)))
