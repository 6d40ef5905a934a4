"""Adaptive merging: AdaMerging (task-/layer-wise, ++) and aTLAS, learned coefficients.

The merged parameters are ``θ = θ0 + Σ_k c_k ⊙ τ_k`` with coefficients at one
of three granularities (:func:`init_coeffs`):

- ``"task"``: one scalar per task, ``c`` has shape ``[K]`` (task-wise AdaMerging);
- ``"layer"``: one scalar per parameter tensor and task, ``{path: [K]}``
  (layer-wise AdaMerging; "layer" = one tensor, as in the paper's code);
- ``"block"``: aTLAS, ``{path: [K, R]}``: each tensor's entries are split into
  ``R`` random groups (:func:`random_partitions`, ``R = 1`` = one coefficient
  per tensor) and each group has its own coefficient per task.

The task vectors are held **once**, stacked per tensor on a leading ``K``
axis (:func:`stack_task_vectors`) and passed to one jitted step as arguments
(not baked in as constants); the step builds the merged parameters, runs the
model's forward on every task's batch, and differentiates the objective with
respect to the coefficients only::

    ada = AdaptiveMerge(apply_fn, pretrained, task_vectors, task_names, granularity="layer")
    coeffs, opt_state = ada.init()
    for batch in batches:                      # {task: x [B, ...]}  (unlabelled inputs)
        coeffs, opt_state, loss = ada.step(coeffs, opt_state, batch)
    merged = ada.merged(coeffs)                # a pytree like ``pretrained``

``apply_fn(params, x) -> {task: logits}`` takes a pytree like ``pretrained``
(build it with :func:`apply_from_graphdef` from an nnx model).  Objectives:
``"entropy"`` (AdaMerging: mean over tasks of the mean Shannon entropy of
task ``t``'s head on task ``t``'s inputs) or ``"xent"`` (aTLAS few-shot:
batches are ``{task: (x, labels)}``).  Optional L1/L2 penalties on the
coefficients (aTLAS) and clamping to an interval after each Adam update
(AdaMerging clamps to ``[0, 1]``).

Sharding: pass ``pretrained`` / task vectors as sharded arrays (e.g.
:func:`fsdp_shard`); the jitted step keeps their layout, the coefficients
are small and replicated, and the results equal the unsharded ones (tested
on 8 simulated devices).

AdaMerging++ = AdaMerging on :func:`ties_masked_vectors` (each task vector
trimmed to its top-k% and restricted to the entries that agree with the
TIES-elected sign).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl.merging.static import ties_thresholds
from mtl.merging.topk import magnitude
from mtl.merging.tree import PyTree, flatten, unflatten

__all__ = [
    "GRANULARITIES", "stack_task_vectors", "ties_masked_vectors", "random_partitions", "init_coeffs",
    "merge_stacked", "entropy", "AdaptiveMerge", "adamerging", "atlas", "apply_from_graphdef",
    "fsdp_shard", "save_coeffs", "load_coeffs",
]

GRANULARITIES = ("task", "layer", "block")


# ---------------------------------------------------------------- layout

def stack_task_vectors(task_vectors: Sequence[PyTree]) -> dict[str, jax.Array]:
    """``{path: [K, *shape]}`` for every included (non-None) path of the task vectors."""
    flats = [flatten(t) for t in task_vectors]
    out = {}
    for p, v in flats[0].items():
        if v is None:
            continue
        out[p] = jnp.stack([jnp.asarray(f[p]) for f in flats])
    return out


def ties_masked_vectors(task_vectors: Sequence[PyTree], k: float = 20.0) -> list[PyTree]:
    """TIES' trim + sign election applied to each task vector, kept per task (AdaMerging++).

    ``τ̂_k = τ_k · [|τ_k| >= t_k] · [sign(τ_k) = s]`` with ``t_k`` the TIES
    threshold (:func:`mtl.merging.ties_thresholds`) and ``s`` the elected
    sign of the trimmed sum; ``Σ_k τ̂_k / n_agree`` would be TIES' mean merge.
    """
    thr = ties_thresholds(task_vectors, k)
    flats = [flatten(t) for t in task_vectors]
    out = [dict() for _ in flats]
    for p, v in flats[0].items():
        if v is None:
            for o in out:
                o[p] = None
            continue
        for i, m in enumerate(_ties_mask([f[p] for f in flats], thr)):
            out[i][p] = m
    return [unflatten(o, like=task_vectors[0]) for o in out]


@jax.jit
def _ties_mask(taus, thr):
    """Per task ``τ_k`` trimmed at ``thr[k]`` and kept where it agrees with the elected sign.

    Sums over the K tasks run over the Python list, not over the leading axis
    of a stacked ``[K, ...]`` array (a slow XLA:CPU path).
    """
    kept = [jnp.where(magnitude(t) >= thr[i], t, 0) for i, t in enumerate(taus)]
    elected = jnp.sign(functools.reduce(jnp.add, [x.astype(jnp.float32) for x in kept]))
    return [jnp.where((jnp.sign(x) == elected) & (elected != 0), x, 0).astype(t.dtype) for x, t in zip(kept, taus)]


def random_partitions(stacked: Mapping[str, Any], num_parts: int, seed: int = 0) -> dict[str, jax.Array] | None:
    """aTLAS' random partitions: ``{path: int32 array of the tensor's shape, values in [0, R)}``.

    Tensor ``path`` draws its groups with ``fold_in(key(seed), crc32(path))``,
    so the partition is reproducible from ``(seed, R)`` alone.  ``R = 1``
    returns None (one coefficient per tensor).
    """
    if num_parts < 1:
        raise ValueError(f"aTLAS needs at least one partition per tensor, got {num_parts}")
    if num_parts == 1:
        return None
    key = jax.random.key(seed)
    return {p: jax.random.randint(jax.random.fold_in(key, zlib.crc32(p.encode())), tuple(v.shape[1:]), 0, num_parts)
            for p, v in stacked.items()}


def init_coeffs(stacked: Mapping[str, Any], granularity: str, num_tasks: int, init: float = 0.3,
                num_parts: int = 1):
    """Initial coefficients: ``[K]`` (task), ``{path: [K]}`` (layer) or ``{path: [K, R]}`` (block)."""
    if granularity == "task":
        return jnp.full((num_tasks,), init, jnp.float32)
    if granularity == "layer":
        return {p: jnp.full((num_tasks,), init, jnp.float32) for p in stacked}
    if granularity == "block":
        return {p: jnp.full((num_tasks, num_parts), init, jnp.float32) for p in stacked}
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def _check_stacked(stacked, num_tasks):
    for p, v in stacked.items():
        if v.shape[0] != num_tasks:
            raise ValueError(f"stacked task vector {p!r} has {v.shape[0]} tasks on axis 0, expected {num_tasks}")


def merge_stacked(theta0: Mapping[str, Any], stacked: Mapping[str, Any], coeffs, partitions=None) -> dict:
    """``{path: θ0 + Σ_k c_k τ_k}`` (flat) from stacked task vectors; differentiable in ``coeffs``.

    ``theta0`` is flat ``{path: array}``; paths not in ``stacked`` are copied.
    Computes in at least float32, returns the ``theta0`` dtype.
    """
    out = {}
    for p, t0 in theta0.items():
        if p not in stacked:
            out[p] = t0
            continue
        tau = stacked[p]
        ct = jnp.promote_types(t0.dtype, jnp.float32)
        c = coeffs if not isinstance(coeffs, Mapping) else coeffs[p]
        c = jnp.asarray(c, ct)
        if c.ndim == 2:  # aTLAS blocks [K, R]
            if partitions is None:
                if c.shape[1] != 1:
                    raise ValueError(f"{p!r}: {c.shape[1]} blocks per task need partitions")
                delta = jnp.tensordot(c[:, 0], tau.astype(ct), axes=1)
            else:  # a sum over the K slices, not over the leading axis of the stack (slow on XLA:CPU)
                delta = functools.reduce(jnp.add, [c[k, partitions[p]] * tau[k].astype(ct) for k in range(c.shape[0])])
        else:
            delta = jnp.tensordot(c, tau.astype(ct), axes=1)
        out[p] = (t0.astype(ct) + delta).astype(t0.dtype)
    return out


# ---------------------------------------------------------------- objectives

def entropy(logits) -> jax.Array:
    """Mean over the batch of the Shannon entropy (nats) of ``softmax(logits)``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


