"""Distillation losses for slimmable training (pure functions, jittable).

* :func:`cikd_loss` - configuration-invariant knowledge distillation: the encoder features
  of a sub-network pulled towards the full-width features on the channels they share
  (the leading ``feat_sub.shape[-1]`` ones), mean squared error, teacher not trained by it.
* :func:`inplace_distillation_loss` - each task's sub-network prediction pulled towards the
  widest network's prediction (in-place distillation), one loss per task ``[T]``:
  KL(teacher || student) over classes for softmax tasks (classification, segmentation),
  the binary KL per output for sigmoid tasks (multilabel, edges), and the task's own loss
  with the teacher's prediction as target for regression tasks. Every form is 0 when the
  student equals the teacher and has no gradient into the teacher.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from mtl.losses import _per_sample
from mtl.nn.slimmable.model import shared_channels

SOFTMAX_KINDS = ("classification", "segmentation")
SIGMOID_KINDS = ("multilabel", "edges")


def cikd_loss(feat_sub, feat_full, *, stop_teacher: bool = True):
    """``mean((feat_sub - sg(feat_full[..., :c]))**2)`` over batch, positions and shared channels."""
    sub, full = shared_channels(feat_sub, feat_full)
    if stop_teacher:
        full = jax.lax.stop_gradient(full)
    return jnp.mean((sub.astype(jnp.float32) - full.astype(jnp.float32)) ** 2)


def softmax_kl(student_logits, teacher_logits):
    """Per-sample ``KL(softmax(teacher) || softmax(student))`` averaged over positions ``[B]``."""
    lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), -1)
    ls = jax.nn.log_softmax(student_logits.astype(jnp.float32), -1)
    return _per_sample(jnp.sum(jnp.exp(lt) * (lt - ls), -1))


def sigmoid_kl(student_logits, teacher_logits):
    """Per-sample binary KL between teacher and student sigmoid outputs, averaged ``[B]``."""
    def logs(z):
        z = z.astype(jnp.float32)
        return jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)

    tp, tn = logs(teacher_logits)
    sp, sn = logs(student_logits)
    return _per_sample(jnp.exp(tp) * (tp - sp) + jnp.exp(tn) * (tn - sn))


def task_distillation(task, student, teacher):
    """Per-sample distillation loss ``[B]`` of one task (see the module docstring)."""
    teacher = jax.lax.stop_gradient(teacher)
    kind = task.head.kind
    if kind in SOFTMAX_KINDS:
        return softmax_kl(student, teacher)
    if kind in SIGMOID_KINDS:
        return sigmoid_kl(student, teacher)
    return task.loss(student, teacher)


def inplace_distillation_loss(tasks: Sequence, student: Mapping, teacher: Mapping):
    """Per-task distillation losses ``[T]`` (task order), each the mean over the batch.

    No labels are needed, so every sample counts (also those without a label)."""
    return jnp.stack([jnp.mean(task_distillation(t, student[t.name], teacher[t.name])) for t in tasks])
