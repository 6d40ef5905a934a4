"""Routing: gates, top-k selection, expert capacity, dispatch and combine.

Pure functions work on *flattened tokens* ``[N, ...]`` (reshape ``[B, L, d]`` to
``[B*L, d]`` first; vmap over a leading group axis for GShard-style groups):

* ``softmax_gate(logits, mask)`` — dense softmax; experts where ``mask`` is False get a
  probability of exactly 0 (used by CGC/PLE/HoME to hide experts from a gate).
* ``top_k(probs, k, renormalize=False)`` — the k largest probabilities of the softmax over
  *all* experts; by default the weights are **not renormalised** to sum to 1 (M³ViT).
* ``add_gating_noise(logits, key, noise_std)`` — noisy top-k (Shazeer et al.); the noise
  comes from an explicit key, so nothing is random unless a key is passed.
* ``expert_capacity`` / ``dispatch_and_combine`` / ``dispatch`` / ``combine`` — tokens to
  ``[E, capacity, d]`` buffers and back.

Overflow policy (``dispatch_and_combine``): every (token, choice) assignment gets a slot in
its expert's buffer in priority order — all tokens' first choices, in token order, then all
second choices, in token order, and so on (GShard / Switch order); its slot is the number
of earlier assignments to the same expert, dropped ones included. An assignment whose slot
would be ``>= capacity`` is **dropped** for that expert: it is not dispatched and its
combine weight is 0; its other (kept) choices are unaffected. A token all of whose choices
are dropped gets a zero MoE output, so the layer's residual path carries it unchanged.

Routers (``nnx`` modules) turn tokens into logits: ``Router`` (one gate), ``MultiGateRouter``
(one gate matrix per task, kernel ``[T, d, E]``) and ``TaskConditionedRouter`` (one gate fed
``concat(token, task_embedding[task_id])``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl.nn.moe.experts import stacked_param

_gate_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1)
_zeros = nnx.initializers.zeros_init()


# ----------------------------------------------------------------------------- gates

def softmax_gate(logits, mask=None):
    """Softmax over the last axis; where ``mask`` (broadcastable bool) is False the
    probability is exactly 0. Every row must have at least one visible expert."""
    if mask is not None:
        logits = jnp.where(jnp.asarray(mask, bool), logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def check_top_k(k: int, num_experts: int) -> None:
    if not 1 <= int(k) <= int(num_experts):
        raise ValueError(f"top-k routing needs 1 <= k <= num_experts; got k={k} with num_experts={num_experts}")


def top_k(probs, k: int, *, renormalize: bool = False):
    """``(weights [..., k], indices [..., k])``: the k largest entries of ``probs``, best first
    (ties go to the lower expert index). With ``renormalize=False`` (default) the weights
    are the softmax probabilities themselves and sum to less than 1."""
    check_top_k(k, probs.shape[-1])
    weights, indices = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, indices.astype(jnp.int32)


def add_gating_noise(logits, key, noise_std):
    """``logits + N(0, 1) * noise_std`` with the normal draw from ``key`` (noisy top-k gating;
    pass ``noise_std = softplus(x W_noise)`` for Shazeer's learned noise)."""
    return logits + jax.random.normal(key, logits.shape, logits.dtype) * noise_std


class Routing(NamedTuple):
    logits: jax.Array   # [N, E]
    probs: jax.Array    # [N, E] softmax over all experts
    weights: jax.Array  # [N, k] combine weights of the chosen experts
    indices: jax.Array  # [N, k] chosen experts, best first


def route(logits, k: int, *, renormalize: bool = False) -> Routing:
    """Softmax over all experts, then top-k."""
    probs = softmax_gate(logits)
    weights, indices = top_k(probs, k, renormalize=renormalize)
    return Routing(logits, probs, weights, indices)


def scatter_gates(weights, indices, num_experts: int):
    """Top-k weights as a dense ``[..., E]`` gate vector (0 for experts not chosen)."""
    return jnp.sum(jax.nn.one_hot(indices, num_experts, dtype=weights.dtype) * weights[..., None], axis=-2)


# ----------------------------------------------------------------------------- capacity

def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float | None) -> int:
    """Slots per expert: ``ceil(capacity_factor * num_tokens * k / num_experts)``.

    ``capacity_factor=None`` means no dropping: ``num_tokens`` slots (an expert can receive
    each token at most once)."""
    check_top_k(k, num_experts)
    if capacity_factor is None:
        return int(num_tokens)
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive (or None for no dropping); got {capacity_factor}")
    return int(math.ceil(capacity_factor * num_tokens * k / num_experts))