def _xent(logits, labels):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1))


def apply_from_graphdef(graphdef, *rest) -> Callable:
    """``apply_fn(params, x) -> nnx.merge(graphdef, params, *rest)(x)``.

    Split the model as ``graphdef, params, *rest = nnx.split(model, nnx.Param, ...)``;
    ``params`` may be the pure dict ``nnx.to_pure_dict(params)`` (what merging uses).
    """
    from flax import nnx

    def apply_fn(params, x):
        return nnx.merge(graphdef, params, *rest)(x)

    return apply_fn


# ---------------------------------------------------------------- the adaptive step

@dataclasses.dataclass
class AdaptiveMerge:
    """One jitted step ``(coeffs, opt_state, batch) -> (coeffs, opt_state, loss)``; see the module docstring.

    ``task_names[k]`` names the head evaluated for ``task_vectors[k]`` and the
    batch entry for that task.
    """

    apply_fn: Callable
    pretrained: PyTree
    task_vectors: Sequence[PyTree] | None
    task_names: Sequence[str]
    granularity: str = "layer"
    init_value: float = 0.3
    lr: float = 1e-3
    clamp: tuple | None = (0.0, 1.0)
    objective: str = "entropy"
    num_parts: int = 1
    seed: int = 0
    l1: float = 0.0
    l2: float = 0.0
    stacked: Mapping | None = None  # give pre-stacked (possibly sharded) task vectors instead of task_vectors

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.objective not in ("entropy", "xent"):
            raise ValueError(f"objective must be 'entropy' or 'xent', got {self.objective!r}")
        if self.stacked is None:
            if self.task_vectors is None:
                raise ValueError("give task_vectors or stacked")
            self.stacked = stack_task_vectors(self.task_vectors)
        if not self.stacked:
            raise ValueError("no parameter is included in the task vectors (all excluded?)")
        self.task_names = list(self.task_names)
        self.num_tasks = len(self.task_names)
        _check_stacked(self.stacked, self.num_tasks)
        # device arrays once (host numpy arguments would be copied in on every step); sharded arrays stay as they are
        self.stacked = {p: jnp.asarray(v) for p, v in self.stacked.items()}
        self.theta0 = {p: jnp.asarray(v) for p, v in flatten(self.pretrained).items()}
        missing = [p for p in self.stacked if p not in self.theta0]
        if missing:
            raise ValueError(f"task vector path {missing[0]!r} is not in the pretrained parameters")
        for p, v in self.stacked.items():
            if tuple(v.shape[1:]) != tuple(np.shape(self.theta0[p])):
                raise ValueError(f"parameter {p!r}: pretrained has shape {tuple(np.shape(self.theta0[p]))},"
                                 f" task vectors {tuple(v.shape[1:])}")
        self.partitions = random_partitions(self.stacked, self.num_parts, self.seed) \
            if self.granularity == "block" else None
        self.tx = optax.adam(self.lr)
        self._step = jax.jit(self._step_impl, donate_argnums=(0, 1))
        self._loss = jax.jit(self._loss_impl)

    # -- pure pieces
    def init(self, coeffs=None):
        c = init_coeffs(self.stacked, self.granularity, self.num_tasks, self.init_value, self.num_parts) \
            if coeffs is None else jax.tree.map(jnp.asarray, coeffs)
        return c, self.tx.init(c)

    def _merged_flat(self, coeffs, theta0, stacked, partitions):
        return merge_stacked(theta0, stacked, coeffs, partitions)

    def _objective(self, coeffs, theta0, stacked, partitions, batch):
        params = unflatten(self._merged_flat(coeffs, theta0, stacked, partitions), like=self.pretrained)
        sup = self.objective == "xent"
        xs = [batch[t][0] if sup else batch[t] for t in self.task_names]
        per_task = []
        if len({tuple(x.shape[1:]) for x in xs}) == 1:  # one forward on the concatenated batch
            out = self.apply_fn(params, jnp.concatenate(xs))
            sizes = np.cumsum([0] + [x.shape[0] for x in xs])
            outs = [out[t][sizes[i]:sizes[i + 1]] for i, t in enumerate(self.task_names)]
        else:
            outs = [self.apply_fn(params, x)[t] for x, t in zip(xs, self.task_names)]
        for i, t in enumerate(self.task_names):
            per_task.append(_xent(outs[i], batch[t][1]) if sup else entropy(outs[i]))
        per_task = jnp.stack(per_task)
        loss = jnp.mean(per_task)
        leaves = jax.tree.leaves(coeffs)
        if self.l1:
            loss = loss + self.l1 * sum(jnp.sum(jnp.abs(c)) for c in leaves)
        if self.l2:
            loss = loss + self.l2 * sum(jnp.sum(c * c) for c in leaves)
        return loss, per_task

    def _step_impl(self, coeffs, opt_state, batch, theta0, stacked, partitions):
        (loss, per_task), g = jax.value_and_grad(self._objective, has_aux=True)(
            coeffs, theta0, stacked, partitions, batch)
        updates, opt_state = self.tx.update(g, opt_state, coeffs)
        coeffs = optax.apply_updates(coeffs, updates)
        if self.clamp is not None:
            lo, hi = self.clamp
            coeffs = jax.tree.map(lambda c: jnp.clip(c, lo, hi), coeffs)
        return coeffs, opt_state, loss

    def _loss_impl(self, coeffs, batch, theta0, stacked, partitions):
        return self._objective(coeffs, theta0, stacked, partitions, batch)

    # -- public
    def step(self, coeffs, opt_state, batch):
        """One Adam step on the coefficients; ``loss`` is the objective before the update."""
        return self._step(coeffs, opt_state, batch, self.theta0, self.stacked, self.partitions)

    def loss(self, coeffs, batch):
        """``(loss, per_task_objective [K])`` at ``coeffs`` without updating."""
        return self._loss(coeffs, batch, self.theta0, self.stacked, self.partitions)

    def grad(self, coeffs, batch):
        return jax.grad(lambda c: self._objective(c, self.theta0, self.stacked, self.partitions, batch)[0])(coeffs)

    def merged(self, coeffs) -> PyTree:
        """The merged parameters (a pytree like ``pretrained``)."""
        return unflatten(jax.jit(merge_stacked)(self.theta0, self.stacked, coeffs, self.partitions),
                         like=self.pretrained)

    def fit(self, batches: Iterable | Callable, steps: int, coeffs=None, log_every: int = 0,
            log: Callable = print):
        """Run ``steps`` steps; ``batches`` is an iterable of batches or ``i -> batch``.

        Returns ``(coeffs, history)`` with the per-step loss.
        """
        coeffs, opt_state = self.init(coeffs)
        it = None if callable(batches) else iter(batches)
        history = []
        for i in range(steps):
            batch = batches(i) if it is None else next(it)
            coeffs, opt_state, loss = self.step(coeffs, opt_state, batch)
            history.append(loss)
            if log_every and (i % log_every == 0 or i == steps - 1):
                log(f"  {self.granularity}-wise step {i}: objective {float(loss):.4f}")
        return coeffs, [float(h) for h in jax.device_get(history)]


