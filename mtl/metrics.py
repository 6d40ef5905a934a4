"""Per-sample metrics: ``metric(pred, label) -> [B]``.

Metrics are per sample so they can be masked (partial labels) and summed across
batches and hosts exactly; the reported value is ``sum / count`` over a split.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl.losses import _per_sample


def accuracy(logits, labels):
    """1 where argmax(logits) == label (averaged over trailing positions, e.g. tokens)."""
    return _per_sample((jnp.argmax(logits, axis=-1) == labels.astype(jnp.int32)).astype(jnp.float32))


def multilabel_accuracy(logits, labels):
    """Fraction of labels predicted correctly (threshold logit > 0)."""
    return _per_sample(((logits > 0) == (labels > 0.5)).astype(jnp.float32))


def mse(pred, target):
    return _per_sample((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)


def mae(pred, target):
    return _per_sample(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)))


# ---- per-pixel (dense prediction) metrics: one value per image, averaged over images

def mean_iou(logits, labels):
    """Per-image mean IoU of ``argmax(logits)`` [B, H, W] vs ``labels`` over the classes
    present in the prediction or the label of that image (dataset-level mIoU pools
    intersections and unions over images first; this per-image form fits sum/count metrics)."""
    k = logits.shape[-1]
    pred = jax.nn.one_hot(jnp.argmax(logits, -1), k, dtype=jnp.float32).reshape(logits.shape[0], -1, k)
    true = jax.nn.one_hot(labels.astype(jnp.int32), k, dtype=jnp.float32).reshape(logits.shape[0], -1, k)
    inter = jnp.sum(pred * true, 1)
    union = jnp.sum(jnp.maximum(pred, true), 1)
    present = union > 0
    iou = jnp.where(present, inter / jnp.maximum(union, 1.0), 0.0)
    return jnp.sum(iou, -1) / jnp.maximum(jnp.sum(present, -1), 1)


def rmse(pred, target):
    """Per-image root mean squared error."""
    return jnp.sqrt(mse(pred, target))


def binary_f1(logits, labels):
    """Per-image F1 score of ``logits > 0`` against 0/1 ``labels`` (1 when both are empty)."""
    p = (logits > 0).reshape(logits.shape[0], -1).astype(jnp.float32)
    t = (labels > 0.5).reshape(labels.shape[0], -1).astype(jnp.float32)
    tp = jnp.sum(p * t, 1)
    denom = jnp.sum(p, 1) + jnp.sum(t, 1)
    return jnp.where(denom > 0, 2 * tp / jnp.maximum(denom, 1.0), 1.0)


def bits_per_byte(logits, labels):
    """Next-token cross-entropy in bits (= bits per byte for a byte-level LM), per sample."""
    from mtl.losses import softmax_xent

    return softmax_xent(logits, labels) / jnp.log(2.0)


METRICS = {"accuracy": accuracy, "multilabel_accuracy": multilabel_accuracy, "mse": mse, "mae": mae,
           "miou": mean_iou, "rmse": rmse, "f1": binary_f1, "bits_per_byte": bits_per_byte}
HIGHER_IS_BETTER = {"accuracy": True, "multilabel_accuracy": True, "mse": False, "mae": False,
                    "miou": True, "pixel_accuracy": True, "rmse": False, "f1": True, "bits_per_byte": False}