def assignment_slots(indices, num_experts: int):
    """Slot of each (token, choice) assignment in its expert's buffer, ``[N, k]`` int32,
    in priority order: choice-major, then token order (see the module docstring)."""
    n, k = indices.shape
    onehot = jax.nn.one_hot(indices, num_experts, dtype=jnp.int32)          # [N, k, E]
    by_priority = jnp.swapaxes(onehot, 0, 1).reshape(k * n, num_experts)    # choice-major
    position = jnp.cumsum(by_priority, axis=0) - 1                          # queue position
    slots = jnp.sum(position * by_priority, axis=-1).reshape(k, n)
    return jnp.swapaxes(slots, 0, 1)


def dispatch_and_combine(weights, indices, num_experts: int, capacity: int):
    """``(dispatch [N, E, C] bool, combine [N, E, C] float, kept [N, k] bool)``.

    ``dispatch[n, e, c]`` is True when token n sits in slot c of expert e; ``combine`` holds
    that assignment's gate weight there; ``kept[n, j]`` says whether choice j of token n fit
    under the capacity (dropped choices have combine weight 0)."""
    if indices.ndim != 2 or weights.shape != indices.shape:
        raise ValueError(f"weights and indices must both be [tokens, k]; got {weights.shape} and {indices.shape}")
    check_top_k(indices.shape[1], num_experts)
    slots = assignment_slots(indices, num_experts)
    kept = slots < capacity
    expert_1h = jax.nn.one_hot(indices, num_experts, dtype=weights.dtype)    # [N, k, E]
    slot_1h = jax.nn.one_hot(jnp.where(kept, slots, capacity), capacity, dtype=weights.dtype)  # [N, k, C], 0 if dropped
    # a token chooses distinct experts, so each (n, e) pair has at most one slot
    dispatch_mask = jnp.einsum("nke,nkc->nec", expert_1h, slot_1h) > 0
    combine_w = jnp.einsum("nke,nkc->nec", expert_1h * weights[..., None], slot_1h)
    return dispatch_mask, combine_w, kept


def dispatch(x, dispatch_mask):
    """Tokens ``[N, d]`` into expert buffers ``[E, C, d]`` (empty slots are 0)."""
    return jnp.einsum("nec,nd->ecd", dispatch_mask.astype(x.dtype), x)


def combine(expert_out, combine_weights):
    """Expert outputs ``[E, C, d]`` back to tokens ``[N, d]``, weighted by the gates."""
    return jnp.einsum("nec,ecd->nd", combine_weights.astype(expert_out.dtype), expert_out)


# ----------------------------------------------------------------------------- task ids

def check_task_ids(task_id, num_tasks: int) -> None:
    """ValueError naming the bad ids when concrete ``task_id`` values are outside
    ``[0, num_tasks)``. Traced ids (inside jit) cannot be checked; JAX clamps them."""
    if isinstance(task_id, jax.core.Tracer):
        return
    ids = np.asarray(task_id)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"task ids must be integers; got dtype {ids.dtype}")
    bad = np.unique(ids[(ids < 0) | (ids >= num_tasks)])
    if bad.size:
        raise ValueError(f"task id(s) {bad.tolist()} out of range for {num_tasks} tasks (valid ids 0..{num_tasks - 1})")


# ----------------------------------------------------------------------------- routers

