"""Gradient-conflict diagnostics from the Gramian."""
from __future__ import annotations

import jax.numpy as jnp

from mtl.optim.base import masked_gram, safe_div, task_norms


def gradient_stats(gram, present=None) -> dict:
    """Pairwise cosines, conflict fraction and norms of the task gradients.

    Returns ``cosines`` (T, T) (0 where a gradient is zero or a task absent;
    diagonal 1 for non-zero gradients), ``conflict_fraction`` = share of the
    pairs i < j of present tasks with cos(g_i, g_j) < 0 (0 when there are no
    pairs), and ``norms`` (T,) = ‖g_t‖ = sqrt(G_tt). Jittable."""
    gram = jnp.asarray(gram)
    t = gram.shape[0]
    mask = jnp.ones((t,), gram.dtype) if present is None else jnp.asarray(present).astype(gram.dtype)
    gram = masked_gram(gram, mask)
    norms = task_norms(gram)
    cos = safe_div(gram, norms[:, None] * norms[None, :])
    cos = jnp.clip(cos, -1.0, 1.0)
    upper = jnp.triu(jnp.ones((t, t), bool), k=1) & (mask[:, None] > 0) & (mask[None, :] > 0)
    conflicts = jnp.sum(upper & (cos < 0))
    frac = safe_div(conflicts.astype(gram.dtype), jnp.sum(upper).astype(gram.dtype))
    return {"cosines": cos, "conflict_fraction": frac, "norms": norms}
