"""RegMean: closed-form least-squares merge of linear layers from input Gram matrices.

For a linear layer ``y = x @ W`` (flax kernels are ``[in, out]``) RegMean
solves ``min_W Σ_k ||X_k W − X_k W_k||²``:  ``W = (Σ_k G_k)⁻¹ Σ_k G_k W_k``
with ``G_k = X_kᵀ X_k``, computed here in task-vector form
``θ0 + (Σ_k G̃_k)⁻¹ Σ_k G̃_k τ_k`` (the same W, better conditioned).

Choices:

- Shrinkage: ``G̃ = α G + (1 − α) diag(G)`` (off-diagonal entries times
  ``α``), default ``α = 0.9``.  ``α = 1`` is the exact least-squares solution;
  ``α = 0`` weights each input row of W by ``diag(G_k)`` independently.
- A Gram of size ``d`` applies to a kernel whose leading axes multiply to
  ``d``; the rest are the outputs.  So ``[in, out]`` Linear, ``[in, heads,
  head_dim]`` query/key/value and ``[heads, head_dim, out]`` output kernels,
  and ``[kh, kw, cin, cout]`` convolutions (with ``G`` over flattened
  ``(kh, kw, cin)`` patches) all work.
- Input features that are zero for every model (dead units: a zero row and
  column of ``Σ G``) do not constrain W; their rows take the plain average.
- ``G_k`` is a sum over examples (not a mean): a model whose Gram saw more
  examples weighs more; normalise the Grams yourself if that is unwanted.
- Parameters without a Gram (biases, norms, embeddings) are averaged
  (``θ0 + mean_k τ_k``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl.merging.sources import Chunk, MergeInputs, base_path, run_tree
from mtl.merging.static import average_kernel, compute_dtype, fused, propagate_nonfinite, run_kernel
from mtl.merging.tree import PyTree, flatten

__all__ = ["regmean", "regmean_core", "gram"]


def gram(x, d: int | None = None):
    """``XᵀX`` of layer inputs ``x`` (``[..., d]``, all leading axes are examples), float32."""
    x = jnp.asarray(x)
    d = x.shape[-1] if d is None else d
    x2 = x.reshape(-1, d).astype(jnp.float32)
    return jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST)


def _rows(shape, d: int, path: str) -> int:
    for m in range(1, len(shape) + 1):
        if math.prod(shape[:m]) == d:
            return m
    raise ValueError(f"Gram matrix for {path!r} is {d}x{d}, but no leading axes of the parameter's shape"
                     f" {tuple(shape)} multiply to {d}")


@fused
def regmean_kernel(theta0, taus, raw, grams, alpha):
    ct = compute_dtype(theta0.dtype)
    d = grams[0].shape[0]
    hi = jax.lax.Precision.HIGHEST
    ts = [t.astype(ct).reshape(d, -1) for t in taus]
    gs = [g.astype(ct) for g in grams]
    gs = [alpha * g + (1 - alpha) * jnp.diag(jnp.diag(g)) for g in gs]
    total = sum(gs[1:], gs[0])
    rhs = sum((jnp.matmul(g, t, precision=hi) for g, t in zip(gs[1:], ts[1:])),
              jnp.matmul(gs[0], ts[0], precision=hi))
    dead = jnp.diag(total) <= 0
    sol = jnp.linalg.solve(total + jnp.diag(dead.astype(ct)), rhs)
    sol = jnp.where(dead[:, None], sum(ts[1:], ts[0]) / len(ts), sol)
    merged = propagate_nonfinite(theta0.astype(ct) + sol.reshape(theta0.shape), theta0, raw).astype(theta0.dtype)
    return merged, merged


def _validate_grams(grams, inp: MergeInputs):
    if isinstance(grams, Mapping) or len(grams) != inp.num_tasks:
        raise ValueError(f"grams must be a list of {inp.num_tasks} dicts (path -> Gram matrix), one per model")
    flats = [flatten(g) for g in grams]
    included = {base_path(k) for k in inp.paths}
    for k, f in enumerate(flats):
        if set(f) != set(flats[0]):
            diff = sorted(set(f) ^ set(flats[0]))[0]
            raise ValueError(f"grams[{k}] and grams[0] cover different parameters (first difference {diff!r})")
        for p, g in f.items():
            if p not in included:
                raise ValueError(f"Gram matrix given for {p!r}, which is not a merged parameter"
                                 " (missing from the model or excluded)")
            if np.ndim(g) != 2 or np.shape(g)[0] != np.shape(g)[1] or np.shape(g) != np.shape(flats[0][p]):
                raise ValueError(f"grams[{k}][{p!r}] must be a square [d, d] matrix equal in shape across"
                                 f" models, got {np.shape(g)}")
    return flats


def regmean_core(inp: MergeInputs, *, grams, alpha: float = 0.9):
    if not 0 <= alpha <= 1:
        raise ValueError(f"RegMean alpha must be in [0, 1], got {alpha}")
    flats = _validate_grams(grams, inp)
    for p in inp.paths:
        if isinstance(p, Chunk) and p.base in flats[0]:
            raise ValueError(f"RegMean cannot merge {p.base!r} in row chunks (its Gram matrix couples the rows):"
                             " merge without chunk_bytes, or with a budget above K + 1 copies of that tensor")
    for p in inp.paths:
        if p in flats[0]:
            _rows(np.shape(inp.theta0(p)), np.shape(flats[0][p])[0], p)
            yield from run_kernel(inp, regmean_kernel, alpha, paths=(p,), per_path=lambda q: ([f[q] for f in flats],))
        else:
            yield from run_kernel(inp, average_kernel, paths=(p,))


def regmean(pretrained: PyTree, task_vectors: Sequence[PyTree], *, grams: Sequence[Mapping], alpha: float = 0.9
            ) -> PyTree:
    """RegMean merge.  ``grams[k]`` maps a kernel's path (``"enc/layers/0/kernel"``)
    to ``G_k = X_kᵀX_k`` of that layer's inputs under model ``k`` (see
    :func:`gram`); all models must give Grams for the same paths."""
    return run_tree(regmean_core, pretrained, task_vectors, grams=grams, alpha=alpha)
