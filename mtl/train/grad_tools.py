"""Building blocks of per-task gradients: splitting parameters into shared and head parts,
which tasks a batch (or each micro-batch) labels, a gradient-scaling identity, and the
rows of a Jacobian by ordinary backward passes. Used by :mod:`mtl.train.routes`,
:mod:`mtl.train.accumulate` and the train step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def split_shared(params):
    """(shared, heads, layout): every top-level entry except ``heads`` is shared.

    ``join(shared, heads, layout)`` rebuilds a tree with the structure of ``params``
    (the parts may come back from jax transformations as plain dicts)."""
    keys = list(params.keys())
    shared = nnx.State({k: params[k] for k in keys if k != "heads"})
    heads = nnx.State({k: params[k] for k in keys if k == "heads"})
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    order = []
    for path, _ in flat:
        k = getattr(path[0], "key", getattr(path[0], "name", None))
        if not order or order[-1][0] != k:
            order.append([k, 0])
        order[-1][1] += 1
    return shared, heads, (treedef, tuple((k, n) for k, n in order))


def join(shared, heads, layout):
    treedef, order = layout
    leaves = []
    for k, n in order:
        part = heads[k] if k == "heads" else shared[k]
        sub = jax.tree.leaves(part)
        if len(sub) != n:
            raise ValueError(f"join: entry {k!r} has {len(sub)} leaves, expected {n}")
        leaves.extend(sub)
    return jax.tree.unflatten(treedef, leaves)


def present_mask(tasks, batch):
    """(T,) bool: the task has at least one labelled sample in the batch."""
    masks = batch.get("masks") or {}
    out = []
    for t in tasks:
        m = masks.get(t.name)
        out.append(jnp.array(True) if m is None else jnp.any(m.astype(bool)))
    return jnp.stack(out)


@jax.custom_vjp
def scale_grad(x, s):
    """Identity forward; the cotangent flowing back into ``x`` is multiplied by ``s``."""
    return x


def _sg_fwd(x, s):
    return x, s


def _sg_bwd(s, g):
    return g * s.astype(g.dtype), jnp.zeros_like(s)


scale_grad.defvjp(_sg_fwd, _sg_bwd)


def label_shares(tasks, micro):
    """(shares [K, T], present [T]) for a batch split into micro-batches ``micro`` ([K, B/K, ...]).

    ``shares[m, t] = n_t^m / n_t``: micro-batch m's share of task t's labelled samples in
    the whole batch (0 where the batch has none). Task losses are masked means, so the
    full-batch loss is ``L_t = Σ_m shares[m, t] L_t^m`` whatever the split of the labels,
    and so is every per-task gradient. ``present``: the task has a label in the batch."""
    leaf = jax.tree.leaves(micro)[0]
    k, per = leaf.shape[0], leaf.shape[1]
    masks = micro.get("masks") or {}
    n = jnp.stack([jnp.sum(masks[t.name].astype(jnp.float32), axis=1) if t.name in masks
                   else jnp.full((k,), float(per), jnp.float32) for t in tasks], axis=1)   # [K, T]
    total = jnp.sum(n, axis=0, keepdims=True)
    return n / jnp.maximum(total, 1.0), total[0] > 0


def pullback_rows(pull, cotangents, unroll_up_to: int = 16):
    """``pull`` applied to every row of ``cotangents``, stacked: one ordinary backward pass
    per row, unrolled for up to ``unroll_up_to`` rows (else ``lax.map``). Measured on CPU
    this is ~1.7x faster than a vmapped pullback (``jax.jacrev``), which turns every weight
    gradient into a batched matmul."""
    if cotangents.shape[0] <= unroll_up_to:
        rows = [pull(cotangents[i]) for i in range(cotangents.shape[0])]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)
    return jax.lax.map(pull, cotangents)


def per_task_pullbacks(vec, *args, unroll_up_to: int = 16):
    """Rows of the Jacobian of ``vec(*args) -> (out [R], aux)`` w.r.t. each of ``args``:
    one forward (``jax.vjp``), then one ordinary backward pass per row
    (:func:`pullback_rows`). Returns (*jacobians with leading axis R, aux)."""
    out, pullback, aux = jax.vjp(vec, *args, has_aux=True)
    jacs = pullback_rows(pullback, jnp.eye(out.shape[0], dtype=out.dtype), unroll_up_to)
    return (*jacs, aux)
