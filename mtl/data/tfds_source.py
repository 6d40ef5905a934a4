"""tensorflow-datasets splits as random-access sources (no TensorFlow needed).

``tfds.data_source(name, split=...)`` returns an ArrayRecord-backed sequence of
per-example numpy dicts. :class:`TfdsSource` reads the requested records and stacks
them into mtl's batch dict; :func:`tfds_bundle` builds a whole :class:`DataBundle`
and infers task dims from the dataset's feature info. ``tensorflow_datasets`` is
imported lazily, only by the functions that open a dataset.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mtl.data.base import DataBundle, TaskInfo


# ------------------------------------------------------------------ preprocessing


def unit_float(x: np.ndarray) -> np.ndarray:
    """uint8 images (0..255) -> float32 in [0, 1]."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"unit_float expects uint8 values, got {x.dtype}")
    return x.astype(np.float32) / np.float32(255.0)


def auto_inputs(x: np.ndarray) -> np.ndarray:
    """Default input preprocessing: uint8 -> float32 / 255, other floats -> float32,
    anything else (e.g. integer token ids) unchanged."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return unit_float(x)
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32)
    return x


PREPROCESSORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "auto": auto_inputs,
    "unit_float": unit_float,
    "float32": lambda x: np.asarray(x, np.float32),
    "int32": lambda x: np.asarray(x, np.int32),
    "none": lambda x: np.asarray(x),
}


def _preprocessor(spec) -> Callable[[np.ndarray], np.ndarray]:
    if callable(spec):
        return spec
    if spec is None:
        return PREPROCESSORS["none"]
    if spec not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessing {spec!r}; use a callable or one of "
                         f"{sorted(PREPROCESSORS)}")
    return PREPROCESSORS[spec]


# -------------------------------------------------------------------- features


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def feature_names(features) -> list[str]:
    """All feature paths of a tfds FeaturesDict, nested ones as ``"outer/inner"``."""
    names = []
    for key in features.keys():
        sub = features[key]
        inner = getattr(sub, "feature", sub)  # look through Sequence(...)
        if hasattr(inner, "keys") and callable(inner.keys):
            names += [f"{key}/{n}" for n in feature_names(inner)]
        else:
            names.append(key)
    return names


def get_feature(features, path: str, dataset: str = "dataset"):
    """The tfds feature object at ``path`` (``"a/b"`` for nested dicts).

    Raises ValueError listing the available feature paths when it does not exist."""
    node = features
    for part in path.split("/"):
        inner = getattr(node, "feature", node)
        if not (hasattr(inner, "keys") and part in inner.keys()):
            avail = feature_names(features)
            raise ValueError(f"{dataset} has no feature {path!r}{_did_you_mean(path, avail)}; "
                           f"its features are {avail}")
        node = inner[part]
    return node


def _lookup(record: Mapping, path: str):
    value = record
    for part in path.split("/"):
        value = value[part]
    return value


# ---------------------------------------------------------------------- source


class TfdsSource:
    """A random-access split over per-example feature dicts (e.g. ``tfds.data_source``).

    ``src[idx]`` reads records ``idx`` and returns ``{"inputs", "labels", "masks"}``:

    * ``inputs``: feature ``inputs``, stacked, then ``preprocess[inputs]``
      (default ``"auto"``: uint8 -> float32 / 255, see :func:`auto_inputs`);
    * ``labels[task]``: feature ``labels[task]``, stacked, then ``preprocess[feature]``
      if given, then converted to mtl's convention for the task's kind:
      classification int32 [n]; regression / multilabel float32 [n, dim]. Tasks in
      ``multihot`` hold lists of class ids per example (tfds ``Sequence(ClassLabel)``)
      and become 0/1 vectors of length dim (no preprocessing applied). Class ids
      outside ``[0, dim)`` raise ValueError;
    * ``masks``: all True (tfds features have no notion of a missing label).

    ``records`` is any object with ``len()`` and ``records[i]`` -> dict; its batched
    ``__getitems__`` is used when it exists and works. Features must have a fixed shape
    per example to be stacked (except ``multihot`` tasks). Nested features are named
    ``"outer/inner"``.
    """

    def __init__(self, records, *, inputs: str, tasks: Sequence[TaskInfo],
                 labels: Mapping[str, str] | None = None,
                 preprocess: Mapping[str, Any] | None = None,
                 multihot: Sequence[str] = (), name: str = "tfds"):
        self.records = records
        self.name = name
        self.inputs = inputs
        self.tasks = list(tasks)
        task_names = [t.name for t in self.tasks]
        self.labels = dict(labels) if labels is not None else {t: t for t in task_names}
        if sorted(self.labels) != sorted(task_names):
            raise ValueError(f"labels must map every task to a feature: tasks {task_names}, "
                             f"labels for {sorted(self.labels)}")
        self.multihot = set(multihot)
        multilabel = [t.name for t in self.tasks if t.kind == "multilabel"]
        if not self.multihot <= set(multilabel):
            raise ValueError(f"multihot tasks {sorted(self.multihot - set(multilabel))} are not "
                             f"among the multilabel tasks {multilabel}")
        preprocess = dict(preprocess or {})
        self._prep = {f: _preprocessor(p) for f, p in preprocess.items()}
        self._prep.setdefault(inputs, auto_inputs)
        used = {inputs, *self.labels.values()}
        unused = sorted(set(preprocess) - used)
        if unused:
            raise ValueError(f"preprocess given for {unused}, which are neither the input "
                             f"feature {inputs!r} nor a label feature {sorted(used - {inputs})}")
        info = getattr(records, "dataset_info", None)
        features = getattr(info, "features", None)
        if features is not None:  # fail at construction, not at the first batch
            for path in sorted(used):
                get_feature(features, path, dataset=f"tfds dataset {name!r}")
        self._batched_reads = hasattr(records, "__getitems__")

    def __len__(self) -> int:
        return len(self.records)

    def _read(self, keys: list[int]) -> list:
        if self._batched_reads and keys:
            try:
                return list(self.records.__getitems__(keys))
            except TypeError:
                # e.g. tfds.testing.mock_data (4.9.10) installs an unbound __getitems__;
                # read one by one from now on (a real error re-raises below).
                out = [self.records[k] for k in keys]
                self._batched_reads = False
                return out
        return [self.records[k] for k in keys]

    def _stack(self, values: list, feature: str) -> np.ndarray:
        try:
            return np.stack([np.asarray(v) for v in values])
        except ValueError:
            shapes = sorted({np.shape(v) for v in values})
            raise ValueError(f"feature {feature!r} of {self.name!r} has per-example shapes "
                             f"{shapes[:5]}; only fixed-shape features can be batched") from None

    def _label(self, task: TaskInfo, values: list) -> np.ndarray:
        feature = self.labels[task.name]
        n = len(values)
        if task.name in self.multihot:
            out = np.zeros((n, task.dim), np.float32)
            for i, ids in enumerate(values):
                ids = np.asarray(ids, np.int64).reshape(-1)
                if ids.size and (ids.min() < 0 or ids.max() >= task.dim):
                    raise ValueError(f"task {task.name!r}: class id outside [0, {task.dim}) "
                                     f"in feature {feature!r}")
                out[i, ids] = 1.0
            return out
        y = self._prep.get(feature, np.asarray)(self._stack(values, feature))
        if task.kind == "classification":
            y = y.reshape(n, -1) if y.ndim > 1 else y
            if y.shape != (n,) and y.shape != (n, 1):
                raise ValueError(f"task {task.name!r}: classification labels must be one class "
                                 f"id per example, feature {feature!r} gives shape {y.shape[1:]}")
            y = np.asarray(y.reshape(n), np.int32)
            if n and (y.min() < 0 or y.max() >= task.dim):
                bad = y[(y < 0) | (y >= task.dim)][0]
                raise ValueError(f"task {task.name!r}: class id {bad} from feature {feature!r} "
                                 f"is outside [0, {task.dim})")
            return y
        y = np.asarray(y, np.float32).reshape(n, -1)
        if y.shape[1] != task.dim:
            raise ValueError(f"task {task.name!r} ({task.kind}, dim {task.dim}): feature "
                             f"{feature!r} gives {y.shape[1]} values per example")
        return y

    def __getitem__(self, idx) -> dict:
        idx = np.asarray(idx)
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
        n = len(self)
        flat = idx.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + n, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            bad = idx.reshape(-1)[(flat < 0) | (flat >= n)][0]
            raise IndexError(f"index {bad} out of range for {self.name!r} with {n} records")
        empty = flat.size == 0
        keys = [0] if empty else [int(k) for k in flat]  # read one to learn the shapes
        records = self._read(keys)
        x = self._prep[self.inputs](self._stack([_lookup(r, self.inputs) for r in records],
                                                self.inputs))
        labels = {t.name: self._label(t, [_lookup(r, self.labels[t.name]) for r in records])
                  for t in self.tasks}
        if empty:
            x, labels = x[:0], {k: v[:0] for k, v in labels.items()}
        shape = idx.shape
        return {"inputs": x.reshape(shape + x.shape[1:]),
                "labels": {k: v.reshape(shape + v.shape[1:]) for k, v in labels.items()},
                "masks": {t.name: np.ones(shape, bool) for t in self.tasks}}

    @classmethod
    def open(cls, name: str, split: str, *, inputs: str, tasks: Sequence[TaskInfo],
             labels: Mapping[str, str] | None = None, preprocess=None, multihot=(),
             data_dir=None, download: bool = False, **data_source_kwargs) -> "TfdsSource":
        """``TfdsSource(tfds.data_source(name, split=split, data_dir=...), ...)``."""
        records = open_data_source(name, split, data_dir=data_dir, download=download,
                                   **data_source_kwargs)
        return cls(records, inputs=inputs, tasks=tasks, labels=labels, preprocess=preprocess,
                   multihot=multihot, name=f"{name}:{split}")


def open_data_source(name: str, split: str, *, data_dir=None, download: bool = False,
                     **kwargs):
    """``tfds.data_source(...)`` with an error that says what to do when it fails."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                                **kwargs)
    except Exception as e:  # tfds raises many types (NotImplementedError, DatasetNotFound, ...)
        raise RuntimeError(
            f"could not open tfds dataset {name!r} split {split!r} (data_dir={data_dir}, "
            f"download={download}): {type(e).__name__}: {e}\nRandom access needs the dataset "
            "prepared in array_record format (tfds.builder(name, file_format='array_record')"
            ".download_and_prepare() on a machine with network access, then pass its "
            "data_dir).") from e


