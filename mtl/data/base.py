"""The data contract: task descriptions, random-access sources, and a bundle of splits.

Every dataset in mtl (synthetic generators, IDX image files, tensorflow-datasets) is
exposed as *random-access sources*: objects with ``len(src)`` and ``src[indices]``
returning a batch dict

    {"inputs": np.ndarray [n, ...],
     "labels": {task_name: np.ndarray [n, ...]},
     "masks":  {task_name: np.ndarray bool [n]}}   # False = label missing

Random access (rather than iterators) is what makes batching deterministic for a
seed, lets each host read only its own shard, and makes resuming exact: the batch
at step ``s`` is a pure function of ``(seed, s)``.

Label conventions per task kind:
  classification: int32 [n] class ids in [0, dim)
  multilabel:     float32 [n, dim] of 0/1
  regression:     float32 [n, dim]
  language_model: int32 [n, L] next-token ids in [0, dim) (per-token classification)
  segmentation:   int32 [n, H, W] class ids in [0, dim); -1 = unlabelled pixel (ignored)
  dense_regression: float32 [n, H, W, dim]; NaN = invalid pixel (e.g. missing depth; ignored)
  edges:          float32 [n, H, W, 1] of 0/1; NaN = unlabelled pixel (ignored)
Per-pixel losses and metrics average over an image's labelled pixels; a sample with none
should have its mask False (``mtl.data.tfds_source`` does so).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol, Sequence

import numpy as np

TASK_KINDS = ("classification", "multilabel", "regression", "language_model",
              "segmentation", "dense_regression", "edges")  # per pixel: [n, H, W] int, [n, H, W, dim] float


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What a dataset says about one of its tasks (enough to build a head and a loss)."""

    name: str
    kind: str  # one of TASK_KINDS
    dim: int  # number of classes / labels / regression outputs

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if int(self.dim) < 1:
            raise ValueError(f"task {self.name!r}: dim must be >= 1, got {self.dim}")


class Source(Protocol):
    """A random-access split. ``src[idx]`` takes an int array of indices."""

    def __len__(self) -> int: ...

    def __getitem__(self, idx: np.ndarray) -> dict: ...


class ArraySource:
    """An in-memory split: inputs plus one label array (and optional mask) per task."""

    def __init__(self, inputs: np.ndarray, labels: Mapping[str, np.ndarray],
                 masks: Mapping[str, np.ndarray] | None = None):
        inputs = np.asarray(inputs)
        n = inputs.shape[0]
        labels = {k: np.asarray(v) for k, v in labels.items()}
        for k, v in labels.items():
            if v.shape[0] != n:
                raise ValueError(f"labels[{k!r}] has {v.shape[0]} rows but inputs have {n}")
        masks = {k: np.asarray(v, dtype=bool) for k, v in (masks or {}).items()}
        for k, v in masks.items():
            if k not in labels:
                raise ValueError(f"mask for unknown task {k!r}; tasks are {sorted(labels)}")
            if v.shape != (n,):
                raise ValueError(f"masks[{k!r}] must have shape ({n},), got {v.shape}")
        self.inputs = inputs
        self.labels = labels
        self.masks = masks

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, idx) -> dict:
        idx = np.asarray(idx)
        return {
            "inputs": self.inputs[idx],
            "labels": {k: v[idx] for k, v in self.labels.items()},
            "masks": {k: (self.masks[k][idx] if k in self.masks else np.ones(idx.shape, bool))
                      for k in self.labels},
        }

    def subset(self, idx) -> "ArraySource":
        idx = np.asarray(idx)
        return ArraySource(self.inputs[idx], {k: v[idx] for k, v in self.labels.items()},
                           {k: v[idx] for k, v in self.masks.items()})


class SubsetSource:
    """A view of another source restricted to some indices (used to carve validation)."""

    def __init__(self, base: Source, indices: np.ndarray):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, idx) -> dict:
        return self.base[self.indices[np.asarray(idx)]]


@dataclasses.dataclass
class DataBundle:
    """A dataset ready for training: its splits and its tasks.

    ``val`` may be None: the pipeline then carves a validation split out of ``train``
    (never out of ``test``).
    """

    name: str
    tasks: Sequence[TaskInfo]
    train: Source
    test: Source
    val: Source | None = None
    input_shape: tuple = ()
    input_dtype: str = "float32"
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskInfo:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"dataset {self.name!r} has no task {name!r}; its tasks are {self.task_names}")
