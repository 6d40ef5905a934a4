"""Hard parameter sharing: one shared encoder, one head per task."""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from mtl.tasks import Task, TaskSet


class MultiTaskModel(nnx.Module):
    """``model(x) -> {task: prediction}``; ``model.features(x)`` is the shared representation.

    Heads sit on the encoder's output features: pooled ``[B, D]`` or per-token ``[B, L, D]``.
    """

    def __init__(self, encoder: nnx.Module, tasks: Sequence[Task], *, rngs: nnx.Rngs):
        # a plain tuple attribute (a tuple subclass confuses nnx's graph traversal under nnx.jit)
        self._tasks = tuple(TaskSet(tasks))
        self.encoder = encoder
        d = encoder.out_features
        self.heads = nnx.Dict({t.name: t.head.build(d, rngs=rngs) for t in self._tasks})

    @property
    def tasks(self) -> TaskSet:
        return TaskSet(self._tasks)

    @property
    def task_names(self) -> list[str]:
        return self.tasks.names

    def features(self, x):
        return self.encoder(x)

    def heads_from_features(self, z) -> dict:
        return {t.name: self.heads[t.name](z) for t in self.tasks}

    def __call__(self, x) -> dict:
        return self.heads_from_features(self.features(x))
