"""A backbone seen as a sequence of stages, for architectures that act between layers
(cross-stitch, MTAN, learning-to-branch).

``stages(encoder)`` describes an ``MLP``, ``CNN`` or ``ViT`` encoder as ``Stage``s; stage
``i`` maps the previous stage's output to ``(u, p)``: ``p`` its output and ``u`` an
intermediate activation (MTAN's attention reads it; ``u is p`` where a stage has one layer).
Before the first stage the input goes through ``prepare`` (MLP: flatten; ViT: patch
embedding, class token, positions and the optional pre-norm), after the last through
``pool`` (CNN: global average; ViT: final norm, then the encoder's own ``pool``). Stage
outputs are ``[B, C]`` (MLP), ``[B, H, W, C]`` (CNN) or ``[B, N, C]`` tokens (ViT);
``Stage.channels`` is ``C``, ``Stage.stride`` the stage's spatial stride. A ViT stage is one
transformer block, with ``u`` the residual stream after its attention and ``p`` after its
MLP, so running every stage reproduces ``ViT.__call__`` exactly.
"""
from __future__ import annotations

import dataclasses
import jax
from flax import nnx

from mtl.nn.encoders import CNN, MLP, ViT


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    channels: int
    stride: int = 1


def _stride(s) -> int:
    return int(s if isinstance(s, int) else tuple(s)[0])


def stages(encoder: nnx.Module) -> tuple[Stage, ...]:
    if isinstance(encoder, MLP):
        return tuple(Stage(i, int(l.out_features)) for i, l in enumerate(encoder.layers))
    if isinstance(encoder, CNN):
        first = Stage(0, int(encoder.stem.out_features))
        return (first,) + tuple(Stage(i + 1, int(b.conv1.out_features), _stride(b.conv1.strides))
                                for i, b in enumerate(encoder.blocks))
    if isinstance(encoder, ViT):
        return tuple(Stage(i, int(encoder.out_features)) for i in range(len(encoder.blocks)))
    raise ValueError(f"stage-wise architectures need an 'mlp', 'cnn' or 'vit' encoder; got {type(encoder).__name__}")


def is_conv(encoder) -> bool:
    return isinstance(encoder, CNN)


def prepare(encoder, x):
    if isinstance(encoder, MLP):
        return x.reshape(x.shape[0], -1)
    if isinstance(encoder, ViT):
        h = encoder.tokens(x)
        return h if encoder.pre_norm is None else encoder.pre_norm(h)
    return x


def pool(encoder, p):
    if isinstance(encoder, CNN):
        return p.mean(axis=(1, 2))
    if isinstance(encoder, ViT):
        p = encoder.norm(p)
        if encoder.pool == "cls":
            return p[:, 0]
        return p[:, 1:].mean(axis=1) if encoder.pool == "mean" else p
    return p


def run_stage(encoder, i: int, x):
    """``(u, p)`` of stage ``i`` of ``encoder`` on input ``x`` (the previous stage's output)."""
    if isinstance(encoder, MLP):
        p = jax.nn.relu(encoder.layers[i](x))
        return p, p
    if isinstance(encoder, ViT):
        b = encoder.blocks[i]
        u = x + b.attn(b.norm1(x))
        return u, u + b.mlp(b.norm2(u))
    if i == 0:
        p = jax.nn.relu(encoder.stem(x))
        return p, p
    b = encoder.blocks[i - 1]
    u = jax.nn.relu(b.norm1(b.conv1(x)))
    h = b.norm2(b.conv2(u))
    skip = b.proj(x) if b.proj is not None else x
    return u, jax.nn.relu(h + skip)

