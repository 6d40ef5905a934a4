"""TaskExpert (Ye & Xu, ICCV 2023), simplified for a ViT backbone.

At each of ``expert_layers`` (backbone block outputs ``z [B, L, d]``):

* E shared experts (``MLPExperts``, dense: every expert sees every token) decompose the
  tokens into task-generic features ``f_i(z) [B, L, E, d]``;
* each task t has a per-token gate over E + 1 candidates: the E experts and its own
  **feature memory** ``m_t`` (the extra expert): ``g_t = softmax(z W_t + b_t)``;
* the task feature of the layer is ``u_t = sum_i g_t,i f_i(z) + g_t,E m_t``;
* the memory is updated layer by layer: ``m_t <- LayerNorm(m_t + u_t)`` (``m_t`` starts at 0).

Task t's prediction reads the mean over tokens of its final memory. Simplifications (not the
paper's exact design): the backbone is a plain ViT whose blocks all tasks share; the memory
update is a residual sum with a LayerNorm instead of the paper's gated update; decoders are
the linear task heads of ``mtl``. ``forward_with_aux`` returns the gate probabilities per
layer and task (``aux["gates"][task] = [g [B, L, E+1], ...]``) and no auxiliary loss.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.nn.layers import TransformerBlock, dense, layer_norm
from mtl.nn.moe.experts import MLPExperts, stacked_param
from mtl.sharding import constrain
from mtl.nn.multitask import TaskHeads, build_heads
from mtl.tasks import Task, TaskSet

_gate_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                               batch_axis=(0,))


class TaskExpertLayer(nnx.Module):
    def __init__(self, dim: int, num_tasks: int, num_experts: int, hidden: int, *, rngs: nnx.Rngs):
        self.num_experts, self.num_tasks = num_experts, num_tasks
        self.experts = MLPExperts(num_experts, dim, hidden, dim, rngs=rngs)
        self.gate = stacked_param(rngs, _gate_init, (num_tasks, dim, num_experts + 1), ("task", "embed", "expert"))
        self.gate_bias = stacked_param(rngs, nnx.initializers.zeros_init(), (num_tasks, num_experts + 1),
                                       ("task", "expert"))
        self.norms = nnx.List([layer_norm(dim, rngs=rngs) for _ in range(num_tasks)])

    def __call__(self, z, memory):
        """``z [B, L, d]``, ``memory [T, B, L, d]`` -> (new memory, gates [T, B, L, E+1])."""
        f = self.experts(z)                                                        # [B, L, E, d]
        logits = jnp.einsum("bld,tde->tble", z, self.gate[...]) + self.gate_bias[...][:, None, None]
        g = jax.nn.softmax(logits, axis=-1)
        u = jnp.einsum("tble,bled->tbld", g[..., :-1], f) + g[..., -1:] * memory
        new = jnp.stack([self.norms[t](memory[t] + u[t]) for t in range(self.num_tasks)])
        return new, g


class TaskExpertViT(TaskHeads, nnx.Module):
    def __init__(self, input_shape: Sequence[int], tasks: Sequence[Task], *, patch: int = 4, dim: int = 64,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, num_experts: int = 4,
                 expert_hidden: int | None = None, expert_layers: Sequence[int] | None = None, rngs: nnx.Rngs):
        h, w, c = (int(s) for s in input_shape)
        if h % patch or w % patch:
            raise ValueError(f"TaskExpertViT: image {h}x{w} is not divisible by patch {patch}")
        self.task_specs = tuple(TaskSet(tasks))
        self.input_shape, self.patch = (h, w, c), patch
        layers = tuple(range(1, depth, 2)) if expert_layers is None else tuple(int(i) for i in expert_layers)
        bad = [i for i in layers if not 0 <= i < depth]
        if bad or not layers:
            raise ValueError(f"expert_layers must be non-empty block indices in [0, {depth}); got {list(layers)}")
        self.expert_layers = layers
        n = (h // patch) * (w // patch)
        self.embed = dense(patch * patch * c, dim, (None, "embed"), rngs=rngs)
        self.pos = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed"))(rngs.params(),
                                                                                                  (n, dim)))
        self.blocks = nnx.List([TransformerBlock(dim, num_heads, mlp_ratio, rngs=rngs) for _ in range(depth)])
        hidden = int(expert_hidden or dim)
        self.experts = nnx.List([TaskExpertLayer(dim, len(self.task_specs), num_experts, hidden, rngs=rngs)
                                 for _ in layers])
        self.heads = build_heads(self.task_specs, dim, rngs)
        self.out_features = dim

    def forward_with_aux(self, x):
        if x.ndim == 3:
            x = x[..., None]
        b, h, w, c = x.shape
        p = self.patch
        z = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
        z = constrain(self.embed(z) + self.pos[...][None], ("batch", "length", "embed"))
        memory = jnp.zeros((len(self.task_specs),) + z.shape, z.dtype)
        gates, j = [], 0
        for i, blk in enumerate(self.blocks):
            z = blk(z)
            if i in self.expert_layers:
                memory, g = self.experts[j](z, memory)
                gates.append(g)
                j += 1
        names = [t.name for t in self.task_specs]
        out = {t: self.heads[t](memory[k].mean(axis=1)) for k, t in enumerate(names)}
        return out, {"gates": {t: [g[k] for g in gates] for k, t in enumerate(names)}}

    def __call__(self, x) -> dict:
        return self.forward_with_aux(x)[0]
