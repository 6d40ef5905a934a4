"""``PerTaskModel``: task heads on an architecture that gives each task its own
representation (cross-stitch, MTAN, learning-to-branch), called like
``mtl.nn.MultiTaskModel`` (``model(x) -> {task: prediction}``).

The architecture is called as ``arch(x, train) -> ({task: [B, out_features]}, aux)``;
``train=True`` is the training forward (the trainer calls ``forward_with_aux``), ``False``
the deterministic one (``model(x)``, evaluation). ``aux`` may hold ``"loss"``, an already
weighted auxiliary objective the trainer adds.
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from mtl.nn.multitask import TaskHeads, build_heads
from mtl.tasks import Task, TaskSet


class PerTaskModel(TaskHeads, nnx.Module):
    """Heads on per-task features; no ``features`` (the training forward is not the
    deterministic one, e.g. learning-to-branch samples its branching)."""

    def __init__(self, architecture: nnx.Module, tasks: Sequence[Task], *, rngs: nnx.Rngs):
        self.task_specs = tuple(TaskSet(tasks))
        if tuple(architecture.task_names) != tuple(self.tasks.names):
            raise ValueError(f"the architecture was built for tasks {list(architecture.task_names)} "
                             f"but the model gets tasks {self.tasks.names} (same names, same order)")
        self.architecture = architecture
        self.heads = build_heads(self.task_specs, architecture.out_features, rngs)

    def _heads(self, feats: dict) -> dict:
        return {t.name: self.heads[t.name](feats[t.name]) for t in self.tasks}

    def forward_with_aux(self, x):
        feats, aux = self.architecture(x, train=True)
        return self._heads(feats), aux

    def __call__(self, x) -> dict:
        return self._heads(self.architecture(x, train=False)[0])


class PerTaskFeaturesModel(PerTaskModel):
    """A deterministic per-task architecture: also ``features(x) -> {task: [B, h]}`` and
    ``heads_from_features`` (as ``MoEMultiTaskModel``)."""

    def features(self, x) -> dict:
        return self.architecture(x, train=False)[0]

    def heads_from_features(self, feats: dict) -> dict:
        return self._heads(feats)
