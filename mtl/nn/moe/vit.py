"""M³ViT: a task-routed sparse mixture-of-experts vision transformer, and single-task extraction.

Every ``moe_every``-th transformer block (blocks ``moe_every-1, 2*moe_every-1, ...``: with
the default 2, every other block) has a ``SparseMoE`` instead of its MLP. Routing is per
task: ``router="multi_gate"`` (one gate matrix per task) or ``"task_conditioned"`` (one gate
fed ``[token; task embedding]``); top-k of the softmax over all experts, weights not
renormalised (methods.md §3).

Training ("for each task a forward with that task id"): ``forward_with_aux(x)`` runs the
blocks before the first MoE block once (they do not depend on the task) and the rest once
per task, so it trains with the ordinary trainer (``model.arch="m3vit"``). ``aux["loss"]``
is ``lbl_weight * mean(LBL) + z_weight * mean(z-loss)`` over tasks and MoE layers;
``lbl="global"`` balances each task's routing over the whole batch, ``lbl="micro"`` over
each image's tokens separately (``micro_batch_load_balancing_loss`` with one micro-batch
per example). ``aux["routing"][task]`` lists, per MoE layer, ``probs [B, L, E]``,
``indices [B, L, k]`` and ``kept [B, L, k]`` for the diagnostics in ``diagnostics.py``.

Gradient accumulation (``train.accum_steps > 1``) and the pooled global-batch LBL:
``aux["routing_counts"]`` ``[T, M, E]`` (T tasks, M MoE layers; no gradient) are the
token->expert assignment counts of this forward, and
``forward_with_aux(x, routing_counts=pooled)`` forms the ``lbl="global"`` loss with
``f = pooled / sum(pooled)`` (per task and layer) instead of this forward's own counts, while
``p`` stays this forward's mean router probability. The trainer sums the counts over all
micro-batches of a step in a forward-only first pass and injects them
(``pools_routing_counts``), so the accumulated loss is ``mean_m E sum_i f^pool_i p^m_i``
(``accumulated_load_balancing_loss(pooled=True)``). ``lbl="micro"`` ignores injected counts
(its f is per image, already independent of how the batch is split).

Single-task inference: ``extract_task_model(model, task)`` builds an ``M3ViT`` for that task
only: its router (gate row / task embedding), its head, and, with ``kept_experts``, only the
experts it routes to (e.g. ``used_experts(model, task, x, min_share)``); its outputs equal
the full model's for that task whenever no token of that task picks a pruned expert.
Expert sizes default to ``mlp_ratio * dim / k`` hidden units, so a token's top-k experts cost
what one dense MLP costs. For FLOPs that reflect sparsity use ``impl="capacity"``.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl.nn.encoders import ViT
from mtl.nn.layers import Attention, MLPBlock, dense, layer_norm
from mtl.nn.moe.layer import SparseMoE
from mtl.nn.moe.losses import (load_balancing_loss, micro_batch_load_balancing_loss, router_z_loss,
                               routing_stats)
from mtl.sharding import constrain
from mtl.nn.multitask import TaskHeads, build_heads
from mtl.tasks import Task, TaskSet


class MoEBlock(nnx.Module):
    """Pre-norm block; the MLP is either dense (``MLPBlock``) or a task-routed ``SparseMoE``."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, moe: SparseMoE | None, *, rngs: nnx.Rngs):
        self.norm1 = layer_norm(dim, rngs=rngs)
        self.attn = Attention(dim, num_heads, rngs=rngs)
        self.norm2 = layer_norm(dim, rngs=rngs)
        self.mlp = MLPBlock(dim, mlp_hidden, rngs=rngs) if moe is None else None
        self.moe = moe

    def __call__(self, x, task_id=None):
        x = constrain(x + self.attn(self.norm1(x)), ("batch", "length", "embed"))
        if self.moe is None:
            return constrain(x + self.mlp(self.norm2(x)), ("batch", "length", "embed")), None
        y, aux = self.moe(self.norm2(x), task_id)
        return constrain(x + y, ("batch", "length", "embed")), aux


