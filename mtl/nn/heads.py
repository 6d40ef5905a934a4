"""Task heads: small specs that say what a task predicts and build the module for it.

A head spec knows its output size, builds an ``nnx`` module on top of the encoder's
features (``[B, D]`` or per-token ``[B, L, D]``), checks label shapes, and supplies the
default loss and metrics for its kind of task.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from mtl import losses as L
from mtl import metrics as M
from mtl.nn.layers import dense


class HeadModule(nnx.Module):
    """Optional hidden layers (ReLU) then a linear projection to ``out``."""

    def __init__(self, in_features: int, out: int, hidden: Sequence[int] = (), *, rngs: nnx.Rngs):
        layers, d = [], in_features
        for h in hidden:
            layers.append(dense(d, int(h), ("embed", "mlp"), rngs=rngs))
            d = int(h)
        self.hidden = nnx.List(layers)
        self.out = dense(d, out, ("embed", None), rngs=rngs)

    def __call__(self, x):
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.out(x)


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    out: int
    hidden: tuple = ()
    kind = "base"
    label_dtype = "float32"

    def build(self, in_features: int, *, rngs: nnx.Rngs) -> HeadModule:
        return HeadModule(in_features, self.out, tuple(self.hidden), rngs=rngs)

    def expected_label_shape(self, pred_shape) -> tuple:
        return tuple(pred_shape)

    def check_labels(self, task: str, pred_shape, label_shape, label_dtype) -> None:
        want = self.expected_label_shape(pred_shape)
        if tuple(label_shape) != want:
            raise ValueError(f"task {task!r}: labels have shape {tuple(label_shape)} but the {self.kind} "
                             f"head predicts {tuple(pred_shape)}, so labels must have shape {want}")

    def to_json(self) -> dict:
        return {"kind": self.kind, "out": self.out, "hidden": list(self.hidden)}


@dataclasses.dataclass(frozen=True)
class Classification(HeadSpec):
    """Softmax classifier over ``out`` classes; integer labels [B] (or [B, L] per token)."""

    kind = "classification"
    default_loss = staticmethod(L.softmax_xent)
    default_metrics = (("accuracy", M.accuracy),)

    def expected_label_shape(self, pred_shape):
        return tuple(pred_shape[:-1])

    def check_labels(self, task, pred_shape, label_shape, label_dtype):
        super().check_labels(task, pred_shape, label_shape, label_dtype)
        if not np.issubdtype(np.dtype(label_dtype), np.integer):
            raise ValueError(f"task {task!r}: classification labels must be integer class ids; got dtype {label_dtype}")


@dataclasses.dataclass(frozen=True)
class MultiLabel(HeadSpec):
    """Independent sigmoid outputs; labels of 0/1 with the prediction's shape."""

    kind = "multilabel"
    default_loss = staticmethod(L.sigmoid_xent)
    default_metrics = (("accuracy", M.multilabel_accuracy),)


@dataclasses.dataclass(frozen=True)
class Regression(HeadSpec):
    """Real-valued outputs; float labels with the prediction's shape."""

    out: int = 1
    kind = "regression"
    default_loss = staticmethod(L.mse)
    default_metrics = (("mse", M.mse), ("mae", M.mae))


class PerPixel:
    """Mixin of per-pixel (dense prediction) heads: predictions ``[B, H, W, out]``. Built by a
    dense decoder (``model.arch='slimmable'``), not on pooled features."""

    per_pixel = True

    def build(self, in_features, *, rngs):
        raise ValueError(f"a per-pixel {self.kind!r} task needs a dense decoder: use model.arch='slimmable' "
                         "(mtl.nn.slimmable); the shared architecture's heads see pooled features only")


@dataclasses.dataclass(frozen=True)
class Segmentation(PerPixel, Classification):
    """Per-pixel softmax over ``out`` classes; integer labels [B, H, W], -1 = unlabelled pixel
    (ignored). Loss: per-pixel cross-entropy; metrics: per-image mIoU, pixel accuracy."""

    kind = "segmentation"
    default_loss = staticmethod(L.pixel_softmax_xent)
    default_metrics = (("miou", M.mean_iou), ("pixel_accuracy", M.pixel_accuracy))


@dataclasses.dataclass(frozen=True)
class DenseRegression(PerPixel, Regression):
    """Per-pixel real values (depth: ``out=1``); labels [B, H, W, out], NaN = invalid (ignored).
    Loss: L1; metrics: per-image RMSE, mean absolute error (over valid pixels)."""

    kind = "dense_regression"
    default_loss = staticmethod(L.pixel_l1)
    default_metrics = (("rmse", M.rmse), ("mae", M.pixel_mae))


@dataclasses.dataclass(frozen=True)
class Edges(PerPixel, MultiLabel):
    """Per-pixel boundary probability (sigmoid); 0/1 labels [B, H, W, 1], NaN = unlabelled
    (ignored). Loss: binary cross-entropy; metrics: per-image F1 at probability 0.5, pixel accuracy."""

    out: int = 1
    kind = "edges"
    default_loss = staticmethod(L.pixel_sigmoid_xent)
    default_metrics = (("f1", M.binary_f1), ("pixel_accuracy", M.binary_pixel_accuracy))


@dataclasses.dataclass(frozen=True)
class LanguageModel(Classification):
    """Next-token prediction: a per-token classifier over the ``out``-token vocabulary;
    labels [B, L]; reports bits per byte (next-token cross-entropy / ln 2) and accuracy."""

    kind = "language_model"
    default_metrics = (("bits_per_byte", M.bits_per_byte), ("accuracy", M.accuracy))


HEADS = {"classification": Classification, "multilabel": MultiLabel, "regression": Regression,
         "segmentation": Segmentation, "dense_regression": DenseRegression, "edges": Edges,
         "language_model": LanguageModel}


def head_from_json(d: dict) -> HeadSpec:
    return HEADS[d["kind"]](out=int(d["out"]), hidden=tuple(d.get("hidden", ())))
