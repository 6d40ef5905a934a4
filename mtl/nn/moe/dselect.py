"""DSelect-k (Hazimeh et al., NeurIPS 2021): a differentiable top-k gate for multi-task MoE.

Task t's gate selects (a soft version of) ``k`` of the ``E`` shared experts with ``k``
*single-expert selectors*. Selector i holds ``m = ceil(log2 E)`` logits ``z_i(x)``; the
smooth-step ``S`` (cubic, exactly 0 below ``-gamma/2`` and 1 above ``gamma/2``) turns them
into soft bits, and expert e's selection weight is ``r_i(e) = prod_j (S(z_ij) if bit j of e
else 1 - S(z_ij))`` (binary code of e, most significant bit first) — a point on the simplex
that reaches a one-hot vertex once every ``z_ij`` leaves ``[-gamma/2, gamma/2]``. The
selectors are mixed by ``softmax(w(x))`` over ``k``: expert weights ``q(x) = sum_i
softmax(w)_i r_i``, output ``sum_e q_e f_e(x)``. Both ``z`` and ``w`` are linear in x
(per-example gating; initialised uniform in ``±gamma/100`` and ``±0.05``).

Regularisers, added to the trainer's objective through ``aux["loss"]`` (mean over the
batch and selectors): ``entropy_weight`` times the entropy of each selector's ``r_i``
(pushes selectors to a single expert; off by default), and, when ``E`` is not a power of 2
(codes past ``E - 1`` select no expert), ``validity_weight`` times ``1 / sum_e r_i(e)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl.nn.encoders import MLP
from mtl.nn.moe.architectures import _names
from mtl.nn.moe.experts import build_experts, stacked_param


def smooth_step(t, gamma: float):
    """0 for ``t <= -gamma/2``, 1 for ``t >= gamma/2``, ``-2 t^3/gamma^3 + 3 t/(2 gamma) + 1/2`` between."""
    cubic = -2.0 / gamma ** 3 * t ** 3 + 1.5 / gamma * t + 0.5
    return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def binary_codes(num_experts: int) -> np.ndarray:
    """``[E, m]`` booleans: bit j (most significant first) of each expert's index."""
    m = max(1, math.ceil(math.log2(num_experts)))
    return np.array([[(e >> (m - 1 - j)) & 1 for j in range(m)] for e in range(num_experts)], bool)


def selector_outputs(z, codes, gamma: float):
    """``z [..., k, m]`` -> ``r [..., k, E]``."""
    s = smooth_step(z, gamma)[..., None, :]                    # [..., k, 1, m]
    return jnp.prod(jnp.where(codes, s, 1.0 - s), axis=-1)     # [..., k, E]


def _uniform(scale):
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -scale, scale)


class DSelectK(nnx.Module):
    """``arch(x [B, D]) -> ({task: [B, out_features]}, aux)``; ``aux`` has ``expert_weights
    [T, B, E]``, ``selector_outputs [T, B, k, E]`` and ``loss`` (the weighted regularisers)."""

    def __init__(self, in_features: int, tasks: Sequence, *, num_experts: int = 8, num_nonzeros: int = 2,
                 expert_dim: int = 16, expert_hidden: int | None = None, expert_kind: str = "mlp",
                 gamma: float = 1.0, entropy_weight: float = 0.0, validity_weight: float = 1.0,
                 tower_hidden: Sequence[int] = (), expert_kwargs: dict | None = None, rngs: nnx.Rngs):
        names = _names(tasks)
        if num_experts < 2 or not 1 <= num_nonzeros:
            raise ValueError(f"DSelect-k needs num_experts >= 2 and num_nonzeros >= 1; got {num_experts}, "
                             f"{num_nonzeros}")
        if gamma <= 0:
            raise ValueError(f"DSelect-k gamma (smooth-step width) must be > 0; got {gamma}")
        self.task_names = names
        self.num_experts, self.num_nonzeros, self.gamma = int(num_experts), int(num_nonzeros), float(gamma)
        self.entropy_weight, self.validity_weight = float(entropy_weight), float(validity_weight)
        self.codes = tuple(map(tuple, binary_codes(self.num_experts).tolist()))   # static, hashable
        m, t, k = len(self.codes[0]), len(names), self.num_nonzeros
        self.experts = build_experts(expert_kind, self.num_experts, in_features, expert_dim,
                                     hidden_features=expert_hidden, rngs=rngs, **(expert_kwargs or {}))
        zs = _uniform(self.gamma / 100)
        self.z_kernel = stacked_param(rngs, zs, (t, in_features, k * m), ("task", "embed", None))
        self.z_bias = stacked_param(rngs, zs, (t, k * m), ("task", None))
        ws = _uniform(0.05)
        self.w_kernel = stacked_param(rngs, ws, (t, in_features, k), ("task", "embed", None))
        self.w_bias = stacked_param(rngs, ws, (t, k), ("task", None))
        self.towers = nnx.Dict({n: MLP((expert_dim,), tuple(tower_hidden), rngs=rngs) for n in names})
        self.out_features = self.towers[names[0]].out_features

    def __call__(self, x, train: bool = False):
        if x.ndim != 2:
            raise ValueError(f"DSelectK expects inputs [B, D]; got shape {x.shape}")
        codes = np.asarray(self.codes, bool)
        b, (t, m, k) = x.shape[0], (len(self.task_names), codes.shape[1], self.num_nonzeros)
        out, _ = self.experts.forward(x, shared_input=True)                     # [E, B, h]
        z = (jnp.einsum("bd,tdj->tbj", x, self.z_kernel[...]) + self.z_bias[...][:, None]).reshape(t, b, k, m)
        r = selector_outputs(z, codes, self.gamma)                         # [T, B, k, E]
        w = jax.nn.softmax(jnp.einsum("bd,tdk->tbk", x, self.w_kernel[...]) + self.w_bias[...][:, None], -1)
        q = jnp.einsum("tbk,tbke->tbe", w, r)                                  # [T, B, E]
        mixed = jnp.einsum("tbe,ebh->tbh", q, out)
        feats = {n: self.towers[n](mixed[i]) for i, n in enumerate(self.task_names)}
        loss = jnp.zeros((), jnp.float32)
        if self.entropy_weight:
            loss = loss + self.entropy_weight * jnp.mean(-jnp.sum(r * jnp.log(r + 1e-6), -1))
        if self.validity_weight and self.num_experts != 2 ** m:
            loss = loss + self.validity_weight * jnp.mean(1.0 / (r.sum(-1) + 1e-6))
        return feats, {"expert_weights": q, "selector_outputs": r, "loss": loss}