# ---------------------------------------------------------------------- bundle


def infer_dim(feature, kind: str) -> tuple[int, bool]:
    """``(dim, multihot)`` for a task of ``kind`` read from tfds ``feature``.

    classification: ``ClassLabel.num_classes``; multilabel: a ``Sequence(ClassLabel)``
    (class-id lists, multihot=True) or a fixed 0/1 vector of length k; regression: a
    scalar (1) or fixed vector of length k. Raises ValueError when it cannot tell.
    """
    import tensorflow_datasets as tfds

    cls_label = tfds.features.ClassLabel
    inner = getattr(feature, "feature", None)
    if kind == "classification" and isinstance(feature, cls_label):
        return int(feature.num_classes), False
    if kind == "multilabel" and isinstance(feature, tfds.features.Sequence) \
            and isinstance(inner, cls_label):
        return int(inner.num_classes), True
    shape = getattr(feature, "shape", None)
    fixed = shape is not None and all(s is not None for s in shape)
    if kind == "regression" and fixed and len(shape) <= 1:
        return int(np.prod(shape, dtype=np.int64)), False
    if kind == "multilabel" and fixed and len(shape) == 1:
        return int(shape[0]), False
    raise ValueError(f"cannot infer the dim of a {kind} task from feature {feature!r}; "
                     "pass it explicitly as (feature, kind, dim)")


