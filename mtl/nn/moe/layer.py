"""A token-routed sparse MoE layer: router -> top-k -> dispatch -> experts -> combine.

``impl`` picks how tokens reach the experts (all three share routing, capacity and the
overflow policy of ``routing.py``, and give the same outputs and gradients):

* ``"dense"``: the reference, one-hot dispatch/combine einsums over ``[N, E, C]``;
* ``"shard_map"``: expert parallelism on the mesh's ``expert`` axis (all-to-all and
  ``ragged_dot`` grouped matmuls; ``parallel.expert_parallel_ffn``); any token count: the
  tokens are padded to a multiple of the token shards inside the expert computation, so
  routing, ``aux`` and the losses only ever see the real tokens;
* ``"capacity"``: scatter/gather into ``[E, C, d]`` buffers (``parallel.capacity_ffn``),
  whose compiled FLOPs count only ``E * C`` expert evaluations.

The caller adds the residual: ``x + moe(x)[0]`` carries dropped tokens.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl.nn.moe.experts import MLPExperts
from mtl.nn.moe.parallel import capacity_ffn, expert_parallel_ffn
from mtl.nn.moe.routing import (ROUTERS, MultiGateRouter, Router, TaskConditionedRouter, check_top_k, combine,
                                dispatch, dispatch_and_combine, expert_capacity, route)


IMPLS = ("dense", "shard_map", "capacity")


class SparseMoE(nnx.Module):
    """Top-k MoE over ``num_experts`` MLP experts (``dim -> hidden -> dim``).

    ``router``: ``"single"`` (one gate), ``"multi_gate"`` (one gate per task) or
    ``"task_conditioned"`` (gate on ``[token; task embedding]``); the last two need
    ``num_tasks`` and a ``task_id`` at call time. Weights are the top-k softmax
    probabilities, not renormalised unless ``renormalize=True``.

    ``moe(x, task_id=None, key=None) -> (y, aux)``: ``x [..., dim]``, ``y`` like ``x``;
    ``aux`` holds ``logits, probs [N, E]``, ``weights, indices, kept [N, k]`` (for the
    losses in ``mtl.nn.moe.losses``) and the ``capacity``.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, k: int = 2, *,
                 capacity_factor: float | None = 1.25, router: str = "single", num_tasks: int | None = None,
                 task_features: int | None = None, noisy: bool = False, renormalize: bool = False,
                 activation="gelu", impl: str = "dense", kept_experts=None, rngs: nnx.Rngs):
        check_top_k(k, num_experts)
        if impl not in IMPLS:
            raise ValueError(f"unknown MoE impl {impl!r}; valid: {', '.join(IMPLS)}")
        self.impl, self.activation = impl, activation
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; valid names: {', '.join(sorted(ROUTERS))}")
        if router != "single" and not num_tasks:
            raise ValueError(f"router {router!r} needs num_tasks (got {num_tasks!r})")
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.capacity_factor, self.renormalize, self.router_kind = capacity_factor, renormalize, router
        if router == "single":
            self.router = Router(dim, num_experts, noisy=noisy, rngs=rngs)
        elif router == "multi_gate":
            self.router = MultiGateRouter(dim, num_experts, num_tasks, noisy=noisy, rngs=rngs)
        else:
            self.router = TaskConditionedRouter(dim, num_experts, num_tasks, task_features, noisy=noisy, rngs=rngs)
        # pruned layer (single-task inference): the router still scores all num_experts (same
        # softmax, same capacity), but only kept_experts have parameters; assignments to the
        # others are dropped
        self.kept_experts = None if kept_experts is None else tuple(int(e) for e in kept_experts)
        if self.kept_experts is not None:
            bad = [e for e in self.kept_experts if not 0 <= e < num_experts]
            if bad or not self.kept_experts or len(set(self.kept_experts)) != len(self.kept_experts):
                raise ValueError(f"kept_experts must be distinct expert ids in [0, {num_experts}); "
                                 f"got {list(self.kept_experts)}")
            if impl == "shard_map":
                raise ValueError("a pruned SparseMoE (kept_experts) runs with impl 'dense' or 'capacity'")
        n_local = num_experts if self.kept_experts is None else len(self.kept_experts)
        self.experts = MLPExperts(n_local, dim, hidden, dim, activation=activation, rngs=rngs)

    def logits(self, tokens, task_id=None, *, key=None):
        if self.router_kind == "single":
            if task_id is not None:
                raise ValueError("this MoE layer has a single router; do not pass task_id")
            return self.router(tokens, key=key)
        if task_id is None:
            raise ValueError(f"router {self.router_kind!r} needs a task_id")
        if jnp.ndim(task_id):  # per-token ids with x's leading shape: flatten like the tokens
            task_id = jnp.asarray(task_id).reshape(-1)
        return self.router(tokens, task_id, key=key)

    def expert_params(self) -> dict:
        e = self.experts
        return {"w_up": e.w_up[...], "b_up": e.b_up[...], "w_down": e.w_down[...], "b_down": e.b_down[...]}

    def __call__(self, x, task_id=None, *, key=None, impl: str | None = None):
        lead = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])
        r = route(self.logits(tokens, task_id, key=key), self.k, renormalize=self.renormalize)
        capacity = expert_capacity(tokens.shape[0], self.num_experts, self.k, self.capacity_factor)
        impl = impl or self.impl
        weights, indices, valid, n_local = r.weights, r.indices, None, self.num_experts
        if self.kept_experts is not None:
            n_local = len(self.kept_experts)
            table = np.full(self.num_experts, n_local, np.int32)
            table[list(self.kept_experts)] = np.arange(n_local)
            indices = jnp.asarray(table)[indices]           # pruned experts -> n_local (one-hot of zeros)
            valid = indices < n_local
            weights = jnp.where(valid, weights, 0.0)
        if impl == "dense":
            dispatch_mask, combine_w, kept = dispatch_and_combine(weights, indices, n_local, capacity)
            y = combine(self.experts.per_expert(dispatch(tokens, dispatch_mask)), combine_w)
            kept = kept if valid is None else kept & valid
        elif impl == "shard_map":
            y, kept = expert_parallel_ffn(tokens, weights, indices, self.expert_params(),
                                          num_experts=self.num_experts, capacity=capacity,
                                          activation=self.activation)
        elif impl == "capacity":
            y, kept = capacity_ffn(tokens, weights, indices, self.experts, capacity=capacity, valid=valid)
        else:
            raise ValueError(f"unknown MoE impl {impl!r}; valid: {', '.join(IMPLS)}")
        aux = {"logits": r.logits, "probs": r.probs, "weights": r.weights, "indices": r.indices, "kept": kept,
               "capacity": capacity}
        return y.reshape(lead + (y.shape[-1],)), aux
