"""Gradient accumulation (``train.accum_steps = K > 1``), as a wrapper around any route.

:class:`Accumulated` is itself a route: it splits the step's batch into K micro-batches
(:class:`Splitter`) and hands them, as one :class:`MicroBatches`, to the wrapped route's
``accumulate``; each route keeps the passes that make its own K-micro-batch step exact.
Everything rests on :func:`~mtl.train.grad_tools.label_shares`: task losses are masked
means, so ``L_t = Σ_m s_mt L_t^m`` with ``s_mt = n_t^m / n_t`` (micro-batch m's share of
task t's labels), and the same holds for every per-task gradient.

* **Split.** Micro-batch m holds samples ``m, m+K, m+2K, ...`` (a strided split: reshape
  ``[B] -> [B/K, K]``, then transpose). The batch arrives sharded over the data axes in
  contiguous blocks, so when B is divisible by K x (number of batch shards) every device
  already holds B/(K·shards) samples of *every* micro-batch: the split moves no data and
  each micro-batch stays sharded over all devices. Otherwise XLA reshards (correct, slower).
* **Auxiliary losses** (``aux["loss"]``, e.g. an MoE LBL) are averaged over micro-batches.
  A model with ``pools_routing_counts`` (M3ViT with ``lbl="global"``) gets the exact
  global-batch LBL: a forward-only scan collects routing counts, and every pass injects
  their sum (``forward_with_aux(x, routing_counts=...)``): one extra forward pass per
  step. Capacity-limited routing computes capacity per micro-batch (documented limit).
* **Non-parameter state** (``rest``) is threaded through the micro-batches in order.
* Refused (:meth:`Accumulated.check`, at ``Steps`` construction, before anything is
  written) where a route cannot be exact: F-MTL, Rep-MTL, the streamed Jacobian.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mtl.train.forward import ROUTING_COUNTS, Forward
from mtl.train.grad_tools import label_shares
from mtl.train.routes.base import RouteOut, StepInputs


@dataclasses.dataclass(frozen=True)
class MicroBatches:
    """A batch split into K micro-batches (traced, inside the step)."""
    data: Any                 # [K, B/K, ...] per array
    shares: jax.Array         # [K, T] label shares
    prepare: Callable         # applied to each micro-batch inside the scans
    forward: Forward

    @property
    def k(self) -> int:
        return int(self.shares.shape[0])

    def scan_grads(self, objective, params, rest):
        """Σ over micro-batches of ∇_params ``objective(p, rest_m, mb, share_m)``, one
        micro-batch's activations at a time (``lax.scan``). ``objective`` returns ``(value,
        (losses [T], aux, new_rest))``; the non-parameter state is threaded through in order.
        Returns (grads, losses [K, T], aux [K], new_rest)."""
        def body(carry, xs):
            acc, rest_m = carry
            mb, c = xs
            mb = self.prepare(mb)
            (_, (losses, aux, new_rest)), g = jax.value_and_grad(
                lambda p: objective(p, rest_m, mb, c), has_aux=True)(params)
            return (jax.tree.map(jnp.add, acc, g), new_rest), (losses, aux)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, new_rest), (lm, am) = jax.lax.scan(body, (zeros, rest), (self.data, self.shares))
        return grads, lm, am, new_rest

    def full(self, per_micro):
        """Full-batch task values from per-micro-batch ones ([K, T] -> [T])."""
        return jnp.sum(self.shares * per_micro, axis=0)

    def losses(self, params, rest):
        """Full-batch per-task losses [T] from a forward-only scan."""
        def body(rest_m, mb):
            losses, _, new_rest = self.forward.losses(params, rest_m, self.prepare(mb))
            return new_rest, losses

        _, lm = jax.lax.scan(body, rest, self.data)
        return self.full(lm)

    def sum_grad(self, params, rest):
        """∇_θ Σ_t L_t on the whole batch (no auxiliary loss)."""
        def objective(p, rest_m, mb, c):
            losses, aux, new_rest = self.forward.losses(p, rest_m, mb)
            return jnp.sum(c * losses), (losses, aux, new_rest)

        return self.scan_grads(objective, params, rest)[0]


class Splitter:
    """Splits a step's batch into K strided micro-batches on the mesh (see module doc)."""

    def __init__(self, k: int, forward: Forward, mesh, batch_sharding: Callable):
        self.k, self.forward, self.mesh, self.batch_sharding = int(k), forward, mesh, batch_sharding
        # pooled global-batch LBL under accumulation (see the module docstring)
        self.pool_routing = self.k > 1 and forward.pools_routing_counts

    def split(self, batch):
        """``[B, ...] -> [K, B/K, ...]`` for every array of ``batch``: micro-batch m holds
        samples ``m, m+K, ...`` (strided, so each micro-batch stays spread over all batch shards)."""
        k = self.k
        sizes = {int(jnp.shape(x)[0]) for x in jax.tree.leaves(batch)}
        if len(sizes) != 1:
            raise ValueError(f"batch arrays have different leading sizes {sorted(sizes)}")
        (b,) = sizes
        if b % k:
            raise ValueError(f"the batch of {b} samples cannot be split into accum_steps={k} equal micro-batches "
                             f"({b} is not divisible by {k}); make train.batch_size a multiple of "
                             "train.accum_steps")

        def split(x):
            y = jnp.swapaxes(jnp.reshape(x, (b // k, k) + tuple(x.shape[1:])), 0, 1)
            spec = self.batch_sharding(x.ndim).spec
            return jax.lax.with_sharding_constraint(y, NamedSharding(self.mesh, P(None, *spec)))

        return jax.tree.map(split, batch)

    def constrain(self, mb):
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.batch_sharding(x.ndim)), mb)

    def pooled_routing_counts(self, params, rest, data):
        """Routing counts summed over the micro-batches ``data`` ([K, B/K, ...]): a
        forward-only scan (no gradient) reading ``aux["routing_counts"]``."""
        def count(_, mb):
            return None, self.forward.routing_counts(params, rest, self.constrain(mb)["inputs"])

        _, counts = jax.lax.scan(count, None, {"inputs": data["inputs"]})
        return jnp.sum(counts, axis=0)

    def __call__(self, params, rest, batch, pool: bool = True) -> MicroBatches:
        """The micro-batches of ``batch``; ``pool=False`` skips the pooled routing counts
        (passes that read only the task losses)."""
        data = self.split(batch)
        shares, _ = label_shares(self.forward.tasks, data)
        prepare = self.constrain
        if pool and self.pool_routing:
            pooled = self.pooled_routing_counts(params, rest, data)
            prepare = lambda mb: {**self.constrain(mb), ROUTING_COUNTS: pooled}  # noqa: E731
        return MicroBatches(data=data, shares=shares, prepare=prepare, forward=self.forward)


class Accumulated:
    """The route ``route`` over K micro-batches: same :class:`RouteOut` as the full-batch
    step (up to float rounding), one micro-batch's activation memory."""

    def __init__(self, route, splitter: Splitter):
        self.route, self.splitter = route, splitter

    @staticmethod
    def check(route, k: int) -> None:
        """ValueError (at ``Steps`` construction, before anything is written) for a route
        whose K-micro-batch step cannot equal the full-batch step."""
        why = getattr(route, "cannot_accumulate", None)
        if k > 1 and why:
            raise ValueError(f"train.accum_steps={k} (gradient accumulation) cannot be exact here: "
                             f"{why}. Use train.accum_steps=1 (with a batch that fits) or change optim.")

    def __call__(self, inp: StepInputs, weigh) -> RouteOut:
        return self.route.accumulate(inp, self.splitter(inp.params, inp.rest, inp.batch), weigh)


@dataclasses.dataclass(frozen=True)
class WholeBatch:
    """The K = 1 counterpart of :class:`MicroBatches` for the whole-batch passes the step
    takes besides its route (FAMO's re-evaluation, the saliency mask's gradient)."""
    batch: Any
    forward: Forward

    def losses(self, params, rest):
        return self.forward.losses(params, rest, self.batch)[0]

    def sum_grad(self, params, rest):
        return jax.grad(lambda p: jnp.sum(self.forward.losses(p, rest, self.batch)[0]))(params)
