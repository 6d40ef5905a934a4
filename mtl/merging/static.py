"""Static merges of task vectors: averaging, task arithmetic, combine, TIES, DARE.

Every public merge is ``fn(pretrained, task_vectors, **hparams) -> merged``
on pytrees (jittable; hyper-parameters that change shapes or control flow,
such as ``k`` and ``mode``, must be static).  ``task_vectors`` come from
:func:`mtl.merging.task_vector`; a ``None`` (excluded) path is copied from
``pretrained``.  Merges compute in at least float32 and return each tensor in
the pretrained dtype.  Each method also has a ``*_core`` that runs tensor by
tensor (see :mod:`mtl.merging.sources`), used unchanged by the streaming
driver: per tensor, one fused jitted kernel reads ``θ0`` and the ``K``
operands once (``τ_k``, or ``θ_k`` with ``τ_k`` formed inside), applies
DARE's drop inside when DARE comes first, and returns the merged tensor with
flags for the input checks, which run once after the last tensor.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl.merging.sources import DropSpec, MergeInputs, base_path, form_taus, kernel_flags, run_tree
from mtl.merging.topk import kth_largest_magnitudes, magnitude, num_keep, ties_thresholds_of
from mtl.merging.tree import PyTree, check_compatible, flatten

__all__ = [
    "average", "average_models", "task_arithmetic", "combine", "layerwise_coeffs",
    "ties", "ties_thresholds", "dare", "TIES_MODES",
]

TIES_MODES = ("mean", "sum", "max")


def compute_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


# ---------------------------------------------------------------- fused kernels (one tensor)
#
# Each kernel is ONE jitted function per tensor: it reads θ0 and the K
# operands once (task vectors, or fine-tuned tensors when ``relative``: then
# τ_k = θ_k − θ0 is formed inside, in the parameters' dtype as a materialised
# task vector would be, and never written out), applies DARE's drop if given,
# and returns ``(merged, flags)`` (:func:`mtl.merging.sources.kernel_flags`).
# Sums over the K tasks are written over the Python list (never a reduction
# over the leading axis of a stacked [K, ...] array: a slow XLA:CPU path).

def _fold(op, xs):
    return functools.reduce(op, xs)


def fused(body):
    """A fused kernel ``kernel(theta0, operands, drop, *args, relative=..., **static) -> (merged, flags)``
    from ``body(theta0, taus, raw, *args, **static) -> (merged, probe)``."""

    def kernel(theta0, operands, drop, *args, relative: bool, **static):
        raw, taus = form_taus(theta0, operands, relative, drop)
        merged, probe = body(theta0, taus, raw, *args, **static)
        return merged, kernel_flags(theta0, operands, relative, probe)

    kernel.__name__ = body.__name__
    return jax.jit(kernel, static_argnames=("relative",) + tuple(
        n for n, p in inspect.signature(body).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY))


def propagate_nonfinite(merged, theta0, raw):
    """``merged`` (compute dtype) made NaN wherever ``θ0`` or a (pre-drop) ``τ_k`` is non-finite.

    The shadow ``(θ0 − θ0) + Σ_k (τ_k − τ_k)`` is +0 where every input is
    finite (an exact zero that never overflows) and NaN elsewhere, and
    ``merged − (+0)`` is ``merged`` bit for bit (negative zeros included), so
    the merged tensor itself becomes the kernel's finiteness probe.  (The
    linear kernels and TIES need no shadow: their dropped entries keep
    non-finite values, see :func:`mtl.merging.sources.form_taus`.)
    """
    shadow = _fold(jnp.add, [(x - x).astype(merged.dtype) for x in [theta0, *raw]])
    return merged - shadow


@fused
def average_kernel(theta0, taus, raw):
    ct = compute_dtype(theta0.dtype)
    merged = (theta0.astype(ct) + _fold(jnp.add, [t.astype(ct) for t in taus]) / len(taus)).astype(theta0.dtype)
    return merged, merged


@fused
def combine_kernel(theta0, taus, raw, coeffs):
    ct = compute_dtype(theta0.dtype)
    acc = theta0.astype(ct)
    for t, c in zip(taus, coeffs):
        acc = acc + jnp.asarray(c, ct) * t.astype(ct)
    merged = acc.astype(theta0.dtype)
    return merged, merged


@fused
def ties_kernel(theta0, taus, raw, thresholds, lam, *, mode):
    ct = compute_dtype(theta0.dtype)
    # trim: ``where(|τ| < thr, 0, τ)`` drops exactly the entries ``|τ| >= thr`` would not keep, except that a
    # non-finite τ survives (NaN fails every comparison), so that it reaches ``total`` and the probe below
    kept = [jnp.where(magnitude(t) < thresholds[k], 0, t.astype(ct)) for k, t in enumerate(taus)]
    total = _fold(jnp.add, kept)
    elected = jnp.sign(total)  # 0 where the trimmed entries sum to exactly 0
    agree = [(jnp.sign(x) == elected) & (elected != 0) for x in kept]
    picked = [jnp.where(a, x, 0) for a, x in zip(agree, kept)]
    if mode == "sum":
        merged = _fold(jnp.add, picked)
    elif mode == "mean":
        count = _fold(jnp.add, [a.astype(jnp.int32) for a in agree])
        merged = _fold(jnp.add, picked) / jnp.maximum(count, 1).astype(ct)
    else:  # "max": the agreeing entry of largest magnitude
        merged = elected * _fold(jnp.maximum, [jnp.abs(x) for x in picked])
    # ``total − total`` is +0 where every kept τ is finite, NaN where one is not: the merged tensor is its
    # own finiteness probe (θ0 reaches it directly), bit for bit unchanged where the inputs are finite
    merged = ((theta0.astype(ct) + lam * merged) - (total - total)).astype(theta0.dtype)
    return merged, merged


@jax.jit
def _dare_kernel(tau, w, thresh, scale):
    """One task vector's tensor after DARE's drop: the fused kernels' own drop (``form_taus``), materialised."""
    return form_taus(None, [tau], False, (w[None], thresh, scale, np.uint32(0)))[1][0]


