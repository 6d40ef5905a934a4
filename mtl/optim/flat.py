"""F-MTL helper: the per-task ascent perturbation ρ g_t/‖g_t‖.

The trainer owns the rest of F-MTL (for each task, take the gradient at
θ + ε_t, h_t = g̃_t − g_t, update with Agg({g_t}) + Agg({h_t}))."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def fmtl_perturbation(task_grads, rho: float = 0.05, eps: float = 1e-12):
    """ε_t = ρ g_t/‖g_t‖ for every task t.

    ``task_grads`` is a pytree whose leaves have a leading task axis T (the
    per-task gradients g_t, stacked); ‖g_t‖ is the norm over all leaves. A
    zero gradient gives a zero perturbation (no NaN)."""
    leaves = jax.tree.leaves(task_grads)
    if not leaves:
        raise ValueError("fmtl_perturbation: task_grads has no array leaves")
    t = leaves[0].shape[0]
    sq = sum(jnp.sum(jnp.reshape(leaf, (t, -1)).astype(jnp.float32) ** 2, axis=1)
             for leaf in leaves)
    norm = jnp.sqrt(sq)
    scale = jnp.where(norm > eps, rho / jnp.where(norm > eps, norm, 1.0), 0.0)

    def one(leaf):
        s = scale.reshape((t,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)
        return leaf * s

    return jax.tree.map(one, task_grads)
