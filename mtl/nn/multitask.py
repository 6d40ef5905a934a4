"""Hard parameter sharing: one shared encoder, one head per task."""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from mtl.tasks import Task, TaskSet


def build_heads(tasks: Sequence[Task], in_features: int, rngs: nnx.Rngs) -> nnx.Dict:
    """One head module per task, keyed by task name, on features of size ``in_features``."""
    return nnx.Dict({t.name: t.head.build(in_features, rngs=rngs) for t in tasks})


class TaskHeads:
    """Mixin for models with one head per task: they store ``task_specs`` (a plain tuple —
    a tuple subclass confuses nnx's graph traversal under ``nnx.jit``) and get ``tasks``
    and ``task_names``."""

    task_specs: tuple

    @property
    def tasks(self) -> TaskSet:
        return TaskSet(self.task_specs)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.task_specs]


class MultiTaskModel(TaskHeads, nnx.Module):
    """``model(x) -> {task: prediction}``; ``model.features(x)`` is the shared representation.

    Heads sit on the encoder's output features: pooled ``[B, D]`` or per-token ``[B, L, D]``.
    """

    def __init__(self, encoder: nnx.Module, tasks: Sequence[Task], *, rngs: nnx.Rngs):
        self.task_specs = tuple(TaskSet(tasks))
        self.encoder = encoder
        self.heads = build_heads(self.task_specs, encoder.out_features, rngs)

    def features(self, x):
        return self.encoder(x)

    def heads_from_features(self, z) -> dict:
        return {t.name: self.heads[t.name](z) for t in self.tasks}

    def __call__(self, x) -> dict:
        return self.heads_from_features(self.features(x))
