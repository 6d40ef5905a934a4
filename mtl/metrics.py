"""Per-sample metrics: ``metric(pred, label) -> [B]``.

Metrics are per sample so they can be masked (partial labels) and summed across
batches and hosts exactly; the reported value is ``sum / count`` over a split.
"""
from __future__ import annotations

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


def bits_per_byte(logits, labels):
    """Next-token cross-entropy in bits (= bits per byte for a byte-level LM), per sample."""
    from mtl.losses import softmax_xent

    return softmax_xent(logits, labels) / jnp.log(2.0)


METRICS = {"accuracy": accuracy, "multilabel_accuracy": multilabel_accuracy, "mse": mse, "mae": mae,
           "bits_per_byte": bits_per_byte}
HIGHER_IS_BETTER = {"accuracy": True, "multilabel_accuracy": True, "mse": False, "mae": False,
                    "bits_per_byte": False}