class M3ViT(TaskHeads, nnx.Module):
    def __init__(self, input_shape: Sequence[int], tasks: Sequence[Task], *, patch: int = 4, dim: int = 64,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, moe_every: int = 2,
                 num_experts: int = 8, k: int = 2, expert_hidden: int | None = None, router: str = "multi_gate",
                 capacity_factor: float | None = 1.25, impl: str = "capacity", lbl: str = "global",
                 lbl_weight: float = 0.01, z_weight: float = 0.0, task_ids: Sequence[int] | None = None,
                 num_router_tasks: int | None = None, kept_experts: dict | None = None, rngs: nnx.Rngs):
        from mtl.nn.moe.routing import check_top_k

        h, w, c = (int(s) for s in input_shape)
        if h % patch or w % patch:
            raise ValueError(f"M3ViT: image {h}x{w} is not divisible by patch {patch}")
        if router not in ("multi_gate", "task_conditioned"):
            raise ValueError(f"M3ViT routes per task: router must be 'multi_gate' or 'task_conditioned'; got {router!r}")
        if lbl not in ("global", "micro"):
            raise ValueError(f"lbl must be 'global' or 'micro'; got {lbl!r}")
        if not 1 <= moe_every <= depth:
            raise ValueError(f"moe_every must be in [1, depth={depth}]; got {moe_every}")
        check_top_k(k, num_experts)
        self.task_specs = tuple(TaskSet(tasks))
        # router rows of these tasks (an extracted single-task model keeps one row, id 0)
        self.task_ids = tuple(range(len(self.task_specs))) if task_ids is None else tuple(int(t) for t in task_ids)
        num_router_tasks = int(num_router_tasks or len(self.task_specs))
        self.config = dict(patch=patch, dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           moe_every=moe_every, num_experts=num_experts, k=k, expert_hidden=expert_hidden,
                           router=router, capacity_factor=capacity_factor, impl=impl, lbl=lbl,
                           lbl_weight=lbl_weight, z_weight=z_weight)
        self.input_shape, self.patch = (h, w, c), patch
        self.lbl, self.lbl_weight, self.z_weight = lbl, float(lbl_weight), float(z_weight)
        mlp_hidden = int(dim * mlp_ratio)
        expert_hidden = int(expert_hidden or max(1, mlp_hidden // k))
        n = (h // patch) * (w // patch)
        self.embed = dense(patch * patch * c, dim, (None, "embed"), rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.pos = nnx.Param(nnx.with_partitioning(init, (None, "embed"))(rngs.params(), (n + 1, dim)))
        self.cls = nnx.Param(nnx.with_partitioning(init, ("embed",))(rngs.params(), (dim,)))
        self.moe_layers = tuple(i for i in range(depth) if i % moe_every == moe_every - 1)
        kept_experts = dict(kept_experts or {})
        blocks = []
        for i in range(depth):
            moe = None
            if i in self.moe_layers:
                moe = SparseMoE(dim, expert_hidden, num_experts, k, capacity_factor=capacity_factor, router=router,
                                num_tasks=num_router_tasks, impl=impl, kept_experts=kept_experts.get(i), rngs=rngs)
            blocks.append(MoEBlock(dim, num_heads, mlp_hidden, moe, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.norm = layer_norm(dim, rngs=rngs)
        self.out_features = dim
        self.heads = build_heads(self.task_specs, dim, rngs)

    tokens = ViT.tokens  # same patch embedding, class token and positions as the dense ViT

    @property
    def pools_routing_counts(self) -> bool:
        """The LBL's f should be pooled over a step's micro-batches (``lbl="global"``, an
        LBL that counts): the trainer then injects ``routing_counts`` (module docstring)."""
        return self.lbl == "global" and bool(self.moe_layers) and self.lbl_weight != 0

    def _lbl(self, a, batch: int, pooled_counts=None):
        probs, idx = a["probs"], a["indices"]
        if self.lbl == "micro":
            return micro_batch_load_balancing_loss(probs, idx, batch)
        if pooled_counts is None:
            return load_balancing_loss(probs, idx)
        # f from counts pooled over the micro-batches of the step; p from these tokens
        _, mean_probs = routing_stats(probs, idx)
        counts = jax.lax.stop_gradient(jnp.asarray(pooled_counts, mean_probs.dtype))
        f = counts / jnp.maximum(jnp.sum(counts), 1.0)
        return probs.shape[-1] * jnp.sum(f * mean_probs)

    def forward_with_aux(self, x, routing_counts=None):
        """``(outputs, aux)``; ``routing_counts [T, M, E]`` (optional) replaces the
        ``lbl="global"`` f statistics by these pooled counts (see the module docstring)."""
        if x.ndim == 3:
            x = x[..., None]
        b = x.shape[0]
        n_moe = len(self.moe_layers)
        if routing_counts is not None:
            want = (len(self.task_specs), n_moe, self.config["num_experts"])
            if tuple(routing_counts.shape) != want:
                raise ValueError(f"routing_counts must be [tasks, MoE layers, experts] = {list(want)}; "
                                 f"got {list(routing_counts.shape)}")
        h = self.tokens(x)
        first = self.moe_layers[0] if self.moe_layers else len(self.blocks)
        for blk in self.blocks[:first]:                      # shared stem: once for all tasks
            h, _ = blk(h)
        outputs, routing, lbls, zs, counts = {}, {}, [], [], []
        for ti, (spec, tid) in enumerate(zip(self.task_specs, self.task_ids)):
            ht, layers = h, []
            for blk in self.blocks[first:]:
                ht, a = blk(ht, tid)
                if a is not None:
                    lead = ht.shape[:-1]
                    layers.append({"probs": a["probs"].reshape(lead + a["probs"].shape[-1:]),
                                   "indices": a["indices"].reshape(lead + a["indices"].shape[-1:]),
                                   "kept": a["kept"].reshape(lead + a["kept"].shape[-1:])})
                    pooled = None if routing_counts is None else routing_counts[ti, len(layers) - 1]
                    lbls.append(self._lbl(a, b, pooled))
                    zs.append(router_z_loss(a["logits"]))
                    counts.append(routing_stats(a["probs"], a["indices"])[0])
            outputs[spec.name] = self.heads[spec.name](self.norm(ht)[:, 0])
            routing[spec.name] = layers
        lbl = jnp.mean(jnp.stack(lbls)) if lbls else jnp.zeros(())
        z = jnp.mean(jnp.stack(zs)) if zs else jnp.zeros(())
        e = self.config["num_experts"]
        rc = (jnp.stack(counts).reshape(len(self.task_specs), n_moe, e) if counts
              else jnp.zeros((len(self.task_specs), 0, e), jnp.float32))
        return outputs, {"loss": self.lbl_weight * lbl + self.z_weight * z, "lbl": lbl, "z_loss": z,
                         "routing": routing, "routing_counts": jax.lax.stop_gradient(rc)}

    def __call__(self, x) -> dict:
        return self.forward_with_aux(x)[0]


def used_experts(model: M3ViT, task: str, x, min_share: float = 0.0, max_experts: int | None = None) -> dict:
    """``{block index: experts}`` that ``task``'s router selects (top-k, kept under capacity)
    on inputs ``x`` for more than ``min_share`` of its assignments in that layer; with
    ``max_experts`` only the most used ones (at least ``k``)."""
    gd, st = nnx.split(model)
    routing = jax.jit(lambda s, x: nnx.merge(gd, s).forward_with_aux(x)[1]["routing"][task])(st, x)
    out = {}
    for i, a in zip(model.moe_layers, routing):
        idx, kept = np.asarray(a["indices"]), np.asarray(a["kept"])
        counts = np.bincount(idx[kept].ravel(), minlength=model.config["num_experts"])
        share = counts / max(counts.sum(), 1)
        keep = [int(e) for e in np.argsort(-share, kind="stable") if share[e] > min_share]
        if max_experts is not None:
            keep = keep[:max(int(max_experts), model.config["k"])]
        out[i] = tuple(sorted(keep))
    return out


def extract_task_model(model: M3ViT, task: str, kept_experts: dict | None = None, *,
                       impl: str | None = None) -> M3ViT:
    """A single-task ``M3ViT`` with ``task``'s router row, head and (optionally) only
    ``kept_experts[block]`` experts per MoE block; all other parameters are copied."""
    names = model.task_names
    if task not in names:
        raise ValueError(f"no task {task!r}; the model's tasks are {names}")
    t = model.task_ids[names.index(task)]
    cfg = dict(model.config)
    if impl is not None:
        cfg["impl"] = impl
    kept_experts = {int(i): tuple(v) for i, v in (kept_experts or {}).items()}
    unknown = sorted(set(kept_experts) - set(model.moe_layers))
    if unknown:
        raise ValueError(f"kept_experts names blocks {unknown} that are not MoE blocks {list(model.moe_layers)}")
    with nnx.use_eager_sharding(False):
        new = nnx.eval_shape(lambda: M3ViT(model.input_shape, [model.tasks[task]], task_ids=(0,), num_router_tasks=1,
                                           kept_experts=kept_experts, rngs=nnx.Rngs(0), **cfg))
    gd, _ = nnx.split(new)
    src = nnx.state(model)
    state = {"embed": src["embed"], "pos": src["pos"], "cls": src["cls"], "norm": src["norm"],
             "heads": {task: src["heads"][task]}, "blocks": {}}
    for i, blk in enumerate(model.blocks):
        s = nnx.state(blk)
        if blk.moe is not None:
            s = jax.tree.map(lambda v: v, s)        # a copy whose leaves we replace
            r = blk.moe.router
            if cfg["router"] == "multi_gate":
                s["moe"]["router"]["kernel"] = _rows(s["moe"]["router"]["kernel"], [t])
                if r.noise_kernel is not None:
                    s["moe"]["router"]["noise_kernel"] = _rows(s["moe"]["router"]["noise_kernel"], [t])
            else:
                s["moe"]["router"]["task_embedding"] = _rows(s["moe"]["router"]["task_embedding"], [t])
            if i in kept_experts:
                s["moe"]["experts"] = jax.tree.map(lambda v: _rows(v, kept_experts[i]), s["moe"]["experts"],
                                                   is_leaf=lambda v: isinstance(v, nnx.Variable))
        state["blocks"][i] = s
    return nnx.merge(gd, nnx.State(state))


def _rows(var, rows):
    v = var.replace(var[...][np.asarray(rows)]) if isinstance(var, nnx.Variable) else var[np.asarray(rows)]
    return v


def m3vit_flops(model: M3ViT, batch_shape) -> float:
    """Compiled FLOPs (XLA cost analysis) of ``model(x)`` for inputs of ``batch_shape``."""
    from mtl.flops import compiled_flops

    gd, st = nnx.split(model)
    fn = jax.jit(lambda s, x: nnx.merge(gd, s)(x))
    return compiled_flops(fn, st, jax.ShapeDtypeStruct(tuple(batch_shape), jnp.float32))