def adamerging(apply_fn, pretrained, task_vectors, task_names, batches, *, granularity: str = "layer",
               steps: int = 500, lr: float = 1e-3, init: float = 0.3, clamp=(0.0, 1.0), ties_k: float | None = None,
               log_every: int = 0):
    """AdaMerging (``granularity`` task | layer); ``ties_k`` set = AdaMerging++ on TIES-masked vectors.

    Returns ``(merged, coeffs, history)``.
    """
    if ties_k is not None:
        task_vectors = ties_masked_vectors(task_vectors, ties_k)
    ada = AdaptiveMerge(apply_fn, pretrained, task_vectors, task_names, granularity=granularity, init_value=init,
                        lr=lr, clamp=clamp)
    coeffs, hist = ada.fit(batches, steps, log_every=log_every)
    return ada.merged(coeffs), coeffs, hist


def atlas(apply_fn, pretrained, task_vectors, task_names, batches, *, num_parts: int = 1, steps: int = 500,
          lr: float = 1e-2, init: float = 0.0, objective: str = "entropy", l1: float = 0.0, l2: float = 0.0,
          seed: int = 0, clamp=None, log_every: int = 0):
    """aTLAS: block-wise coefficients (``num_parts`` random groups per tensor), init 0.

    ``objective="xent"`` takes labelled few-shot batches ``{task: (x, y)}``.
    Returns ``(merged, coeffs, history)``.
    """
    ada = AdaptiveMerge(apply_fn, pretrained, task_vectors, task_names, granularity="block", init_value=init,
                        lr=lr, clamp=clamp, objective=objective, num_parts=num_parts, seed=seed, l1=l1, l2=l2)
    coeffs, hist = ada.fit(batches, steps, log_every=log_every)
    return ada.merged(coeffs), coeffs, hist