# ---------------------------------------------------------------- cores (path by path)

def run_kernel(inp: MergeInputs, kernel, *args, per_path=None, paths=None, **static):
    """Apply a fused kernel path by path (``paths``, default all); ``per_path(p)`` gives extra leading arguments."""
    for p in inp.paths if paths is None else paths:
        theta0, operands, drop = inp.read(p)
        extra = () if per_path is None else per_path(p)
        merged, flags = kernel(theta0, operands, drop, *extra, *args, relative=inp.relative, **static)
        del theta0, operands, drop, extra  # hold no input tensor while the next one loads
        inp.record(p, flags)
        yield p, merged


def average_core(inp: MergeInputs):
    yield from run_kernel(inp, average_kernel)


def _coeff_getter(coeffs, paths, num_tasks):
    """Normalise task-wise / layer-wise coefficients to ``key -> [c_1..c_K]`` (a row chunk takes its tensor's)."""
    paths = [base_path(p) for p in paths]
    if isinstance(coeffs, (list, tuple)) and coeffs and all(isinstance(c, Mapping) for c in coeffs):
        if len(coeffs) != num_tasks:
            raise ValueError(f"got {len(coeffs)} coefficient trees for {num_tasks} task vectors")
        flats = [flatten(c) for c in coeffs]
        for p in paths:
            for i, f in enumerate(flats):
                if f.get(p) is None:
                    raise ValueError(f"coefficient tree {i} has no coefficient for parameter {p!r}")
        return lambda p: [f[base_path(p)] for f in flats]
    if isinstance(coeffs, Mapping):
        flat = flatten(coeffs)
        for p in paths:
            c = flat.get(p)
            if c is None:
                raise ValueError(f"layer-wise coefficients have no entry for parameter {p!r}")
            if jnp.ndim(c) == 0 or jnp.shape(c)[0] != num_tasks:
                raise ValueError(f"layer-wise coefficient for {p!r} must have leading dimension"
                                 f" {num_tasks} (one per task), got shape {jnp.shape(c)}")
        return lambda p: [flat[base_path(p)][k] for k in range(num_tasks)]
    c = jnp.asarray(coeffs)
    if c.ndim == 0:
        return lambda p: [c] * num_tasks
    if c.shape != (num_tasks,):
        raise ValueError(f"task-wise coefficients must have shape ({num_tasks},), got {c.shape}")
    cs = [c[k] for k in range(num_tasks)]
    return lambda p: cs


