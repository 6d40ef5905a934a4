"""Twin-Merging: a shared merged expert plus SVD-compressed exclusive knowledge, mixed per input.

    twin = TwinMerge.build(pretrained, task_vectors, task_names, lam=0.3, rank_frac=0.1)
    twin = twin.with_router(train_router(features_fn, twin.shared, batches_per_task))
    out = twin.apply(apply_fn, features_fn, x)                 # {task: logits}, per-input merged weights

1. Shared expert ``θ* = θ0 + lam Σ_k τ_k`` (task arithmetic).
2. Exclusive vectors ``v_t = θ_t − θ* = τ_t − lam Σ_k τ_k`` on the included
   (non-excluded) paths; each matrix (any tensor with ``ndim >= 2``, viewed
   as ``[prod(shape[:-1]), shape[-1]]``) is replaced by its truncated SVD
   keeping ``r = max(1, ceil(rank_frac · min(m, n)))`` singular values.
   Vectors (biases, norm scales) are kept dense (``keep_vectors=True``, the
   default: they are tiny) or dropped (``False``).  ``rank_frac = 1`` keeps
   ``v_t`` exactly (up to float error).
3. Router: a linear layer on ``θ*``'s pooled features, trained with
   cross-entropy to predict which task an input comes from
   (:func:`train_router`); ``w(x) = softmax(router(features(θ*, x)))``.
4. Per input: ``θ(x) = θ* + Σ_t w_t(x) v̂_t``.

``apply(..., mode=)``:

- ``"soft"`` (default, exact): builds each sample's merged weights and runs
  the forward per sample (``jax.lax.map`` over chunks of ``chunk`` samples,
  vmapped inside a chunk).  Memory: ``chunk × |θ|`` extra.
- ``"top1"``: runs the whole batch once per task with ``θ* + v̂_t`` and gives
  each sample the outputs of its arg-max task: ``K`` forwards, no per-sample
  weights.  Exact when the router is one-hot; otherwise it keeps only the
  top task's exclusive knowledge (an approximation).

Excluded paths (task heads) are taken from ``pretrained`` unchanged.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from mtl.merging.tree import PyTree, flatten, unflatten

__all__ = ["compress", "decompress", "TwinMerge", "train_router", "router_logits"]


def compress(v, rank_frac: float = 0.1, keep_vectors: bool = True) -> dict | None:
    """Truncated SVD of one exclusive tensor: ``{"u": [m, r] (= U S), "vt": [r, n], "shape"}``.

    Tensors with ``ndim < 2`` are kept dense (``{"dense": v}``) or dropped (None).
    """
    if not 0 < rank_frac <= 1:
        raise ValueError(f"rank_frac must be in (0, 1], got {rank_frac}")
    v = jnp.asarray(v)
    if v.ndim < 2:
        return {"dense": v} if keep_vectors else None
    m = math.prod(v.shape[:-1])
    mat = v.reshape(m, v.shape[-1]).astype(jnp.float32)
    u, s, vt = jnp.linalg.svd(mat, full_matrices=False)
    r = max(1, math.ceil(rank_frac * min(mat.shape)))
    return {"u": u[:, :r] * s[:r], "vt": vt[:r], "shape": tuple(v.shape), "dtype": v.dtype}


def decompress(c) -> jax.Array | None:
    if c is None:
        return None
    if "dense" in c:
        return c["dense"]
    return (c["u"] @ c["vt"]).reshape(c["shape"]).astype(c["dtype"])


def router_logits(router: Mapping, feats):
    return feats.astype(jnp.float32) @ router["w"] + router["b"]


def train_router(features_fn: Callable, shared: PyTree, batches: Callable, num_tasks: int, *, steps: int = 300,
                 lr: float = 1e-2, seed: int = 0, log_every: int = 0, log: Callable = print) -> dict:
    """Fit a linear router on ``features_fn(shared, x)`` to predict the task of ``x``.

    ``batches(i) -> [x_task0, ..., x_task{K-1}]`` (inputs of each task).
    Returns ``{"w": [D, K], "b": [K]}``.
    """
    x0 = batches(0)
    d = features_fn(shared, x0[0][:1]).shape[-1]
    key = jax.random.key(seed)
    router = {"w": jax.random.normal(key, (d, num_tasks)) * (1.0 / math.sqrt(d)), "b": jnp.zeros((num_tasks,))}
    tx = optax.adam(lr)
    opt = tx.init(router)

    @jax.jit
    def step(router, opt, xs):
        x = jnp.concatenate(xs)
        y = jnp.concatenate([jnp.full((xi.shape[0],), k) for k, xi in enumerate(xs)])
        feats = jax.lax.stop_gradient(features_fn(shared, x))

        def loss(r):
            logp = jax.nn.log_softmax(router_logits(r, feats))
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

        l, g = jax.value_and_grad(loss)(router)
        upd, opt = tx.update(g, opt, router)
        return optax.apply_updates(router, upd), opt, l

    for i in range(steps):
        router, opt, loss = step(router, opt, list(batches(i)))
        if log_every and (i % log_every == 0 or i == steps - 1):
            log(f"  router step {i}: xent {float(loss):.4f}")
    return router


@dataclasses.dataclass
class TwinMerge:
    """Shared expert ``shared`` (pytree), compressed exclusive vectors per task, optional router."""

    shared: PyTree
    exclusive: list  # per task: {path: compressed or None}
    task_names: list
    router: Mapping | None = None

    @classmethod
    def build(cls, pretrained: PyTree, task_vectors: Sequence[PyTree], task_names: Sequence[str], *,
              lam: float = 0.3, rank_frac: float = 0.1, keep_vectors: bool = True) -> "TwinMerge":
        from mtl.merging.static import task_arithmetic

        if len(task_vectors) != len(task_names):
            raise ValueError(f"{len(task_vectors)} task vectors for {len(task_names)} task names")
        shared = task_arithmetic(pretrained, task_vectors, lam=lam)
        fs, f0 = flatten(shared), flatten(pretrained)
        flats = [flatten(t) for t in task_vectors]
        exclusive = []
        for f in flats:
            ex = {}
            for p, tau in f.items():
                if tau is None:
                    continue
                shared_delta = fs[p].astype(jnp.float32) - f0[p].astype(jnp.float32)
                ex[p] = compress(tau.astype(jnp.float32) - shared_delta, rank_frac, keep_vectors)
            exclusive.append(ex)
        return cls(shared, exclusive, list(task_names))

    def with_router(self, router: Mapping) -> "TwinMerge":
        return dataclasses.replace(self, router=router)

    def exclusive_stacked(self) -> dict:
        """``{path: [K, *shape]}`` of the decompressed exclusive vectors (dropped ones are absent)."""
        out = {}
        for p in self.exclusive[0]:
            if self.exclusive[0][p] is None:
                continue
            out[p] = jnp.stack([decompress(ex[p]).astype(jnp.float32) for ex in self.exclusive])
        return out

    def num_stored(self) -> tuple[int, int]:
        """(numbers stored for the exclusive knowledge, numbers of the dense exclusive vectors)."""
        stored = dense = 0
        for ex in self.exclusive:
            for c in ex.values():
                if c is None:
                    continue
                if "dense" in c:
                    stored += c["dense"].size
                    dense += c["dense"].size
                else:
                    stored += c["u"].size + c["vt"].size
                    dense += math.prod(c["shape"])
        return stored, dense

    def weights(self, features_fn: Callable, x):
        if self.router is None:
            raise ValueError("Twin-Merging needs a router: twin.with_router(train_router(...))")
        return jax.nn.softmax(router_logits(self.router, features_fn(self.shared, x)), axis=-1)

    def make_apply(self, apply_fn: Callable, features_fn: Callable | None = None, *, mode: str = "soft",
                   chunk: int = 32) -> Callable:
        """A jitted ``f(x, weights=None) -> {task: logits}``; ``weights [B, K]`` overrides the router."""
        if mode not in ("soft", "top1"):
            raise ValueError(f"mode must be 'soft' or 'top1', got {mode!r}")
        theta = flatten(self.shared)
        stacked = self.exclusive_stacked()
        like = self.shared

        def params_for(w, theta, stacked):  # w: [K]; task vectors passed in, not baked into the jit
            out = dict(theta)
            for p, v in stacked.items():
                out[p] = (theta[p].astype(jnp.float32) + jnp.tensordot(w, v, axes=1)).astype(theta[p].dtype)
            return unflatten(out, like=like)

        @jax.jit
        def run(x, w, theta, stacked):
            if mode == "top1":
                k = w.shape[-1]
                outs = [apply_fn(params_for(jax.nn.one_hot(t, k), theta, stacked), x) for t in range(k)]
                pick = jnp.argmax(w, axis=-1)
                return jax.tree.map(lambda *o: jnp.stack(o)[pick, jnp.arange(x.shape[0])], *outs)

            def one(args):
                wi, xi = args
                return jax.tree.map(lambda o: o[0], apply_fn(params_for(wi, theta, stacked), xi[None]))

            return jax.lax.map(one, (w, x), batch_size=chunk)

        def f(x, weights=None):
            w = self.weights(features_fn, x) if weights is None else jnp.asarray(weights, jnp.float32)
            return run(x, w, theta, stacked)

        return f