class Router(nnx.Module):
    """One gate: ``logits = x W`` (``W [d, E]``, logical ``("embed", "expert")``).

    With ``noisy=True`` a second kernel gives Shazeer's learned noise scale
    ``softplus(x W_noise)``; noise is added only when a ``key`` is passed."""

    def __init__(self, in_features: int, num_experts: int, *, noisy: bool = False, rngs: nnx.Rngs):
        self.in_features, self.num_experts = in_features, num_experts
        self.kernel = stacked_param(rngs, _gate_init, (in_features, num_experts), ("embed", "expert"))
        self.noise_kernel = (stacked_param(rngs, _zeros, (in_features, num_experts), ("embed", "expert"))
                             if noisy else None)

    def __call__(self, x, *, key=None):
        logits = x @ self.kernel[...]
        if key is not None and self.noise_kernel is not None:
            logits = add_gating_noise(logits, key, jax.nn.softplus(x @ self.noise_kernel[...]))
        return logits


class MultiGateRouter(nnx.Module):
    """One gate matrix per task: kernel ``[T, d, E]`` with logical ``("task", "embed", "expert")``.

    ``router(x, task_id)``: ``task_id`` is an int (all tokens) or an int array with the
    shape of ``x``'s leading dims (one task per token). ``router.all_tasks(x)`` gives every
    task's logits ``[T, ..., E]`` at once."""

    def __init__(self, in_features: int, num_experts: int, num_tasks: int, *, noisy: bool = False,
                 rngs: nnx.Rngs):
        self.in_features, self.num_experts, self.num_tasks = in_features, num_experts, num_tasks
        shape = (num_tasks, in_features, num_experts)
        self.kernel = stacked_param(rngs, _gate_init, shape, ("task", "embed", "expert"))
        self.noise_kernel = stacked_param(rngs, _zeros, shape, ("task", "embed", "expert")) if noisy else None

    def _logits(self, x, kernel, task_id):
        w = kernel[jnp.asarray(task_id, jnp.int32)]
        if w.ndim == 2:                                   # one task for all tokens
            return x @ w
        return jnp.einsum("...d,...de->...e", x, w)        # one task per token

    def __call__(self, x, task_id, *, key=None):
        check_task_ids(task_id, self.num_tasks)
        logits = self._logits(x, self.kernel[...], task_id)
        if key is not None and self.noise_kernel is not None:
            std = jax.nn.softplus(self._logits(x, self.noise_kernel[...], task_id))
            logits = add_gating_noise(logits, key, std)
        return logits

    def all_tasks(self, x):
        return jnp.einsum("...d,tde->t...e", x, self.kernel[...])


class TaskConditionedRouter(nnx.Module):
    """One gate fed ``concat(token, task_embedding[task_id])``: kernel ``[d + d_task, E]``,
    task embedding ``[T, d_task]`` (logical ``("task", "embed")``)."""

    def __init__(self, in_features: int, num_experts: int, num_tasks: int, task_features: int | None = None, *,
                 noisy: bool = False, rngs: nnx.Rngs):
        task_features = int(task_features or in_features)
        self.in_features, self.num_experts, self.num_tasks = in_features, num_experts, num_tasks
        self.task_embedding = stacked_param(rngs, nnx.initializers.normal(1.0), (num_tasks, task_features),
                                            ("task", "embed"))
        self.router = Router(in_features + task_features, num_experts, noisy=noisy, rngs=rngs)

    def __call__(self, x, task_id, *, key=None):
        check_task_ids(task_id, self.num_tasks)
        emb = self.task_embedding[...][jnp.asarray(task_id, jnp.int32)]
        emb = jnp.broadcast_to(emb, x.shape[:-1] + emb.shape[-1:])
        return self.router(jnp.concatenate([x, emb.astype(x.dtype)], axis=-1), key=key)


ROUTERS = {"single": Router, "multi_gate": MultiGateRouter, "task_conditioned": TaskConditionedRouter}
