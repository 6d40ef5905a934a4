"""tensorflow-datasets splits as random-access sources (no TensorFlow needed).

``tfds.data_source(name, split=...)`` returns an ArrayRecord-backed sequence of
per-example numpy dicts. :class:`TfdsSource` reads the requested records and stacks
them into mtl's batch dict; :func:`tfds_bundle` builds a whole :class:`DataBundle`
and infers task dims from the dataset's feature info. ``tensorflow_datasets`` is
imported lazily, only by the functions that open a dataset.

Per-pixel tasks (kinds ``segmentation``, ``dense_regression``, ``edges``) read label maps
``[H, W]`` / ``[H, W, 1]`` (``[H, W, C]`` for dense regression) of the input image's size;
:class:`PixelLabels` says how unlabelled pixels are marked, and ``resize``
(:class:`mtl.data.resize.Resize`) brings images of varying or large size to a fixed one.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mtl.data.base import DataBundle, TaskInfo
from mtl.data.resize import Resize

PIXEL_KINDS = ("segmentation", "dense_regression", "edges")
SOURCE_KINDS = ("classification", "regression", "multilabel") + PIXEL_KINDS


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


# ----------------------------------------------------------- per-pixel labels


@dataclasses.dataclass(frozen=True)
class PixelLabels:
    """How a per-pixel task's label map is read (kinds segmentation, dense_regression, edges).

    * ``ignore`` (segmentation, edges): the value of unlabelled pixels (e.g. 255). They become
      -1 (segmentation) / NaN (edges), which the per-pixel losses and metrics leave out;
    * ``zero_is_invalid`` (dense_regression, default True): a pixel whose values are all 0 is
      invalid (depth sensors write 0 where they have no reading); non-finite values are always
      invalid. Invalid pixels become NaN;
    * ``from_segmentation`` (edges): the feature is a segmentation label map (integer ids) and
      the edge map is derived from it *after* resizing, with the rule of
      :func:`mtl.data.dense_fashion.boundaries` at equal depth everywhere: a pixel is an edge
      when a 4-neighbour has a different label, so contours are 2 pixels thick (one on each
      side) at the output resolution; the ignore value counts as one more label (a contour
      against an unlabelled region is a contour) and no pixel is unlabelled.

    A sample none of whose pixels is labelled gets mask False for that task.
    """

    ignore: int | None = None
    zero_is_invalid: bool = True
    from_segmentation: bool = False

    @classmethod
    def of(cls, spec) -> "PixelLabels":
        """``None`` (defaults), a :class:`PixelLabels` or a mapping of its fields."""
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        if not hasattr(spec, "items"):
            raise ValueError(f"per-pixel label options must be a mapping or PixelLabels, got {spec!r}")
        spec = dict(spec.items())
        unknown = sorted(set(spec) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"PixelLabels got unknown options {unknown}; it takes ignore, "
                             "zero_is_invalid, from_segmentation")
        return cls(**spec)

    def check(self, task: TaskInfo) -> None:
        if self.ignore is not None and (isinstance(self.ignore, bool)
                                        or not isinstance(self.ignore, (int, np.integer))):
            raise ValueError(f"task {task.name!r}: ignore must be an integer label value, got {self.ignore!r}")
        if self.ignore is not None and task.kind == "dense_regression":
            raise ValueError(f"task {task.name!r}: ignore is for segmentation / edges labels; a "
                             "dense_regression task marks invalid pixels by 0 (zero_is_invalid) or NaN")
        if self.from_segmentation and task.kind != "edges":
            raise ValueError(f"task {task.name!r}: from_segmentation derives an edges task, not a {task.kind} one")
        if self.from_segmentation and self.ignore is not None:
            raise ValueError(f"task {task.name!r}: ignore has no effect on edges derived from a segmentation "
                             "map (the ignore value counts as one more label); drop it")


def check_pixel_feature(feature, kind: str, path: str, task: str = "?") -> None:
    """ValueError unless tfds ``feature`` (when its shape is known) is a per-pixel map:
    ``[H, W]`` or ``[H, W, 1]`` (dense_regression: ``[H, W, C]``)."""
    shape = getattr(feature, "shape", None)
    if shape is None:
        return
    shape = tuple(shape)
    if len(shape) == 2 or (len(shape) == 3 and (kind == "dense_regression" or shape[2] == 1)):
        return
    want = "[H, W] or [H, W, C]" if kind == "dense_regression" else "[H, W] or [H, W, 1]"
    raise ValueError(f"task {task!r} ({kind}): feature {path!r} has per-example shape {shape}, not a "
                     f"per-pixel label map {want}")


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
    * per-pixel tasks (kinds segmentation, dense_regression, edges; options per task in
      ``pixel``, :class:`PixelLabels`): the label map of each example, ``[H, W]`` or
      ``[H, W, 1]`` (dense regression ``[H, W, C]`` with ``C = dim``) of the input image's
      ``H x W``, is preprocessed (``preprocess[feature]``, per example), converted to the
      per-pixel conventions of :mod:`mtl.data.base` (segmentation int32 ``[H, W]`` with -1 for
      ``ignore``; dense regression float32 ``[H, W, C]`` with NaN for invalid pixels; edges
      float32 ``[H, W, 1]`` of 0/1, NaN for ``ignore``, or derived from a segmentation map),
      then resized (``resize``) and stacked;
    * ``masks``: True (tfds features have no notion of a missing label), except for a
      per-pixel task on an example without a single labelled pixel.

    ``resize`` (:class:`~mtl.data.resize.Resize`, a ``(H, W)`` pair or a mapping of its
    fields; default None) brings every example to a fixed size: the input is preprocessed per
    example then resized (bilinear or area), label maps follow with the same window (nearest;
    float maps nearest or masked bilinear), so images of varying size can be batched.

    ``records`` is any object with ``len()`` and ``records[i]`` -> dict; its batched
    ``__getitems__`` is used when it exists and works. Features must have a fixed shape
    per example to be stacked (except ``multihot`` tasks). Nested features are named
    ``"outer/inner"``.
    """

    def __init__(self, records, *, inputs: str, tasks: Sequence[TaskInfo],
                 labels: Mapping[str, str] | None = None,
                 preprocess: Mapping[str, Any] | None = None,
                 multihot: Sequence[str] = (), name: str = "tfds",
                 pixel: Mapping[str, Any] | None = None, resize=None):
        self.records = records
        self.name = name
        self.inputs = inputs
        self.tasks = list(tasks)
        task_names = [t.name for t in self.tasks]
        for t in self.tasks:
            if t.kind not in SOURCE_KINDS:
                raise ValueError(f"task {t.name!r}: TfdsSource reads the kinds {SOURCE_KINDS}, not {t.kind!r}")
            if t.kind == "edges" and t.dim != 1:
                raise ValueError(f"task {t.name!r}: an edges task has dim 1, got {t.dim}")
        dense = [t.name for t in self.tasks if t.kind in PIXEL_KINDS]
        pixel = dict(pixel.items()) if pixel is not None else {}
        if not set(pixel) <= set(dense):
            raise ValueError(f"pixel options given for {sorted(set(pixel) - set(dense))}, which are not "
                             f"per-pixel tasks (those are {dense})")
        self.pixel = {n: PixelLabels.of(pixel.get(n)) for n in dense}
        for t in self.tasks:
            if t.name in self.pixel:
                self.pixel[t.name].check(t)
        self.resize = Resize.of(resize)
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
            found = {path: get_feature(features, path, dataset=f"tfds dataset {name!r}")
                     for path in sorted(used)}
            self._check_pixel_features(found)
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

    def _check_pixel_features(self, found: Mapping) -> None:
        dense = [t for t in self.tasks if t.kind in PIXEL_KINDS]
        if not dense:
            return
        img = tuple(getattr(found[self.inputs], "shape", None) or ())
        if img and len(img) not in (2, 3):
            raise ValueError(f"per-pixel tasks {[t.name for t in dense]} need an image input "
                             f"[H, W, C]; feature {self.inputs!r} has per-example shape {img}")
        for t in dense:
            path = self.labels[t.name]
            kind = "segmentation" if self.pixel[t.name].from_segmentation else t.kind
            check_pixel_feature(found[path], kind, path, t.name)
            shape = tuple(getattr(found[path], "shape", None) or ())
            if img and shape and None not in img[:2] + shape[:2] and img[:2] != shape[:2]:
                raise ValueError(f"task {t.name!r}: label map {path!r} is {shape[0]}x{shape[1]} but the "
                                 f"input {self.inputs!r} is {img[0]}x{img[1]}; they must be the same size")

    def _pixel_label(self, task: TaskInfo, raw, hw, window, key: int) -> np.ndarray:
        """One example's per-pixel label map in mtl's convention, resized (see the class doc)."""
        feature, opt, kind = self.labels[task.name], self.pixel[task.name], task.kind
        y = np.asarray(self._prep[feature](np.asarray(raw)) if feature in self._prep else raw)
        seg_like = kind == "segmentation" or opt.from_segmentation
        if y.ndim == 3 and y.shape[-1] == 1 and kind != "dense_regression":
            y = y[..., 0]
        elif y.ndim == 2 and kind == "dense_regression":
            y = y[..., None]
        if y.ndim != (3 if kind == "dense_regression" else 2):
            want = "[H, W] or [H, W, C]" if kind == "dense_regression" else "[H, W] or [H, W, 1]"
            raise ValueError(f"task {task.name!r} ({kind}): feature {feature!r} of {self.name!r} has "
                             f"per-example shape {np.shape(raw)}, not a per-pixel label map {want}")
        if tuple(y.shape[:2]) != tuple(hw):
            raise ValueError(f"task {task.name!r}: label map {feature!r} is {y.shape[0]}x{y.shape[1]} but "
                             f"the input {self.inputs!r} is {hw[0]}x{hw[1]} (record {key} of "
                             f"{self.name!r}); they must be the same size")
        resize = self.resize
        if seg_like:
            if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
                raise ValueError(f"task {task.name!r}: feature {feature!r} must hold integer class ids "
                                 f"for {'derived edges' if opt.from_segmentation else 'segmentation'}, "
                                 f"got dtype {y.dtype}")
            y = y.astype(np.int64)
        if opt.from_segmentation:
            from mtl.data.dense_fashion import boundaries

            if resize is not None:
                y = resize.apply_labels(y, window)
            return boundaries(y, np.zeros(y.shape, np.float32)).astype(np.float32)[..., None]
        ignore = np.zeros(y.shape, bool) if opt.ignore is None else (y == opt.ignore)
        if kind == "segmentation":
            bad = ~ignore & ((y < 0) | (y >= task.dim))
            if bad.any():
                raise ValueError(f"task {task.name!r}: class id {y[bad][0]} in feature {feature!r} (record "
                                 f"{key}) is outside [0, {task.dim}) and not the ignore value {opt.ignore}")
            y = np.where(ignore, -1, y).astype(np.int32)
            return y if resize is None else resize.apply_labels(y, window)
        y = np.asarray(y, np.float32)
        if kind == "edges":
            bad = ~ignore & (y != 0) & (y != 1)
            if bad.any():
                raise ValueError(f"task {task.name!r}: edge maps hold 0/1 (or the ignore value "
                                 f"{opt.ignore}); feature {feature!r} (record {key}) has {y[bad][0]}")
            y = np.where(ignore, np.nan, y).astype(np.float32)[..., None]
            return y if resize is None else resize.apply_labels(y, window)
        if y.shape[-1] != task.dim:
            raise ValueError(f"task {task.name!r} (dense_regression, dim {task.dim}): feature {feature!r} "
                             f"gives {y.shape[-1]} values per pixel")
        invalid = ~np.isfinite(y).all(-1)
        if opt.zero_is_invalid:
            invalid |= (y == 0).all(-1)
        y = np.where(invalid[..., None], np.nan, y).astype(np.float32)
        return y if resize is None else resize.apply_values(y, window)

    def _inputs(self, raw: list, keys: list) -> tuple:
        """(stacked inputs, per-example input (H, W), per-example resize windows)."""
        prep = self._prep[self.inputs]
        if self.resize is None:
            return prep(self._stack(raw, self.inputs)), [np.shape(v)[:2] for v in raw], [None] * len(raw)
        xs, hws, windows = [], [], []
        for v, key in zip(raw, keys):
            img = np.asarray(prep(np.asarray(v)))
            img = img[..., None] if img.ndim == 2 else img
            if img.ndim != 3:
                raise ValueError(f"input {self.inputs!r} of {self.name!r} (record {key}) has shape "
                                 f"{img.shape}; resize takes images [H, W, C]")
            hws.append(img.shape[:2])
            windows.append(self.resize.window(img.shape[:2]))
            xs.append(self.resize.apply_image(img, windows[-1]))
        return np.stack(xs), hws, windows

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
        x, hws, windows = self._inputs([_lookup(r, self.inputs) for r in records], keys)
        labels, masks = {}, {}
        for t in self.tasks:
            values = [_lookup(r, self.labels[t.name]) for r in records]
            if t.kind not in PIXEL_KINDS:
                labels[t.name] = self._label(t, values)
                masks[t.name] = np.ones(len(keys), bool)
                continue
            y = self._stack([self._pixel_label(t, v, hw, w, k)
                             for v, hw, w, k in zip(values, hws, windows, keys)], self.labels[t.name])
            labels[t.name] = y
            flat_y = y.reshape(len(keys), -1)
            masks[t.name] = (flat_y != -1).any(1) if t.kind == "segmentation" else np.isfinite(flat_y).any(1)
        if empty:
            x = x[:0]
            labels, masks = {k: v[:0] for k, v in labels.items()}, {k: v[:0] for k, v in masks.items()}
        shape = idx.shape
        return {"inputs": x.reshape(shape + x.shape[1:]),
                "labels": {k: v.reshape(shape + v.shape[1:]) for k, v in labels.items()},
                "masks": {k: v.reshape(shape) for k, v in masks.items()}}

    @classmethod
    def open(cls, name: str, split: str, *, inputs: str, tasks: Sequence[TaskInfo],
             labels: Mapping[str, str] | None = None, preprocess=None, multihot=(),
             pixel=None, resize=None, data_dir=None, download: bool = False,
             **data_source_kwargs) -> "TfdsSource":
        """``TfdsSource(tfds.data_source(name, split=split, data_dir=...), ...)``."""
        records = open_data_source(name, split, data_dir=data_dir, download=download,
                                   **data_source_kwargs)
        return cls(records, inputs=inputs, tasks=tasks, labels=labels, preprocess=preprocess,
                   multihot=multihot, name=f"{name}:{split}", pixel=pixel, resize=resize)


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
    scalar (1) or fixed vector of length k; segmentation: the ``num_classes`` of a
    ``LabeledImage`` (or other ClassLabel-like feature); dense_regression: 1 for ``[H, W]``,
    C for ``[H, W, C]``; edges: 1. Raises ValueError when it cannot tell.
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
    if kind == "segmentation" and getattr(feature, "num_classes", None):
        return int(feature.num_classes), False
    if kind == "dense_regression" and shape is not None and (
            len(shape) == 2 or (len(shape) == 3 and shape[2] is not None)):
        return (1 if len(shape) == 2 else int(shape[2])), False
    if kind == "edges":
        return 1, False
    hint = " (a segmentation dim comes from a feature with num_classes, e.g. tfds.features.LabeledImage)" \
        if kind == "segmentation" else ""
    raise ValueError(f"cannot infer the dim of a {kind} task from feature {feature!r}; "
                     f"pass it explicitly as (feature, kind, dim){hint}")


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
                pixel: Mapping[str, Any] | None = None, resize=None,
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

    Per-pixel kinds (``segmentation``, ``dense_regression``, ``edges``): ``pixel`` maps such a
    task to its :class:`PixelLabels` options (or a dict of them, e.g. ``{"seg": {"ignore": 255},
    "edges": {"from_segmentation": True}}``) and ``resize`` (``(H, W)``, a dict of
    :class:`~mtl.data.resize.Resize` fields, or a Resize) fixes the example size; see
    :class:`TfdsSource`. Example::

        tfds_bundle("nyu_depth_v2", {"depth": ("depth", "dense_regression")},
                    test_split="validation", resize=(240, 320))
    """
    kwargs = dict(data_source_kwargs or {})
    opened = {"train": open_data_source(name, train_split, data_dir=data_dir,
                                        download=download, **kwargs)}
    features = opened["train"].dataset_info.features
    pixel = dict(pixel.items()) if pixel is not None else {}
    task_infos, labels, multihot = [], {}, []
    for task, feature_path, kind, dim in _parse_tasks(tasks):
        if kind not in SOURCE_KINDS:
            raise ValueError(f"task {task!r}: unknown kind {kind!r}{_did_you_mean(str(kind), SOURCE_KINDS)}; "
                             f"tfds tasks are one of {SOURCE_KINDS}")
        feature = get_feature(features, feature_path, dataset=f"tfds dataset {name!r}")
        if kind in PIXEL_KINDS:
            derived = PixelLabels.of(pixel.get(task)).from_segmentation
            check_pixel_feature(feature, "segmentation" if derived else kind, feature_path, task)
        try:
            inferred, is_multihot = infer_dim(feature, kind)
        except ValueError:
            if dim is None:
                raise
            inferred, is_multihot = None, False
        if dim is None:
            dim = inferred
        elif inferred is not None and kind in ("classification", "segmentation") and int(dim) != inferred:
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
                                  name=f"{name}:{split}", pixel=pixel, resize=resize)
    first = sources["train"][np.arange(min(1, len(sources["train"])))]["inputs"]
    return DataBundle(name=name, tasks=task_infos, train=sources["train"],
                      test=sources["test"], val=sources.get("val"),
                      input_shape=tuple(first.shape[1:]), input_dtype=str(first.dtype),
                      meta={"tfds_name": name, "splits": splits, "data_dir": data_dir,
                            "label_features": labels,
                            "pixel": {k: dataclasses.asdict(v) for k, v in sources["train"].pixel.items()},
                            "resize": None if sources["train"].resize is None
                            else sources["train"].resize.to_json()})
