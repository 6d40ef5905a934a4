"""The sandwich rule as a sampler plus a pure loss combinator (no train-step branches).

Each step trains ``n`` width configurations: the widest, the narrowest, and ``n - 2``
random ones. Widths are static, so the random ones are drawn either

* on the host, :meth:`SandwichSampler.configs` ``(step)`` - deterministic in
  ``(seed, step)`` (exact resume), each part's width uniform over the width set; a step
  jitted with these as static arguments compiles once per distinct tuple; or
* as one of a few fixed *groups* (:attr:`SandwichSampler.groups`, ``group=g``): the
  :attr:`SandwichSampler.pool` of configurations (the whole grid when it has at most
  ``pool_size`` entries, else ``pool_size`` distinct ones drawn once from ``seed``),
  shuffled once and cut into ``ceil(len(pool) / (n - 2))`` groups of ``n - 2``. The train
  step picks the group per step (``train_variants``, :mod:`mtl.train.step`): every pool
  entry is trained as often as with independent draws from the pool, and each group is its
  own static program (a ``lax.switch`` over the pool inside the step cost a recomputed
  forward per random configuration, and XLA:CPU runs convolutions slowly inside it).

:func:`sandwich_losses` composes one step's objective from the parts in this package.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mtl.nn.slimmable.distill import cikd_loss, inplace_distillation_loss
from mtl.nn.slimmable.widths import WidthConfig, all_configs, check_widths


@dataclasses.dataclass(frozen=True)
class SandwichSampler:
    widths: tuple
    tasks: tuple
    n: int = 4
    seed: int = 0
    pool_size: int = 16

    def __post_init__(self):
        object.__setattr__(self, "widths", check_widths(self.widths))
        object.__setattr__(self, "tasks", tuple(str(t) for t in self.tasks))
        if int(self.n) < 2:
            raise ValueError(f"the sandwich rule trains n >= 2 configurations (widest, narrowest, n-2 random); got n={self.n}")
        if int(self.pool_size) < 1:
            raise ValueError(f"pool_size must be >= 1; got {self.pool_size}")

    @property
    def widest(self) -> WidthConfig:
        return WidthConfig.uniform(self.widths[-1], self.tasks)

    @property
    def narrowest(self) -> WidthConfig:
        return WidthConfig.uniform(self.widths[0], self.tasks)

    def configs(self, step: int) -> tuple:
        """``(widest, narrowest, r_1, ..., r_{n-2})`` for this step (host side, deterministic)."""
        rng = np.random.default_rng([int(self.seed), int(step)])
        draws = rng.integers(0, len(self.widths), (int(self.n) - 2, 1 + len(self.tasks)))
        rand = tuple(WidthConfig(self.widths[d[0]], {t: self.widths[i] for t, i in zip(self.tasks, d[1:])})
                     for d in draws)
        return (self.widest, self.narrowest) + rand

    @functools.cached_property
    def pool(self) -> tuple:
        grid = all_configs(self.widths, self.tasks)
        if len(grid) <= self.pool_size:
            return tuple(grid)
        pick = np.random.default_rng([int(self.seed), 2**31 - 1]).choice(len(grid), self.pool_size, replace=False)
        return tuple(grid[i] for i in sorted(pick))

    @functools.cached_property
    def groups(self) -> tuple:
        """The pool shuffled once (from ``seed``) and cut into groups of ``n - 2``
        configurations (the last group wraps around to the start): ``((),)`` when ``n == 2``."""
        k = int(self.n) - 2
        if k == 0:
            return ((),)
        pool = self.pool
        order = np.random.default_rng([int(self.seed), 2**31 - 2]).permutation(len(pool))
        count = -(-len(pool) // k)
        return tuple(tuple(pool[order[(g * k + j) % len(pool)]] for j in range(k)) for g in range(count))


@dataclasses.dataclass(frozen=True)
class SandwichLosses:
    labelled: jax.Array   # [T] per-task label losses, summed over the configurations that use labels
    distill: jax.Array    # scalar: in-place distillation, summed over the sub-configurations (mean over tasks)
    cikd: jax.Array       # scalar: CIKD, summed over the sub-configurations

    def total(self, kd_weight: float = 1.0, cikd_weight: float = 1.0, task_weights=None):
        w = jnp.ones_like(self.labelled) if task_weights is None else task_weights
        return jnp.sum(w * self.labelled) + kd_weight * self.distill + cikd_weight * self.cikd


def _sub_losses(model, tasks, batch, teacher, sub_labels, cfg):
    from mtl.tasks import losses_from_outputs

    out = model.forward(batch["inputs"], cfg)
    labelled = losses_from_outputs(tasks, out.outputs, batch) if sub_labels else jnp.zeros(len(tasks))
    kd = jnp.mean(inplace_distillation_loss(tasks, out.outputs, teacher.outputs))
    return labelled, kd, cikd_loss(out.features, teacher.features)


def sandwich_losses(model, batch, tasks, sampler: SandwichSampler, *, step=None, group=None,
                    sub_labels: bool = True) -> SandwichLosses:
    """One step's sandwich objective: the widest configuration on the labels; the narrowest
    and ``n - 2`` random ones distil from it (in-place + CIKD) and, if ``sub_labels``, also
    train on the labels. Random configurations come from ``sampler.configs(step)`` (host,
    per step) or are ``sampler.groups[group]``; both static."""
    from mtl.tasks import losses_from_outputs

    if (step is None) == (group is None):
        raise ValueError("sandwich_losses needs exactly one of step= (host sampling) or group= (a fixed group)")
    if group is not None and not 0 <= int(group) < len(sampler.groups):
        raise ValueError(f"group must be in 0..{len(sampler.groups) - 1}; got {group}")
    teacher = model.forward(batch["inputs"], sampler.widest)
    labelled = losses_from_outputs(tasks, teacher.outputs, batch)
    distill, cikd = jnp.zeros(()), jnp.zeros(())
    # the teacher is never trained by the sub-configurations' terms: cut its gradient once
    frozen = dataclasses.replace(teacher, outputs=jax.lax.stop_gradient(teacher.outputs),
                                 features=jax.lax.stop_gradient(teacher.features))
    part = functools.partial(_sub_losses, model, tasks, batch, frozen, sub_labels)
    configs = sampler.configs(step)[1:] if step is not None else (sampler.narrowest,) + sampler.groups[int(group)]
    subs = [part(cfg) for cfg in configs]
    for lab, kd, ck in subs:
        labelled, distill, cikd = labelled + lab, distill + kd, cikd + ck
    return SandwichLosses(labelled, distill, cikd)
