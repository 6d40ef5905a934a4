"""Sparse training for gradient-conflict mitigation: a fixed parameter mask."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def topk_mask(params, fraction: float, criterion: str = "magnitude", grads=None):
    """Boolean pytree (same structure as ``params``) marking the ``fraction``
    of entries, over all leaves together, with the largest score.

    criterion: 'magnitude' scores |θ|; 'saliency' scores |θ ⊙ g| (SNIP-style,
    first-order change of the loss if the entry were removed) and needs
    ``grads`` with the structure of ``params`` (e.g. the gradient of the summed
    task losses). Exactly round(fraction·N) entries are True (ties broken by
    position). The trainer multiplies the shared parameters' updates by it.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"topk_mask: fraction must be in [0, 1], found {fraction}")
    if criterion == "magnitude":
        scores = jax.tree.map(jnp.abs, params)
    elif criterion == "saliency":
        if grads is None:
            raise ValueError("topk_mask: criterion='saliency' needs grads= (same structure as params)")
        if jax.tree.structure(grads) != jax.tree.structure(params):
            raise ValueError("topk_mask: grads must have the same pytree structure as params, found "
                             f"{jax.tree.structure(grads)} vs {jax.tree.structure(params)}")
        scores = jax.tree.map(lambda p, g: jnp.abs(p * g), params, grads)
    else:
        raise ValueError(f"topk_mask: criterion must be 'magnitude' or 'saliency', found {criterion!r}")
    leaves, treedef = jax.tree.flatten(scores)
    sizes = [leaf.size for leaf in leaves]
    total = sum(sizes)
    k = int(round(fraction * total))
    if total == 0:
        return jax.tree.unflatten(treedef, [jnp.zeros(leaf.shape, bool) for leaf in leaves])
    flat = jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves])
    keep = jnp.zeros((total,), bool)
    if k > 0:
        _, idx = jax.lax.top_k(flat, k)
        keep = keep.at[idx].set(True)
    out, start = [], 0
    for leaf, n in zip(leaves, sizes):
        out.append(jnp.reshape(keep[start:start + n], leaf.shape))
        start += n
    return jax.tree.unflatten(treedef, out)


def apply_mask(updates, mask):
    """Zero the entries of ``updates`` where ``mask`` is False."""
    return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, mask)
