"""Tasks: what is predicted, how it is scored, and the masked per-task losses.

A ``Task`` bundles a name, a head spec, a per-sample loss, per-sample metrics and, for
each metric, whether higher is better. ``TaskSet`` is an ordered collection of tasks
(the order fixes the row order of per-task loss vectors and Jacobians).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from mtl.metrics import HIGHER_IS_BETTER
from mtl.nn.heads import HEADS, HeadSpec


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One task. ``loss``/``metrics`` default to the head's; ``higher_is_better`` defaults
    from the metric names the library knows (accuracy: True, mse/mae: False)."""

    name: str
    head: HeadSpec
    loss: Callable | None = None
    metrics: Mapping[str, Callable] | None = None
    higher_is_better: Mapping[str, bool] | None = None

    def __post_init__(self):
        if not isinstance(self.head, HeadSpec):
            raise TypeError(f"task {self.name!r}: head must be a HeadSpec (mtl.heads.Classification, ...); got {self.head!r}")
        if self.loss is None:
            object.__setattr__(self, "loss", self.head.default_loss)
        if self.metrics is None:
            object.__setattr__(self, "metrics", dict(self.head.default_metrics))
        hib = dict(self.higher_is_better or {})
        for m in self.metrics:
            if m not in hib:
                if m not in HIGHER_IS_BETTER:
                    raise ValueError(f"task {self.name!r}: say whether higher is better for metric {m!r} "
                                     "(higher_is_better={...})")
                hib[m] = HIGHER_IS_BETTER[m]
        object.__setattr__(self, "higher_is_better", hib)

    @property
    def primary_metric(self) -> str:
        return next(iter(self.metrics))

    @classmethod
    def from_info(cls, info, hidden: Sequence[int] = ()) -> "Task":
        """Default task for a dataset's ``TaskInfo`` (kind + dim)."""
        return cls(info.name, HEADS[info.kind](out=int(info.dim), hidden=tuple(hidden)))

    def to_json(self) -> dict:
        return {"name": self.name, "head": self.head.to_json(), "metrics": list(self.metrics),
                "higher_is_better": dict(self.higher_is_better)}


class TaskSet(tuple):
    """An ordered tuple of tasks with lookup by name."""

    def __new__(cls, tasks: Sequence[Task]):
        tasks = tuple(tasks)
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique; got {names}")
        if not tasks:
            raise ValueError("a multi-task model needs at least one task")
        return super().__new__(cls, tasks)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self]

    def __getitem__(self, key):
        if isinstance(key, str):
            for t in self:
                if t.name == key:
                    return t
            raise KeyError(f"no task {key!r}; tasks are {self.names}")
        return super().__getitem__(key)


def masked_mean(values, mask):
    """Mean of ``values`` [B] over samples where ``mask`` is True; 0 when none are."""
    mask = mask.astype(bool)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    count = jnp.sum(mask)
    return total / jnp.maximum(count, 1)


def _label_and_mask(task: Task, pred, batch):
    if task.name not in batch["labels"]:
        raise KeyError(f"batch has no labels for task {task.name!r}; it has {sorted(batch['labels'])}")
    y = jnp.asarray(batch["labels"][task.name])
    task.head.check_labels(task.name, pred.shape, y.shape, y.dtype)
    masks = batch.get("masks") or {}
    m = masks.get(task.name)
    m = jnp.ones(y.shape[:1], bool) if m is None else m.astype(bool)
    # zero out missing labels *before* the loss so NaN placeholders cannot leak into gradients
    y = jnp.where(m.reshape(m.shape + (1,) * (y.ndim - 1)), y, jnp.zeros((), y.dtype))
    return y, m


def losses_from_outputs(tasks: Sequence[Task], outputs: Mapping, batch) -> jax.Array:
    """Per-task masked mean losses ``[T]`` (task order) from model outputs and a batch."""
    out = []
    for t in tasks:
        y, m = _label_and_mask(t, outputs[t.name], batch)
        out.append(masked_mean(t.loss(outputs[t.name], y), m))
    return jnp.stack(out)


def metric_sums(tasks: Sequence[Task], outputs: Mapping, batch) -> dict:
    """``{task: {metric: (sum, count)}}`` over the batch's labelled samples (incl. 'loss')."""
    res = {}
    for t in tasks:
        pred = outputs[t.name]
        y, m = _label_and_mask(t, pred, batch)
        count = jnp.sum(m).astype(jnp.float32)
        d = {"loss": (jnp.sum(jnp.where(m, t.loss(pred, y), 0.0)), count)}
        for name, fn in t.metrics.items():
            d[name] = (jnp.sum(jnp.where(m, fn(pred, y), 0.0)), count)
        res[t.name] = d
    return res