def _parse_tasks(tasks) -> list[tuple[str, str, str, int | None]]:
    """-> [(task, feature, kind, dim or None)]."""
    if tasks is None:
        tasks = {"label": "label"}
    out = []
    for task, spec in dict(tasks).items():
        if isinstance(spec, str):
            spec = (spec,)
        spec = tuple(spec)
        if not 1 <= len(spec) <= 3:
            raise ValueError(f"task {task!r}: expected feature, (feature, kind) or "
                             f"(feature, kind, dim), got {spec!r}")
        feature, kind, dim = spec + (None, "classification", None)[len(spec):]
        out.append((task, feature, kind, dim))
    return out


def tfds_bundle(name: str, tasks: Mapping[str, Any] | None = None, *, inputs: str = "image",
                train_split: str = "train", test_split: str = "test",
                val_split: str | None = None, data_dir=None, preprocess=None,
                download: bool = False, data_source_kwargs: Mapping | None = None) -> DataBundle:
    """A :class:`DataBundle` over tfds splits, read with ``tfds.data_source``.

    ``tasks`` maps task name -> ``feature``, ``(feature, kind)`` or
    ``(feature, kind, dim)``; kind defaults to classification and dim is inferred from
    the feature info (:func:`infer_dim`) when not given; a given dim must match the
    ClassLabel's. Default ``{"label": "label"}``. ``inputs`` names the input feature;
    ``preprocess`` maps feature -> callable or name in :data:`PREPROCESSORS` (the
    input defaults to ``"auto"``: uint8 -> float32 / 255). Splits accept tfds slicing
    (``"train[:90%]"``); ``val_split=None`` leaves validation to the pipeline.
    ``download`` defaults to False: nothing is fetched unless asked.
    """
    kwargs = dict(data_source_kwargs or {})
    opened = {"train": open_data_source(name, train_split, data_dir=data_dir,
                                        download=download, **kwargs)}
    features = opened["train"].dataset_info.features
    task_infos, labels, multihot = [], {}, []
    for task, feature_path, kind, dim in _parse_tasks(tasks):
        feature = get_feature(features, feature_path, dataset=f"tfds dataset {name!r}")
        try:
            inferred, is_multihot = infer_dim(feature, kind)
        except ValueError:
            if dim is None:
                raise
            inferred, is_multihot = None, False
        if dim is None:
            dim = inferred
        elif inferred is not None and kind == "classification" and int(dim) != inferred:
            raise ValueError(f"task {task!r}: dim={dim} but feature {feature_path!r} has "
                             f"{inferred} classes")
        task_infos.append(TaskInfo(task, kind, int(dim)))
        labels[task] = feature_path
        if is_multihot:
            multihot.append(task)
    splits = {"train": train_split, "test": test_split}
    if val_split is not None:
        splits["val"] = val_split
    sources = {}
    for key, split in splits.items():
        records = opened[key] if key in opened else open_data_source(
            name, split, data_dir=data_dir, download=download, **kwargs)
        sources[key] = TfdsSource(records, inputs=inputs, tasks=task_infos, labels=labels,
                                  preprocess=preprocess, multihot=multihot,
                                  name=f"{name}:{split}")
    first = sources["train"][np.arange(min(1, len(sources["train"])))]["inputs"]
    return DataBundle(name=name, tasks=task_infos, train=sources["train"],
                      test=sources["test"], val=sources.get("val"),
                      input_shape=tuple(first.shape[1:]), input_dtype=str(first.dtype),
                      meta={"tfds_name": name, "splits": splits, "data_dir": data_dir,
                            "label_features": labels})
