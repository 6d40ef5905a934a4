"""Optimizers from config: ``optimizer.name`` in {adamw, adam, sgd}, a learning-rate
schedule (constant or warmup + cosine), optional global-norm clipping."""
from __future__ import annotations

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
