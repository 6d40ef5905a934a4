"""Per-sample metrics: ``metric(pred, label) -> [B]``.

Metrics are per sample so they can be masked (partial labels) and summed across
batches and hosts exactly; the reported value is ``sum / count`` over a split.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl.losses import IGNORE_ID, _per_sample, valid_mean


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


# ---- per-pixel (dense prediction) metrics: one value per image, averaged over images.
# Unlabelled pixels (segmentation id IGNORE_ID = -1, NaN float labels) are left out.

def mean_iou(logits, labels):
    """Per-image mean IoU of ``argmax(logits)`` [B, H, W] vs ``labels`` over the classes
    present in the prediction or the label of that image, on its labelled pixels (dataset-level
    mIoU pools intersections and unions over images first; this per-image form fits sum/count
    metrics)."""
    k = logits.shape[-1]
    labels = labels.astype(jnp.int32)
    valid = (labels != IGNORE_ID).reshape(logits.shape[0], -1, 1).astype(jnp.float32)
    pred = jax.nn.one_hot(jnp.argmax(logits, -1), k, dtype=jnp.float32).reshape(logits.shape[0], -1, k) * valid
    true = jax.nn.one_hot(labels, k, dtype=jnp.float32).reshape(logits.shape[0], -1, k)
    inter = jnp.sum(pred * true, 1)
    union = jnp.sum(jnp.maximum(pred, true), 1)
    present = union > 0
    iou = jnp.where(present, inter / jnp.maximum(union, 1.0), 0.0)
    return jnp.sum(iou, -1) / jnp.maximum(jnp.sum(present, -1), 1)


def pixel_accuracy(logits, labels):
    """Per-image fraction of labelled pixels whose argmax class is the label."""
    labels = labels.astype(jnp.int32)
    return valid_mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32), labels != IGNORE_ID)


def _finite(target):
    valid = jnp.isfinite(target)
    return jnp.where(valid, target, 0.0).astype(jnp.float32), valid


def pixel_mae(pred, target):
    """Per-image mean absolute error over the finite entries of ``target``."""
    t, valid = _finite(target)
    return valid_mean(jnp.abs(pred.astype(jnp.float32) - t), valid)


def rmse(pred, target):
    """Per-image root mean squared error over the finite entries of ``target``."""
    t, valid = _finite(target)
    return jnp.sqrt(valid_mean((pred.astype(jnp.float32) - t) ** 2, valid))


def binary_f1(logits, labels):
    """Per-image F1 score of ``logits > 0`` against 0/1 ``labels`` on the labelled (finite)
    pixels (1 when both are empty)."""
    t, valid = _finite(labels)
    valid = valid.reshape(labels.shape[0], -1).astype(jnp.float32)
    p = (logits > 0).reshape(logits.shape[0], -1).astype(jnp.float32) * valid
    t = (t > 0.5).reshape(labels.shape[0], -1).astype(jnp.float32)
    tp = jnp.sum(p * t, 1)
    denom = jnp.sum(p, 1) + jnp.sum(t, 1)
    return jnp.where(denom > 0, 2 * tp / jnp.maximum(denom, 1.0), 1.0)


def binary_pixel_accuracy(logits, labels):
    """Per-image fraction of labelled (finite) entries with ``(logits > 0) == (labels > 0.5)``."""
    t, valid = _finite(labels)
    return valid_mean(((logits > 0) == (t > 0.5)).astype(jnp.float32), valid)


def bits_per_byte(logits, labels):
    """Next-token cross-entropy in bits (= bits per byte for a byte-level LM), per sample."""
    from mtl.losses import softmax_xent

    return softmax_xent(logits, labels) / jnp.log(2.0)


METRICS = {"accuracy": accuracy, "multilabel_accuracy": multilabel_accuracy, "mse": mse, "mae": mae,
           "miou": mean_iou, "pixel_accuracy": pixel_accuracy, "pixel_mae": pixel_mae, "rmse": rmse, "f1": binary_f1,
           "binary_pixel_accuracy": binary_pixel_accuracy, "bits_per_byte": bits_per_byte}
HIGHER_IS_BETTER = {"accuracy": True, "multilabel_accuracy": True, "mse": False, "mae": False,
                    "miou": True, "pixel_accuracy": True, "pixel_mae": False, "rmse": False, "f1": True,
                    "binary_pixel_accuracy": True, "bits_per_byte": False}
