"""The dense multi-gate expert layer behind MMoE, CGC, PLE and HoME.

One ``GatedExpertLayer`` holds a pool of E stacked experts and G gates:

* expert e reads input *stream* ``expert_streams[e]`` (PLE: task streams and a shared
  stream; MMoE: one stream for all);
* gate g reads stream ``gate_streams[g]`` and sees only the experts where
  ``visible[g][e]`` is True: its softmax puts exactly 0 on the others (kernel ``[G, d, E]``,
  logical ``("task", "embed", "expert")``; entries for invisible experts stay unused);
* optional **self-gate** (HoME): gate g adds ``sum_e softmax_own(x W_self_g)_e f_e(x)`` over
  the experts in ``own[g]`` (a residual path over its own experts);
* optional **feature gate** (HoME): expert e's input becomes ``x * 2 sigmoid(x B_e A_e)``
  with low rank ``r`` (``A`` starts at 0, so the gate starts at 1).

``layer(inputs) -> (outputs [G, B, h], aux)``; ``inputs`` is ``[B, d]`` (every stream the
same) or ``[S, B, d]``. ``aux`` has ``gate_probs [G, B, E]``, ``self_probs`` (or None) and
``activations [E, B, h]`` (post-nonlinearity expert activations, for dead-unit counts).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl.nn.moe.experts import build_experts, check_expert_count, stacked_param
from mtl.nn.moe.routing import softmax_gate
from mtl.sharding import constrain

_gate_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                               batch_axis=(0,))


def _bool_rows(rows, num_experts, what):
    rows = tuple(tuple(bool(v) for v in r) for r in rows)
    for g, r in enumerate(rows):
        if len(r) != num_experts:
            raise ValueError(f"{what}[{g}] has {len(r)} entries for {num_experts} experts")
    return rows


class GatedExpertLayer(nnx.Module):
    def __init__(self, in_features: int, expert_dim: int, *, expert_streams: Sequence[int],
                 gate_streams: Sequence[int], visible: Sequence[Sequence[bool]],
                 own: Sequence[Sequence[bool]] | None = None, expert_kind: str = "mlp",
                 expert_hidden: int | None = None, feature_gate_rank: int = 0,
                 expert_labels: Sequence[str] | None = None, gate_labels: Sequence[str] | None = None,
                 expert_kwargs: dict | None = None, rngs: nnx.Rngs):
        e, g = len(expert_streams), len(gate_streams)
        check_expert_count(e, what="experts in this layer's pool")
        self.num_experts, self.num_gates = e, g
        self.in_features, self.out_features = in_features, expert_dim
        self.expert_streams = tuple(int(s) for s in expert_streams)
        self.gate_streams = tuple(int(s) for s in gate_streams)
        self.num_streams = max(self.expert_streams + self.gate_streams) + 1
        self.visible = _bool_rows(visible, e, "visible")
        if len(self.visible) != g:
            raise ValueError(f"visible has {len(self.visible)} rows for {g} gates")
        for i, row in enumerate(self.visible):
            if not any(row):
                raise ValueError(f"gate {i} sees no experts")
        self.expert_labels = tuple(expert_labels) if expert_labels is not None else tuple(f"e{i}" for i in range(e))
        self.gate_labels = tuple(gate_labels) if gate_labels is not None else tuple(f"g{i}" for i in range(g))
        self.experts = build_experts(expert_kind, e, in_features, expert_dim, hidden_features=expert_hidden,
                                     rngs=rngs, **(expert_kwargs or {}))
        self.gate_kernel = stacked_param(rngs, _gate_init, (g, in_features, e), ("task", "embed", "expert"))
        own = _bool_rows(own, e, "own") if own is not None else ((False,) * e,) * g
        self.self_rows = tuple(i for i, row in enumerate(own) if any(row))
        self.own = tuple(own[i] for i in self.self_rows)
        self.self_kernel = (stacked_param(rngs, _gate_init, (len(self.self_rows), in_features, e),
                                          ("task", "embed", "expert")) if self.self_rows else None)
        self.feature_gate_rank = int(feature_gate_rank)
        if self.feature_gate_rank:
            r = self.feature_gate_rank
            self.fg_down = stacked_param(rngs, _gate_init, (e, in_features, r), ("expert", "embed", None))
            self.fg_up = stacked_param(rngs, nnx.initializers.zeros_init(), (e, r, in_features),
                                       ("expert", None, "embed"))
        else:
            self.fg_down = self.fg_up = None

    def _streams(self, inputs):
        if inputs.ndim == 2:
            return None
        if inputs.ndim != 3 or inputs.shape[0] < self.num_streams:
            raise ValueError(f"layer inputs must be [B, {self.in_features}] or [streams, B, {self.in_features}] "
                             f"with at least {self.num_streams} streams; got {inputs.shape}")
        return inputs

    def __call__(self, inputs):
        if inputs.shape[-1] != self.in_features:
            raise ValueError(f"layer expects {self.in_features} input features; got shape {inputs.shape}")
        streams = self._streams(inputs)
        # --- experts: [E, B, h]
        if streams is None and self.fg_down is None:
            out, act = self.experts.forward(inputs, shared_input=True)
        else:
            if streams is None:
                xe = jnp.broadcast_to(inputs, (self.num_experts,) + inputs.shape)
            else:
                xe = streams[np.asarray(self.expert_streams)]
            xe = constrain(xe, ("expert", "batch", "embed"))
            if self.fg_down is not None:
                low = jnp.einsum("ebd,edr->ebr", xe, self.fg_down[...])
                xe = xe * 2.0 * jax.nn.sigmoid(jnp.einsum("ebr,erd->ebd", low, self.fg_up[...]))
            out, act = self.experts.forward(xe, shared_input=False)
        # --- gates: [G, B, E]
        if streams is None:
            logits = jnp.einsum("bd,gde->gbe", inputs, self.gate_kernel[...])
        else:
            logits = jnp.einsum("gbd,gde->gbe", streams[np.asarray(self.gate_streams)], self.gate_kernel[...])
        probs = softmax_gate(logits, np.asarray(self.visible)[:, None, :])
        y = jnp.einsum("gbe,ebh->gbh", probs, out)
        self_probs = None
        if self.self_kernel is not None:
            rows = np.asarray(self.self_rows)
            xs = inputs if streams is None else streams[np.asarray(self.gate_streams)[rows]]
            eq = "bd,gde->gbe" if streams is None else "gbd,gde->gbe"
            self_probs = softmax_gate(jnp.einsum(eq, xs, self.self_kernel[...]), np.asarray(self.own)[:, None, :])
            y = y.at[rows].add(jnp.einsum("gbe,ebh->gbh", self_probs, out))
        return y, {"gate_probs": probs, "self_probs": self_probs, "activations": act}
