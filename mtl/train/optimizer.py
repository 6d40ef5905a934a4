"""Optimizers from config: ``optimizer.name`` in {adamw, adam, sgd}, a learning-rate
schedule (constant or warmup + cosine), optional global-norm clipping; ``freeze`` keeps
chosen parameters fixed (ParScale's ``freeze_backbone``)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mtl.nn.encoders import unknown_name_error

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine")


def make_schedule(lr: float, steps: int, schedule: str = "cosine", warmup_steps: int = 0):
    if schedule not in SCHEDULES:
        raise unknown_name_error("schedule", schedule, SCHEDULES)
    if schedule == "constant":
        if warmup_steps:
            return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
                                        [warmup_steps])
        return optax.constant_schedule(lr)
    return optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else lr, lr, max(warmup_steps, 1),
                                              max(steps, warmup_steps + 1), end_value=lr * 0.01)


def make_optimizer(name: str = "adamw", lr: float = 1e-3, steps: int = 1000, schedule: str = "cosine",
                   warmup_steps: int = 0, weight_decay: float = 1e-4, momentum: float = 0.9,
                   grad_clip: float | None = None, b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    if name not in OPTIMIZERS:
        raise unknown_name_error("optimizer", name, OPTIMIZERS)
    if not float(lr) > 0 or float(lr) == float("inf"):
        raise ValueError(f"learning rate must be a positive finite number; got {lr} "
                         "(a negative one would train by gradient ascent)")
    sched = make_schedule(lr, steps, schedule, warmup_steps)
    if name == "adamw":
        tx = optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay)
    elif name == "adam":
        tx = optax.adam(sched, b1=b1, b2=b2)
    else:
        tx = optax.sgd(sched, momentum=momentum or None)
    if grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(float(grad_clip)), tx)
    return tx


def frozen_updates() -> optax.GradientTransformation:
    """Every update ``-0.0``: ``p + (-0.0) == p`` bit for bit for every float ``p`` (``+0.0``
    would turn a ``-0.0`` parameter into ``+0.0``), so frozen parameters never change."""
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state))


def freeze(tx: optax.GradientTransformation, frozen: Callable[[str], bool]) -> optax.GradientTransformation:
    """``tx`` on the parameters whose path (``"a/b/c"``) is not ``frozen``; the frozen ones
    stay bit-identical. Their gradients count neither for ``tx``'s clipping nor its weight decay."""
    from mtl.checkpoint import path_str

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if frozen(path_str(p)) else "train", params)

    return optax.multi_transform({"train": tx, "frozen": frozen_updates()}, labels)
