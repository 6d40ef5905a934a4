"""Learning to Branch (Guo et al., ICML 2020): a learned tree of per-task columns.

One backbone column per task (``mlp``, ``cnn`` or ``vit``, :mod:`mtl.nn.stages`). Stage 0 of every
column reads the input; stage ``l > 0`` of column t reads ONE of the T columns' stage
``l - 1`` outputs, chosen by the branching logits ``alpha[l - 1, t, :]`` (init 0: every
parent equally likely). Columns that pick the same parents compute the same function,
so the learned choices form a branching tree.

Training forward (``arch(x, train=True)``, what the trainer calls): the choice is a
straight-through hard Gumbel-softmax sample, ``one_hot(argmax(alpha + g)) + s - stop_grad(s)``
with ``s = softmax((alpha + g) / tau)``, so the forward uses one parent and ``alpha`` gets
the soft sample's gradient. Temperature schedule (counted in training forwards, the
``BranchStep`` variable, usually one per train step): ``tau(step) = tau0 / sqrt(1 + step /
decay_steps)`` (LibMTL uses ``epochs/20 / sqrt(epoch + 1)``); for the first
``warmup_steps`` every parent is used with weight ``1/T`` (no sampling). The noise key is
``fold_in(key(seed), step)``. Deterministic forward (``train=False``, evaluation): the
argmax parent (the ``1/T`` mix during warm-up).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.nn import stages as S
from mtl.nn.moe.architectures import _names


class BranchStep(nnx.Variable):
    """Count of training forwards (drives the Gumbel temperature and noise)."""


def temperature(step, tau0: float, decay_steps: float):
    return tau0 / jnp.sqrt(1.0 + step / decay_steps)


def branch_weights(alpha, step, *, train: bool, seed: int, tau0: float, decay_steps: float, warmup_steps: int):
    """``[L, T, T]`` parent weights (rows one-hot after warm-up; ``1/T`` during it)."""
    t = alpha.shape[-1]
    uniform = jnp.full(alpha.shape, 1.0 / t, alpha.dtype)
    if train:
        g = jax.random.gumbel(jax.random.fold_in(jax.random.key(seed), step), alpha.shape, alpha.dtype)
        soft = jax.nn.softmax((alpha + g) / temperature(step, tau0, decay_steps), axis=-1)
        hard = jax.nn.one_hot(jnp.argmax(alpha + g, -1), t, dtype=alpha.dtype)
        chosen = hard + soft - jax.lax.stop_gradient(soft)
    else:
        chosen = jax.nn.one_hot(jnp.argmax(alpha, -1), t, dtype=alpha.dtype)
    return jnp.where(step < warmup_steps, uniform, chosen)


class LearnToBranch(nnx.Module):
    """``make_encoder(rngs)`` builds one column (called once per task)."""

    def __init__(self, make_encoder: Callable, tasks: Sequence, *, tau0: float = 5.0, decay_steps: float = 100.0,
                 warmup_steps: int = 0, seed: int = 0, rngs: nnx.Rngs):
        self.task_names = _names(tasks)
        if tau0 <= 0 or decay_steps <= 0 or warmup_steps < 0:
            raise ValueError(f"LTB needs tau0 > 0, decay_steps > 0, warmup_steps >= 0; got {tau0}, {decay_steps}, "
                             f"{warmup_steps}")
        self.tau0, self.decay_steps, self.warmup_steps, self.seed = float(tau0), float(decay_steps), int(
            warmup_steps), int(seed)
        self.columns = nnx.List([make_encoder(rngs) for _ in self.task_names])
        self.stage_specs = S.stages(self.columns[0])
        t = len(self.task_names)
        shape = (len(self.stage_specs) - 1, t, t)
        self.alpha = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), (None, None, None))(
            rngs.params(), shape))
        self.step = BranchStep(jnp.zeros((), jnp.int32))
        self.out_features = self.columns[0].out_features

    def weights(self, train: bool = False):
        return branch_weights(self.alpha[...], self.step[...], train=train, seed=self.seed, tau0=self.tau0,
                              decay_steps=self.decay_steps, warmup_steps=self.warmup_steps)

    def __call__(self, x, train: bool = False):
        w = self.weights(train)
        hs = [S.run_stage(c, 0, S.prepare(c, x))[1] for c in self.columns]
        for i in range(1, len(self.stage_specs)):
            stacked = jnp.stack(hs)                                              # [T, B, ...]
            parents = jnp.tensordot(w[i - 1], stacked, axes=([1], [0]))          # [T, B, ...]
            hs = [S.run_stage(c, i, p)[1] for c, p in zip(self.columns, parents)]
        if train:
            self.step = self.step.replace(self.step[...] + 1)   # a new variable: the merged one may be an outer trace's
        return {t: S.pool(c, h) for t, c, h in zip(self.task_names, self.columns, hs)}, {"branch_weights": w}
