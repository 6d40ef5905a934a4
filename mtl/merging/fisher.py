"""Fisher merging: per-parameter average weighted by diagonal Fisher estimates.

``θ = Σ_k w_k θ_k / Σ_k w_k`` with ``w_k = c_k (F_k + eps)`` per entry, i.e.
``θ0 + Σ_k w_k τ_k / Σ_k w_k``.  ``eps`` (default 1e-8) keeps entries where
every Fisher is zero well defined: they fall back to the ``c``-weighted mean.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl.merging.sources import MergeInputs, as_source, base_path, load_part, run_tree
from mtl.merging.static import compute_dtype, fused, run_kernel
from mtl.merging.tree import PyTree

__all__ = ["fisher", "fisher_core", "estimate_fisher", "FISHER_LABELS"]

FISHER_LABELS = ("sample", "argmax", "expected")


@fused
def fisher_kernel(theta0, taus, raw, fishers, coeffs, eps):
    ct = compute_dtype(theta0.dtype)
    num = jnp.zeros(theta0.shape, ct)
    den = jnp.zeros(theta0.shape, ct)
    for t, f, c in zip(taus, fishers, coeffs):
        w = c * (f.astype(ct) + eps)
        num = num + w * t.astype(ct)
        den = den + w
    merged = (theta0.astype(ct) + num / den).astype(theta0.dtype)  # non-finite inputs reach it (form_taus)
    return merged, merged


def fisher_core(inp: MergeInputs, *, fishers, coeffs=None, eps: float = 1e-8):
    if len(fishers) != inp.num_tasks:
        raise ValueError(f"got {len(fishers)} Fisher estimates for {inp.num_tasks} task vectors")
    srcs = [as_source(f) for f in fishers]
    have = [set(s.paths()) for s in srcs]
    c = jnp.ones((inp.num_tasks,), jnp.float32) if coeffs is None else jnp.asarray(coeffs, jnp.float32)
    if c.shape != (inp.num_tasks,):
        raise ValueError(f"coeffs must have shape ({inp.num_tasks},), got {c.shape}")
    cs = [c[k] for k in range(inp.num_tasks)]
    def fishers_at(p):
        theta0 = inp.theta0(p)
        fs = []
        for k, (s, h) in enumerate(zip(srcs, have)):
            f = load_part(s, p) if base_path(p) in h else None
            if f is None:
                raise ValueError(f"Fisher estimate {k} has no entry for parameter {base_path(p)!r}")
            if np.shape(f) != np.shape(theta0):
                raise ValueError(f"Fisher estimate {k} for {p!r} has shape {np.shape(f)},"
                                 f" the parameter has {np.shape(theta0)}")
            fs.append(f)
        return fs, cs, eps

    yield from run_kernel(inp, fisher_kernel, per_path=fishers_at)


def fisher(pretrained: PyTree, task_vectors: Sequence[PyTree], *, fishers: Sequence[PyTree], coeffs=None,
           eps: float = 1e-8) -> PyTree:
    """Fisher merging.  ``fishers[k]`` is a pytree like ``pretrained`` (diagonal
    Fisher of model ``k``, e.g. from :func:`estimate_fisher`); ``coeffs``
    optional per-model scalars ``c_k`` (default 1).  With equal Fishers this is
    weight averaging."""
    return run_tree(fisher_core, pretrained, task_vectors, fishers=fishers, coeffs=coeffs, eps=eps)


def _log_probs(logits_fn, params, x):
    return jax.nn.log_softmax(logits_fn(params, x[None])[0].astype(jnp.float32), axis=-1)


def _per_example_sq_grads(logits_fn, params, x, key, labels):
    """Squared gradient(s) of one example's log-likelihood, weighted as the estimator requires."""
    logp = _log_probs(logits_fn, params, x)
    if labels == "expected":
        if logp.ndim != 1:
            raise ValueError(f"labels='expected' needs logits of shape [batch, classes], got {(1,) + logp.shape}")
        jac = jax.jacrev(lambda q: _log_probs(logits_fn, q, x))(params)  # leaves [C, *shape]
        probs = jax.lax.stop_gradient(jnp.exp(logp))
        return jax.tree.map(lambda g: jnp.tensordot(probs, jnp.square(g.astype(jnp.float32)), axes=1), jac)
    if labels == "argmax":
        y = jnp.argmax(logp, axis=-1)
    else:
        y = jax.random.categorical(key, logp, axis=-1)
    y = jax.lax.stop_gradient(y)

    def loglik(q):
        lp = _log_probs(logits_fn, q, x)
        return jnp.sum(jnp.take_along_axis(lp, y[..., None], axis=-1))

    return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), jax.grad(loglik)(params))


def estimate_fisher(logits_fn, params: PyTree, inputs, *, labels: str = "sample", key=None, seed: int = 0,
                    batch_size: int = 32) -> PyTree:
    """Diagonal Fisher ``E_x E_{y~p(y|x)} [(∂ log p(y|x) / ∂θ)²]`` over unlabelled inputs.

    ``logits_fn(params, x)`` maps a batch ``[B, ...]`` to logits ``[B, C]``
    (or ``[B, ..., C]``: the log-likelihood of an example is then the sum over
    the extra positions).  ``labels`` chooses ``y``:

    - ``"sample"`` (default): one ``y`` drawn from the model's own predictive
      distribution per example (unbiased single-sample estimate; the key of
      example ``i`` is ``fold_in(key, i)``, ``key`` defaults to
      ``jax.random.key(seed)``);
    - ``"argmax"``: the model's most likely label (deterministic, biased);
    - ``"expected"``: the exact expectation over all ``C`` labels (``C`` times
      the cost; 2-D logits only).

    Per-example gradients (``vmap``) squared, averaged over examples; float32
    result with the structure of ``params``.  ``inputs`` is an array
    ``[N, ...]`` (processed ``batch_size`` at a time) or an iterable of
    batches.
    """
    if labels not in FISHER_LABELS:
        raise ValueError(f"labels must be one of {FISHER_LABELS}, got {labels!r}")
    key = jax.random.key(seed) if key is None else key

    @jax.jit
    def batch_sum(params, xb, offset):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(xb.shape[0]))
        sq = jax.vmap(lambda x, k: _per_example_sq_grads(logits_fn, params, x, k, labels))(xb, keys)
        # tensordot, not a sum over the leading axis of the [B, ...] stack (a slow XLA:CPU path)
        ones = jnp.ones((xb.shape[0],), jnp.float32)
        return jax.tree.map(lambda g: jnp.tensordot(ones, g, axes=1), sq)

    if hasattr(inputs, "shape"):
        batches = (inputs[i:i + batch_size] for i in range(0, inputs.shape[0], batch_size))
    else:
        batches = iter(inputs)
    total, n = None, 0
    for xb in batches:
        s = batch_sum(params, xb, n)
        total = s if total is None else jax.tree.map(jnp.add, total, s)
        n += int(np.shape(xb)[0])
    if n == 0:
        raise ValueError("estimate_fisher got no inputs")
    return jax.tree.map(lambda t: t / n, total)

