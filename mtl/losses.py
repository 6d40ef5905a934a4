"""Per-sample losses: ``loss(pred, label) -> [B]``.

Trailing axes beyond the batch (sequence positions, labels, outputs) are averaged, so a
task's loss is always one number per sample; the library then takes the masked mean
over samples (see ``mtl.tasks.masked_mean``).
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


LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent, "mse": mse, "l1": l1}
