"""Soft parameter sharing between per-task representations: cross-stitch and MTAN.

Both act between the stages of an ``mlp``, ``cnn`` or ``vit`` backbone (:mod:`mtl.nn.stages`) and
give each task its own features ``{task: [B, out_features]}``; :class:`PerTaskFeaturesModel`
puts the task heads on them (``model.arch="cross_stitch"`` / ``"mtan"``).

* **Cross-stitch** (Misra et al., CVPR 2016): one backbone column per task; after every
  stage but the last, column t's output is replaced by ``sum_s alpha[l, t, s] x_s``, the
  cross-stitch unit of layer l (a learned ``T x T`` matrix, initialised to ``alpha_same``
  on the diagonal and ``(1 - alpha_same) / (T - 1)`` off it, so each row sums to 1; 0.9
  as in the paper: near identity).
* **MTAN** (Liu et al., CVPR 2019): one shared backbone; task t owns an attention module
  per stage, ``a = sigmoid(W2 relu(W1 [u ; f_prev]))`` on the stage's intermediate
  features ``u`` (and the task's features from the stage before, ``f_prev``), applied as a
  soft mask to the stage output: ``a * p``. A shared layer per stage (3x3 conv with the next
  stage's stride on the CNN, dense on the MLP, then ReLU) carries the masked features to
  the next stage's resolution and width; the last stage's masked features, pooled, are
  the task's features. (The paper's attention convs carry batch norm; ours do not, as the
  backbones here use no running statistics.)
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.nn import stages as S
from mtl.nn.layers import conv, dense
from mtl.nn.moe.architectures import _names


def cross_stitch_init(num_layers: int, num_tasks: int, alpha_same: float) -> jnp.ndarray:
    """``[L, T, T]``: ``alpha_same`` on the diagonal, the rest of each row shared evenly."""
    t = num_tasks
    off = (1.0 - alpha_same) / (t - 1) if t > 1 else 0.0
    a = jnp.full((t, t), off) + (alpha_same - off if t > 1 else 1.0 - off) * jnp.eye(t)
    return jnp.broadcast_to(a, (num_layers, t, t)).astype(jnp.float32)


class CrossStitch(nnx.Module):
    """``make_encoder(rngs)`` builds one column (called once per task)."""

    def __init__(self, make_encoder: Callable, tasks: Sequence, *, alpha_same: float = 0.9, rngs: nnx.Rngs):
        self.task_names = _names(tasks)
        if not 0.0 <= alpha_same <= 1.0:
            raise ValueError(f"cross-stitch alpha_same must be in [0, 1]; got {alpha_same}")
        self.columns = nnx.List([make_encoder(rngs) for _ in self.task_names])
        self.stage_specs = S.stages(self.columns[0])
        n_units = len(self.stage_specs) - 1
        self.alpha = nnx.Param(nnx.with_partitioning(
            lambda *_: cross_stitch_init(n_units, len(self.task_names), alpha_same), (None, None, None))(
                rngs.params(), (n_units, len(self.task_names), len(self.task_names))))
        self.out_features = self.columns[0].out_features

    def __call__(self, x, train: bool = False):
        xs = [S.prepare(c, x) for c in self.columns]
        alpha = self.alpha[...]
        for i in range(len(self.stage_specs)):
            xs = [S.run_stage(c, i, h)[1] for c, h in zip(self.columns, xs)]
            if i < len(self.stage_specs) - 1:
                stacked = jnp.stack(xs)                                     # [T, B, ...]
                mixed = jnp.tensordot(alpha[i], stacked, axes=([1], [0]))   # [T, B, ...]
                xs = list(mixed)
        feats = {t: S.pool(c, h) for t, c, h in zip(self.task_names, self.columns, xs)}
        return feats, {}


class _Attention(nnx.Module):
    """``sigmoid(W2 relu(W1 g))`` over the last axis (a 1x1 conv on feature maps)."""

    def __init__(self, cin: int, c: int, *, rngs: nnx.Rngs):
        self.w1 = dense(cin, c, ("embed", "mlp"), rngs=rngs)
        self.w2 = dense(c, c, ("mlp", "embed"), rngs=rngs)

    def __call__(self, g):
        return jax.nn.sigmoid(self.w2(jax.nn.relu(self.w1(g))))


class MTAN(nnx.Module):
    """Shared ``encoder`` (``mlp``, ``cnn`` or ``vit``) with per-task attention masks per stage."""

    def __init__(self, encoder: nnx.Module, tasks: Sequence, *, rngs: nnx.Rngs):
        self.task_names = _names(tasks)
        self.encoder = encoder
        specs = S.stages(encoder)
        self.stage_specs = specs
        self.attention = nnx.Dict({t: nnx.List([
            _Attention(s.channels * (1 if i == 0 else 2), s.channels, rngs=rngs) for i, s in enumerate(specs)])
            for t in self.task_names})
        carry = []
        for i in range(len(specs) - 1):
            cin, nxt = specs[i].channels, specs[i + 1]
            if S.is_conv(encoder):
                carry.append(conv(cin, nxt.channels, (3, 3), nxt.stride, rngs=rngs))
            else:
                carry.append(dense(cin, nxt.channels, ("embed", "mlp"), rngs=rngs))
        self.carry = nnx.List(carry)
        self.out_features = encoder.out_features

    def __call__(self, x, train: bool = False):
        h = S.prepare(self.encoder, x)
        f = {t: None for t in self.task_names}
        n = len(self.stage_specs)
        for i in range(n):
            u, p = S.run_stage(self.encoder, i, h)
            for t in self.task_names:
                g = u if f[t] is None else jnp.concatenate([u, f[t]], axis=-1)
                masked = self.attention[t][i](g) * p
                f[t] = jax.nn.relu(self.carry[i](masked)) if i < n - 1 else masked
            h = p
        return {t: S.pool(self.encoder, f[t]) for t in self.task_names}, {}