def combine_core(inp: MergeInputs, *, coeffs):
    get = _coeff_getter(coeffs, inp.paths, inp.num_tasks)
    yield from run_kernel(inp, combine_kernel, per_path=lambda p: (get(p),))


def task_arithmetic_core(inp: MergeInputs, *, lam: float = 0.3):
    yield from combine_core(inp, coeffs=lam)


def _check_ties(k, mode):
    if mode not in TIES_MODES:
        raise ValueError(f"TIES mode must be one of {TIES_MODES}, got {mode!r}")
    if not 0 <= k <= 100:
        raise ValueError(f"TIES k is a percentage in [0, 100], got {k}")


def ties_core(inp: MergeInputs, *, k: float = 20.0, lam: float = 1.0, mode: str = "mean"):
    _check_ties(k, mode)
    sizes = inp.sizes if inp.sizes is not None else {p: int(np.size(inp.theta0(p))) for p in inp.paths}
    n_total = sum(sizes[p] for p in inp.paths)
    if inp.paths and num_keep(k, n_total) == n_total:
        # keep everything (DARE-TIES' k = 100): threshold 0 keeps exactly the entries the exact threshold
        # (the smallest magnitude) keeps, all but NaN, without the two threshold passes
        thresholds = jnp.zeros((inp.num_tasks,), jnp.float32)
    else:
        thresholds = ties_thresholds_of(inp, k)
    yield from run_kernel(inp, ties_kernel, thresholds, lam, mode=mode)


def path_key(key, task: int, path: str):
    """The DARE key of one tensor: ``fold_in(fold_in(key, task), crc32(path))``.

    Keyed by the path string rather than by position, so it does not change
    with filters, tensor order or streaming.
    """
    return jax.random.fold_in(jax.random.fold_in(key, task), zlib.crc32(path.encode()))


def _as_key(key, seed):
    if key is None:
        return jax.random.key(seed)
    return key


def _dare_inputs(inp: MergeInputs, p: float, key) -> MergeInputs:
    """``inp`` with DARE's drop, applied inside the next merge's fused kernels (keys: :func:`path_key`)."""
    if not 0 <= p < 1:
        raise ValueError(f"DARE drop probability p must be in [0, 1), got {p}")
    if inp.drop is not None:
        raise ValueError("DARE cannot be followed by DARE")
    return dataclasses.replace(inp, drop=DropSpec(key, 1.0 - p, 1.0 / (1.0 - p)))


def dare_core(inp: MergeInputs, *, p: float = 0.5, seed: int = 0, key=None, then):
    """DARE's drop (probability ``p``) fused into the kernels of the resolved core ``then``.

    ``then`` is a core (``inputs -> iterator of (path, tensor)``); to name it, use
    ``mtl.merging.get_core("dare", then="ties", ...)``, which resolves the name.
    """
    yield from then(_dare_inputs(inp, p, _as_key(key, seed)))


# ---------------------------------------------------------------- public pytree API

def average(pretrained: PyTree, task_vectors: Sequence[PyTree]) -> PyTree:
    """Weight averaging: ``θ0 + mean_k τ_k`` = mean of the fine-tuned models."""
    return run_tree(average_core, pretrained, task_vectors)


def average_models(models: Sequence[PyTree], weights: Sequence[float] | None = None) -> PyTree:
    """(Weighted) mean of whole parameter trees of identical structure (no exclusions)."""
    if not models:
        raise ValueError("need at least one model")
    w = jnp.full((len(models),), 1.0 / len(models)) if weights is None else jnp.asarray(weights, jnp.float32)
    if w.shape != (len(models),):
        raise ValueError(f"weights must have shape ({len(models)},), got {w.shape}")
    w = w / jnp.sum(w)

    def avg(*xs):
        ct = compute_dtype(xs[0].dtype)
        return functools.reduce(jnp.add, [wi * x.astype(ct) for wi, x in zip(w, xs)]).astype(xs[0].dtype)

    check_compatible(models[0], *models[1:], names=[f"model {i}" for i in range(len(models))], warn_identical=False)
    return jax.tree.map(avg, *models)


def task_arithmetic(pretrained: PyTree, task_vectors: Sequence[PyTree], *, lam: float = 0.3) -> PyTree:
    """Task arithmetic: ``θ0 + lam * Σ_k τ_k``."""
    return run_tree(task_arithmetic_core, pretrained, task_vectors, lam=lam)


