"""Cost of a width configuration: FLOPs of its compiled program and measured latency.

``flops(model, widths, input_shape)`` lowers and compiles the model's forward at that
(static) configuration and reads XLA's cost analysis (:func:`mtl.flops.compiled_flops`);
nothing is counted by hand. ``latency`` times the compiled forward on this machine.
Both use one shared jitted forward, so each configuration compiles once (cached).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.flops import compiled_flops


def _apply(graphdef, state, x, widths):
    return nnx.merge(graphdef, state)(x, widths)


#: the forward of a split model at a static configuration; ``forward._cache_size()``
#: counts its compiled programs (one per configuration and input shape)
forward = jax.jit(_apply, static_argnums=(0, 3))


def _args(model, input_shape, batch: int, dtype):
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((int(batch),) + tuple(input_shape), jnp.dtype(dtype))
    return graphdef, state, x


def flops(model, widths, input_shape, *, batch: int = 1, dtype="float32") -> float:
    """FLOPs per call of ``model(x, widths)`` on ``[batch, *input_shape]`` inputs, from XLA's
    cost analysis of the compiled program (divide by ``batch`` for FLOPs per example)."""
    cfg = model.config(widths)
    graphdef, state, x = _args(model, input_shape, batch, dtype)
    return compiled_flops(forward, graphdef, state, x, cfg)


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float          # per call (the whole batch)
    latency_s: float      # fastest wall time of one call
    batch: int


def latency(model, widths, input_shape, *, batch: int = 1, repeats: int = 20, dtype="float32") -> float:
    """Seconds per call of the compiled ``model(x, widths)``: the minimum over ``repeats``
    timed calls after one warm-up call (the minimum is the least disturbed by other load)."""
    cfg = model.config(widths)
    graphdef, state = nnx.split(model)
    x = jnp.zeros((int(batch),) + tuple(input_shape), jnp.dtype(dtype))
    jax.block_until_ready(forward(graphdef, state, x, cfg))
    times = []
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(forward(graphdef, state, x, cfg))
        times.append(time.perf_counter() - t0)
    return min(times)


def config_cost(model, widths, input_shape, *, batch: int = 1, repeats: int = 20) -> Cost:
    return Cost(flops(model, widths, input_shape, batch=batch),
                latency(model, widths, input_shape, batch=batch, repeats=repeats), int(batch))
