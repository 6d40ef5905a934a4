"""Slimmable task decoders: ``decoder(features, width) -> prediction``.

* :class:`PooledDecoder` (image-level tasks): average-pool a feature map (if any), hidden
  :class:`SlimDense` layers at the decoder's width, a full-width output layer.
* :class:`DenseDecoder` (per-pixel tasks on a feature map ``[B, h, w, C]``): 3x3 conv +
  switchable group norm + ReLU at the encoder's resolution, bilinear upsampling to the
  output resolution, a second 3x3 conv + norm + ReLU there, and a 1x1 conv to ``out``
  channels (the output never slims): ``[B, H, W, out]``.
* :class:`VectorDenseDecoder` (per-pixel tasks on pooled features ``[B, D]``, e.g. the
  MLP encoder): a hidden :class:`SlimDense` + ReLU, then a full-width linear map to
  ``H * W * out`` values reshaped to ``[B, H, W, out]``.

The decoder's width slims its hidden channels; its input width follows the encoder's.
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from mtl.nn.slimmable.encoders import pool
from mtl.nn.slimmable.layers import SlimConv, SlimDense, SwitchableNorm
from mtl.nn.slimmable.widths import WIDTHS
from mtl.sharding import constrain


class PooledDecoder(nnx.Module):
    def __init__(self, in_features: int, out: int, hidden: Sequence[int] = (64,), *, rngs: nnx.Rngs):
        layers, d = [], int(in_features)
        for h in hidden:
            layers.append(SlimDense(d, int(h), ("embed", "mlp"), rngs=rngs))
            d = int(h)
        self.hidden = nnx.List(layers)
        self.out = SlimDense(d, int(out), ("embed", None), rngs=rngs)

    def __call__(self, z, width: float = 1.0):
        x = pool(z)
        for layer in self.hidden:
            x = jax.nn.relu(layer(x, width))
        return self.out(x, slim_out=False)


class DenseDecoder(nnx.Module):
    def __init__(self, in_features: int, out: int, output_hw: Sequence[int], channels: int = 32,
                 groups: int = 8, widths: Sequence[float] = WIDTHS, *, rngs: nnx.Rngs):
        self.output_hw = tuple(int(s) for s in output_hw)
        self.conv1 = SlimConv(in_features, channels, (3, 3), rngs=rngs, use_bias=False)
        self.norm1 = SwitchableNorm(channels, widths, "group", groups, names=("conv_out",), rngs=rngs)
        self.conv2 = SlimConv(channels, channels, (3, 3), rngs=rngs, use_bias=False)
        self.norm2 = SwitchableNorm(channels, widths, "group", groups, names=("conv_out",), rngs=rngs)
        self.out = SlimConv(channels, int(out), (1, 1), rngs=rngs)

    def __call__(self, z, width: float = 1.0):
        if z.ndim != 4:
            raise ValueError(f"DenseDecoder needs a feature map [B, h, w, C]; got shape {z.shape}")
        x = jax.nn.relu(self.norm1(self.conv1(z, width), width))
        if x.shape[1:3] != self.output_hw:
            x = jax.image.resize(x, (x.shape[0],) + self.output_hw + (x.shape[-1],), "bilinear")
        x = constrain(x, ("batch", None, None, "conv_out"))
        x = jax.nn.relu(self.norm2(self.conv2(x, width), width))
        return self.out(x, slim_out=False)


class VectorDenseDecoder(nnx.Module):
    def __init__(self, in_features: int, out: int, output_hw: Sequence[int], hidden: int = 64, *,
                 rngs: nnx.Rngs):
        self.output_hw, self.out_channels = tuple(int(s) for s in output_hw), int(out)
        self.hidden = SlimDense(in_features, hidden, ("embed", "mlp"), rngs=rngs)
        n = self.output_hw[0] * self.output_hw[1] * self.out_channels
        self.out = SlimDense(hidden, n, ("mlp", None), rngs=rngs)

    def __call__(self, z, width: float = 1.0):
        x = jax.nn.relu(self.hidden(pool(z), width))
        y = self.out(x, slim_out=False)
        return y.reshape((y.shape[0],) + self.output_hw + (self.out_channels,))
