"""What every gradient route takes and gives.

A route answers "how do we get what the aggregator needs, and the update gradient from
its weights": ``route(inp, weigh) -> RouteOut``. ``inp`` is one :class:`StepInputs`
(everything per step, in one place); ``weigh`` is the aggregator stage
(:class:`mtl.train.weigh.Weigh`), called once the route has the losses (and G).
A route that supports gradient accumulation also has ``accumulate(inp, micro, weigh)``
(``micro``: :class:`mtl.train.accumulate.MicroBatches`, the batch split into K
micro-batches) giving the same :class:`RouteOut` as the full-batch call, up to float
rounding; a route that cannot be exact says why in ``cannot_accumulate``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """The per-step inputs of a route (traced values, inside the jitted step)."""
    params: Any
    rest: Any
    batch: Any             # the step's batch ([B, ...]); micro-batches travel in MicroBatches
    agg_state: Any
    key: jax.Array         # this step's PRNG key
    step: jax.Array
    present: jax.Array     # (T,) bool: the task has a label in the batch
    sparse_mask: Any = None  # shared-parameter mask (sparse training) or None

    def replace(self, **kw) -> "StepInputs":
        return dataclasses.replace(self, **kw)


class RouteOut(NamedTuple):
    grads: Any             # update gradient, the structure of params
    losses: jax.Array      # (T,) full-batch task losses
    aux_loss: jax.Array    # scalar auxiliary loss (0 when the model has none)
    rest: Any              # updated non-parameter state
    w: jax.Array           # (T,) task weights (non-finite: the step is bad)
    agg_state: Any         # the aggregator state after this step
    extras: dict           # diagnostics (cosines, conflict_fraction, grad_norms) when G was built


def masked(tree, mask):
    """``tree`` times the sparse-training ``mask`` (leading axes broadcast); unchanged when None."""
    if mask is None:
        return tree
    return jax.tree.map(lambda a, m: a * m.astype(a.dtype), tree, mask)
