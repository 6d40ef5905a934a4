"""The sandwich rule as a sampler plus a pure loss combinator (no train-step branches).

Each step trains ``n`` width configurations: the widest, the narrowest, and ``n - 2``
random ones. Widths are static, so the random ones are drawn either

* on the host, :meth:`SandwichSampler.configs` ``(step)`` - deterministic in
  ``(seed, step)`` (exact resume), each part's width uniform over the width set; a step
  jitted with these as static arguments compiles once per distinct tuple; or
* inside the jitted step, :meth:`SandwichSampler.indices` ``(key)`` - indices into a fixed
  :attr:`SandwichSampler.pool` of configurations, dispatched with :func:`switch_config`
  (``lax.switch``: the program holds one branch per pool entry, compiled once, and runs
  only the chosen one). The pool is the whole grid when it has at most ``pool_size``
  entries, else ``pool_size`` distinct configurations drawn once from ``seed``.

:func:`sandwich_losses` composes one step's objective from the parts in this package.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

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

    def indices(self, key) -> jax.Array:
        """``n - 2`` uniform indices into :attr:`pool` (jittable)."""
        return jax.random.randint(key, (int(self.n) - 2,), 0, len(self.pool))


def switch_config(index, pool: Sequence[WidthConfig], fn, *operands):
    """``fn(pool[index], *operands)`` with a traced ``index`` (``lax.switch`` over the pool).
    Every branch must return arrays of the same shapes (losses, not features)."""
    return jax.lax.switch(index, [jax.checkpoint(functools.partial(fn, cfg)) for cfg in pool], *operands)


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


def sandwich_losses(model, batch, tasks, sampler: SandwichSampler, *, step=None, key=None,
                    sub_labels: bool = True) -> SandwichLosses:
    """One step's sandwich objective: the widest configuration on the labels; the narrowest
    and ``n - 2`` random ones distil from it (in-place + CIKD) and, if ``sub_labels``, also
    train on the labels. Random configurations come from ``sampler.configs(step)`` (host,
    static) when ``step`` is given, else from ``sampler.indices(key)`` over the pool."""
    from mtl.tasks import losses_from_outputs

    if (step is None) == (key is None):
        raise ValueError("sandwich_losses needs exactly one of step= (host sampling) or key= (in-jit sampling)")
    teacher = model.forward(batch["inputs"], sampler.widest)
    labelled = losses_from_outputs(tasks, teacher.outputs, batch)
    distill, cikd = jnp.zeros(()), jnp.zeros(())
    # the teacher is never trained by the sub-configurations' terms: cut its gradient before
    # it enters them (also keeps zero cotangents of the teacher out of the lax.switch branches)
    frozen = dataclasses.replace(teacher, outputs=jax.lax.stop_gradient(teacher.outputs),
                                 features=jax.lax.stop_gradient(teacher.features))
    part = functools.partial(_sub_losses, model, tasks, batch, frozen, sub_labels)
    if step is not None:
        subs = [part(cfg) for cfg in sampler.configs(step)[1:]]
    else:
        subs = [part(sampler.narrowest)]
        subs += [switch_config(i, sampler.pool, lambda cfg: part(cfg)) for i in sampler.indices(key)]
    for lab, kd, ck in subs:
        labelled, distill, cikd = labelled + lab, distill + kd, cikd + ck
    return SandwichLosses(labelled, distill, cikd)