def combine(pretrained: PyTree, task_vectors: Sequence[PyTree], coeffs) -> PyTree:
    """``θ0 + Σ_k c_k ⊙ τ_k`` with task-wise or layer-wise coefficients (differentiable in ``coeffs``).

    ``coeffs`` is one of: a scalar (all tasks); an array ``[K]`` (task-wise);
    a pytree like ``pretrained`` whose leaves have leading dimension ``K``
    (``[K]`` for one scalar per tensor and task, or ``[K, *broadcastable]``)
    — see :func:`layerwise_coeffs`; or a list of ``K`` pytrees like
    ``pretrained`` with scalar or broadcastable leaves.  Coefficients of
    excluded paths are ignored (may be ``None``).
    """
    return run_tree(combine_core, pretrained, task_vectors, coeffs=coeffs)


def layerwise_coeffs(task_vector: PyTree, num_tasks: int, init: float = 0.3, dtype=jnp.float32) -> PyTree:
    """Layer-wise coefficients for :func:`combine`: ``[num_tasks]`` of ``init`` per tensor, None where excluded."""
    return jax.tree.map(lambda x: None if x is None else jnp.full((num_tasks,), init, dtype), task_vector,
                        is_leaf=lambda x: x is None)


def ties_thresholds(task_vectors: Sequence[PyTree], k: float = 20.0):
    """Per task, the magnitude threshold of TIES' trim step (float32 ``[K]``)."""
    flats = [flatten(t) for t in task_vectors]
    paths = [p for p, v in flats[0].items() if v is not None]
    return kth_largest_magnitudes(paths, lambda p: [f[p] for f in flats], len(flats), k)


def ties(pretrained: PyTree, task_vectors: Sequence[PyTree], *, k: float = 20.0, lam: float = 1.0,
         mode: str = "mean") -> PyTree:
    """TIES-merging: trim, elect sign, disjoint merge; ``θ0 + lam * τ_m``.

    1. Trim: keep in each ``τ_k`` the entries whose ``|τ|`` (in float32) is at
       least the ``n``-th largest over the whole vector (all included tensors
       together), ``n = round(k * N / 100)``; entries tied with the threshold
       are all kept (deterministic, order-free).
    2. Elect: ``s = sign(Σ_k τ̂_k)`` per entry.  Tie rule: where the sum is
       exactly 0 no sign is elected and the entry stays at ``θ0``.
    3. Disjoint merge over the entries whose sign equals ``s``: ``"mean"``
       (their average), ``"sum"`` (their sum; use ``lam ≈ 1/K``-ish), or
       ``"max"`` (the agreeing entry of largest magnitude).
    """
    _check_ties(k, mode)
    return run_tree(ties_core, pretrained, task_vectors, k=k, lam=lam, mode=mode)


def dare(task_vectors: Sequence[PyTree], p: float = 0.5, key=None, *, seed: int = 0) -> list[PyTree]:
    """DARE: drop each entry with probability ``p``, rescale survivors by ``1/(1-p)``.

    Task ``k``'s tensor at ``path`` draws its mask from the key :func:`path_key`
    ``(key, k, path)`` (the counter-based hash of :mod:`mtl.merging.dare_mask`);
    ``key`` defaults to ``jax.random.key(seed)``.  Excluded (None) entries stay None.
    """
    if not 0 <= p < 1:
        raise ValueError(f"DARE drop probability p must be in [0, 1), got {p}")
    spec = DropSpec(_as_key(key, seed), 1.0 - p, 1.0 / (1.0 - p))
    flats = [flatten(tv) for tv in task_vectors]
    drops: dict = {}  # path -> the mask arguments of all K tasks, computed once
    out = []
    for k, (tv, flat) in enumerate(zip(task_vectors, flats)):
        leaves = []
        for path, t in flat.items():
            if t is None:
                leaves.append(None)
                continue
            if path not in drops:
                drops[path] = spec.at(path, len(flats))
            w, thresh, scale, _ = drops[path]
            leaves.append(_dare_kernel(t, w[k], thresh, scale))
        out.append(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tv, is_leaf=lambda x: x is None),
                                                leaves))
    return out
