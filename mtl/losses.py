"""Per-sample losses: ``loss(pred, label) -> [B]``.

Trailing axes beyond the batch (sequence positions, labels, outputs) are averaged, so a
task's loss is always one number per sample; the library then takes the masked mean
over samples (see ``mtl.tasks.masked_mean``). The per-pixel losses (``pixel_*``) average
over an image's labelled pixels only: segmentation ids equal to :data:`IGNORE_ID` (-1) and
non-finite (NaN) float labels mark unlabelled pixels (``mtl.data.base`` label conventions).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _per_sample(x):
    return x.reshape(x.shape[0], -1).mean(axis=1)


def softmax_xent(logits, labels):
    """Cross-entropy of integer ``labels`` [B, ...] under ``logits`` [B, ..., C]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    labels = labels.astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    # an out-of-range id (e.g. -1 left on a labelled sample) must not score a real class:
    # it gives NaN, which the trainer reports (naming the task) instead of training on it
    nll = jnp.where((labels >= 0) & (labels < logits.shape[-1]), nll, jnp.nan)
    return _per_sample(nll)


def sigmoid_xent(logits, labels):
    """Binary cross-entropy per label, averaged over labels; ``labels`` in {0, 1}."""
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.float32)
    loss = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return _per_sample(loss)


def mse(pred, target):
    """Squared error averaged over output dims."""
    return _per_sample((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)


def l1(pred, target):
    """Absolute error averaged over output dims."""
    return _per_sample(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)))


# ---- per-pixel (dense prediction) losses: unlabelled pixels are left out of each image's mean

IGNORE_ID = -1  # segmentation label of an unlabelled pixel (float per-pixel labels use NaN)


def valid_mean(values, valid):
    """Per-sample mean of ``values`` [B, ...] over the entries where ``valid`` (same shape) is
    True; 0 for a sample without any (a data source marks such a sample's label missing)."""
    v = jnp.where(valid, values, 0.0).reshape(values.shape[0], -1)
    n = valid.reshape(valid.shape[0], -1).sum(axis=1)
    return v.sum(axis=1) / jnp.maximum(n, 1)


def pixel_softmax_xent(logits, labels):
    """Per-image mean cross-entropy over the pixels whose label is not :data:`IGNORE_ID`;
    any other id outside ``[0, C)`` gives NaN (as :func:`softmax_xent`)."""
    labels = labels.astype(jnp.int32)
    valid = labels != IGNORE_ID
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where((safe >= 0) & (safe < logits.shape[-1]), nll, jnp.nan)
    return valid_mean(nll, valid)


def pixel_sigmoid_xent(logits, labels):
    """Per-image mean binary cross-entropy over the finite (labelled) entries of ``labels``."""
    valid = jnp.isfinite(labels)
    y = jnp.where(valid, labels, 0.0).astype(jnp.float32)
    z = logits.astype(jnp.float32)
    return valid_mean(jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z))), valid)


def pixel_l1(pred, target):
    """Per-image mean absolute error over the finite (valid) entries of ``target``."""
    valid = jnp.isfinite(target)
    t = jnp.where(valid, target, 0.0).astype(jnp.float32)
    return valid_mean(jnp.abs(pred.astype(jnp.float32) - t), valid)


LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent, "mse": mse, "l1": l1,
          "pixel_softmax_xent": pixel_softmax_xent, "pixel_sigmoid_xent": pixel_sigmoid_xent,
          "pixel_l1": pixel_l1}
