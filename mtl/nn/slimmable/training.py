"""Sandwich-rule training of a slimmable model through the train step's model hook.

A :class:`~mtl.nn.slimmable.model.SlimmableMultiTask` defines
``train_losses(batch, tasks) -> (losses [T], aux_loss)`` (:mod:`mtl.train.forward`), so the
one jitted, sharded train step trains it with the sandwich rule and no branch of its own:

* ``losses[t]`` - task ``t``'s label loss summed over the configurations that use labels
  (the widest; also the sub-configurations when ``sub_labels``). Any
  ``optim.aggregator`` weighs these, as for every model.
* ``aux_loss = kd_weight * in-place distillation + cikd_weight * CIKD``, summed over the
  ``n - 1`` sub-configurations (narrowest + ``n - 2`` random ones), teacher = the widest
  configuration of the same step, never trained by either term (stop-gradient).

The ``n - 2`` random configurations are one of the sampler's fixed groups
(:attr:`SandwichSampler.groups`: the pool of configurations shuffled once and cut into
groups of ``n - 2``). The model declares ``train_variants`` = the number of groups; the
train step is one compiled program per group and picks one per step on the host
(:meth:`mtl.train.step.Steps.variant_of`: a function of the run's seed and the step
number, so a resumed run uses the same groups as an uninterrupted one).

Configured by ``model.arch_kwargs.sandwich`` (a dict of :class:`SandwichSpec` fields)::

    c.model.arch_kwargs = dict(widths=(0.25, 0.5, 0.75, 1.0),
                               sandwich=dict(n=4, kd_weight=1.0, cikd_weight=1.0))

``n=1`` trains the widest configuration alone; ``only={"encoder": w, "decoders": {...}}``
trains one fixed configuration alone (the separately trained fixed-width baseline).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from mtl.nn.slimmable.sandwich import SandwichSampler, sandwich_losses
from mtl.nn.slimmable.widths import WidthConfig


@dataclasses.dataclass(frozen=True)
class SandwichSpec:
    n: int = 4                 # configurations per step: widest, narrowest, n - 2 random
    kd_weight: float = 1.0     # in-place distillation weight
    cikd_weight: float = 1.0   # configuration-invariant KD weight
    sub_labels: bool = True    # sub-configurations also train on the labels
    pool_size: int = 16        # random configurations come from a pool of at most this many
                               # (cut into ceil(pool / (n - 2)) groups: one compiled program each)
    only: Any = None           # a width (everywhere), a WidthConfig or its JSON dict: train it alone

    def __post_init__(self):
        if int(self.n) < 1:
            raise ValueError(f"sandwich.n must be >= 1 (1 = the widest configuration only); got {self.n}")
        if float(self.kd_weight) < 0 or float(self.cikd_weight) < 0:
            raise ValueError(f"sandwich kd_weight / cikd_weight must be >= 0; got {self.kd_weight}, {self.cikd_weight}")
        only = self.only
        if hasattr(only, "to_dict"):  # an ml_collections ConfigDict from a config file
            only = only.to_dict()
        if isinstance(only, (int, float)):
            only = float(only)
        elif isinstance(only, Mapping):
            only = WidthConfig(float(only.get("encoder", 1.0)), dict(only.get("decoders", {})))
        object.__setattr__(self, "only", only)
        object.__setattr__(self, "n", int(self.n))

    @classmethod
    def from_kwargs(cls, kw) -> "SandwichSpec":
        if kw is None:
            return cls()
        if isinstance(kw, SandwichSpec):
            return kw
        kw = dict(kw)
        names = [f.name for f in dataclasses.fields(cls)]
        bad = [k for k in kw if k not in names]
        if bad:
            raise TypeError(f"model.arch_kwargs.sandwich has no option(s) {bad}; its options are {names}")
        return cls(**kw)

    def sampler(self, widths, tasks) -> SandwichSampler:
        return SandwichSampler(tuple(widths), tuple(tasks), n=max(self.n, 2), seed=0, pool_size=self.pool_size)

    def variants(self, widths, tasks) -> int:
        """How many distinct step programs the rule needs: one per group of random configurations."""
        if self.only is not None or self.n <= 2:
            return 1
        return len(self.sampler(widths, tasks).groups)


def train_losses(model, batch, tasks, spec: SandwichSpec, variant: int = 0):
    """``(losses [T], aux_loss)`` of one step (see the module docstring) with the random
    configurations of group ``variant``."""
    from mtl.tasks import losses_from_outputs

    if spec.only is not None or spec.n == 1:
        cfg = model.config(spec.only if spec.only is not None else None)
        return losses_from_outputs(tasks, model(batch["inputs"], cfg), batch), jnp.zeros((), jnp.float32)
    sampler = spec.sampler(model.widths, model.task_names)
    sl = sandwich_losses(model, batch, tasks, sampler, group=int(variant), sub_labels=spec.sub_labels)
    return sl.labelled, spec.kd_weight * sl.distill + spec.cikd_weight * sl.cikd