# ---------------------------------------------------------------- sharding and persistence

def fsdp_shard(flat: Mapping[str, Any], mesh, axis: str = "fsdp", skip_leading: int = 0) -> dict:
    """Place each array sharded over ``axis`` on its largest dimension divisible by the axis size.

    ``skip_leading=1`` leaves the stacked ``K`` axis whole.  Arrays with no
    divisible dimension are replicated.
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = dict(zip(mesh.axis_names, mesh.devices.shape))[axis]
    out = {}
    for p, x in flat.items():
        if x is None:
            out[p] = None
            continue
        dims = [d for d in range(skip_leading, np.ndim(x)) if np.shape(x)[d] % n == 0]
        spec = [None] * np.ndim(x)
        if dims:
            spec[max(dims, key=lambda d: np.shape(x)[d])] = axis
        out[p] = jax.device_put(x, NamedSharding(mesh, P(*spec)))
    return out


def save_coeffs(path: str, coeffs, meta: Mapping | None = None) -> str:
    """Write coefficients as JSON (``{"meta": ..., "coeffs": [..] or {path: [..]}}``), reusable by :func:`load_coeffs`."""
    c = jax.device_get(coeffs)
    data = {"meta": dict(meta or {}),
            "coeffs": (np.asarray(c).tolist() if not isinstance(c, Mapping)
                       else {p: np.asarray(v).tolist() for p, v in c.items()})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


def load_coeffs(path: str):
    """``(coeffs, meta)`` from :func:`save_coeffs`' JSON."""
    with open(path) as f:
        data = json.load(f)
    c = data["coeffs"]
    coeffs = ({p: jnp.asarray(v, jnp.float32) for p, v in c.items()} if isinstance(c, dict)
              else jnp.asarray(c, jnp.float32))
    return coeffs, data.get("meta", {})


def num_coeffs(coeffs) -> int:
    return int(sum(math.prod(np.shape(c)) for c in jax.tree.leaves(coeffs)))
