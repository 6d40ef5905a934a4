"""Where merge methods get their tensors from: in-memory pytrees or lazy sources.

Every merge method is written once, as a *core* that reads tensors path by
path through a :class:`MergeInputs` and yields ``(path, merged_tensor)``.
:func:`run_tree` feeds it from in-memory pytrees (task vectors), the streaming
driver (:mod:`mtl.merging.stream`) from lazy sources of fine-tuned models, so
both give bit-identical results from the same per-tensor jitted kernels.

A *source* is anything with ``paths() -> iterable of "a/b/c"`` and
``load(path) -> array`` (numpy or jax, possibly sharded) and optionally
``spec(path)`` returning an object with ``.shape`` and ``.dtype`` without
loading.  A plain (nested or flat) dict qualifies: :func:`as_source` wraps it.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from mtl.merging.tree import PyTree, check_compatible, flatten, is_traced, path_filter, unflatten

__all__ = ["Source", "DictSource", "as_source", "MergeInputs", "run_tree", "stream_inputs"]


@runtime_checkable
class Source(Protocol):
    def paths(self): ...

    def load(self, path: str): ...


class DictSource:
    """A source over an in-memory pytree (nested or flat dict of arrays)."""

    def __init__(self, tree: PyTree):
        self._flat = flatten(tree)

    def paths(self):
        return list(self._flat)

    def load(self, path: str):
        return self._flat[path]

    def spec(self, path: str):
        x = self._flat[path]
        return None if x is None else jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def as_source(obj) -> Source:
    """``obj`` itself if it has ``paths``/``load``; a :class:`DictSource` for a pytree."""
    if hasattr(obj, "paths") and hasattr(obj, "load"):
        return obj
    return DictSource(obj)


@dataclasses.dataclass(frozen=True)
class MergeInputs:
    """What a merge core reads: the included paths, ``θ0`` and the ``K`` task vectors per path."""

    paths: tuple[str, ...]
    num_tasks: int
    theta0: Callable[[str], Any]
    taus: Callable[[str], list]
    streaming: bool = False

    def with_taus(self, taus: Callable[[str], list]) -> "MergeInputs":
        return dataclasses.replace(self, taus=taus)


def _desc(x) -> str:
    return f"{tuple(np.shape(x))} {jnp.result_type(x)}"


def _tree_inputs(pretrained: PyTree, task_vectors: Sequence[PyTree], names=None):
    if isinstance(task_vectors, Mapping) or not isinstance(task_vectors, Sequence):
        raise TypeError("task_vectors must be a list of pytrees (one per task)")
    if not task_vectors:
        raise ValueError("need at least one task vector")
    names = list(names) if names is not None else [f"task vector {i + 1}" for i in range(len(task_vectors))]
    pre = flatten(pretrained)
    tvs = [flatten(t) for t in task_vectors]
    for name, tv in zip(names, tvs):
        for p in pre:
            if p not in tv:
                raise ValueError(f"{name!r} lacks parameter {p!r} of the pretrained model")
        for p in tv:
            if p not in pre:
                raise ValueError(f"{name!r} has parameter {p!r} that the pretrained model lacks;"
                                 " task-specific parameters must be excluded from task vectors")
    included = []
    for p in pre:
        excluded = [tv[p] is None for tv in tvs]
        if any(excluded) and not all(excluded):
            raise ValueError(f"parameter {p!r} is excluded (None) in some task vectors but not in others:"
                             " use the same include/exclude filters for every task")
        if not excluded[0]:
            if pre[p] is None:
                raise ValueError(f"task vectors have parameter {p!r} but the pretrained value is None")
            included.append(p)
    inc = lambda flat: {p: flat[p] for p in included}  # noqa: E731
    check_compatible(inc(pre), *[inc(tv) for tv in tvs], names=["pretrained"] + names, warn_identical=False)
    for name, tv in zip(names, tvs):
        vals = [tv[p] for p in included]
        if vals and not any(is_traced(v) for v in vals) and not any(bool(jnp.any(v != 0)) for v in vals):
            warnings.warn(f"{name!r} is all zeros: that model equals the pretrained one", UserWarning, stacklevel=3)
    inp = MergeInputs(paths=tuple(included), num_tasks=len(tvs), theta0=pre.__getitem__,
                      taus=lambda p: [tv[p] for tv in tvs])
    return inp, pre


def run_tree(core, pretrained: PyTree, task_vectors: Sequence[PyTree], **hparams) -> PyTree:
    """Run a merge core on in-memory task vectors; excluded paths keep ``θ0``."""
    inp, pre = _tree_inputs(pretrained, task_vectors)
    out = dict(pre)
    for path, merged in core(inp, **hparams):
        out[path] = merged
    return unflatten(out, like=pretrained)


@jax.jit
def _sub_and_stats(theta, theta0):
    tau = theta - theta0
    return tau, jnp.all(jnp.isfinite(theta)), jnp.any(tau != 0)


class _StreamState:
    def __init__(self, pre, fts, names, check_finite):
        self.pre, self.fts, self.names, self.check_finite = pre, fts, names, check_finite
        self.nonzero = [False] * len(fts)
        self.checked: set[str] = set()
        self._cache: tuple[str, Any] | None = None

    def theta0(self, path):
        if self._cache is None or self._cache[0] != path:
            x = self.pre.load(path)
            if self.check_finite and path not in self.checked and not bool(jnp.all(jnp.isfinite(x))):
                raise ValueError(f"parameter {path!r} of 'pretrained' has non-finite values (NaN or inf)")
            self._cache = (path, x)
        return self._cache[1]

    def taus(self, path):
        x0 = self.theta0(path)
        out = []
        for k, (src, name) in enumerate(zip(self.fts, self.names)):
            x = src.load(path)
            if np.shape(x) != np.shape(x0) or jnp.result_type(x) != jnp.result_type(x0):
                raise ValueError(f"parameter {path!r} differs: 'pretrained' has {_desc(x0)}, {name!r} has {_desc(x)}")
            tau, finite, nonzero = _sub_and_stats(x, x0)
            if path not in self.checked:
                if self.check_finite and not bool(finite):
                    raise ValueError(f"parameter {path!r} of {name!r} has non-finite values (NaN or inf)")
                self.nonzero[k] = self.nonzero[k] or bool(nonzero)
            out.append(tau)
        self.checked.add(path)
        return out

    def warn_identical(self):
        for k, name in enumerate(self.names):
            if self.checked and not self.nonzero[k]:
                warnings.warn(f"{name!r} is identical to 'pretrained' on all merged parameters:"
                              " its task vector is zero", UserWarning, stacklevel=3)


def _is_float_dtype(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def stream_inputs(pretrained, finetuned: Sequence, include=None, exclude=None, names=None,
                  check_finite: bool = True):
    """Lazy :class:`MergeInputs` over sources; returns ``(inputs, copied_paths, state)``.

    ``copied_paths`` are pretrained paths that are not merged (excluded by the
    filters or non-floating) and are copied from ``pretrained``.
    """
    pre = as_source(pretrained)
    fts = [as_source(f) for f in finetuned]
    if not fts:
        raise ValueError("need at least one fine-tuned model")
    names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(fts))]
    keep = path_filter(include, exclude)
    pre_paths = list(pre.paths())
    pre_set = set(pre_paths)
    included, copied = [], []
    for p in pre_paths:
        spec = pre.spec(p) if hasattr(pre, "spec") else pre.load(p)
        if spec is None or not keep(p) or not _is_float_dtype(jnp.result_type(spec.dtype)):
            copied.append(p)
        else:
            included.append(p)
    for src, name in zip(fts, names):
        ft_paths = set(src.paths())
        for p in included:
            if p not in ft_paths:
                raise ValueError(f"{name!r} lacks parameter {p!r} that 'pretrained' has")
        for p in sorted(ft_paths - pre_set):
            if keep(p):
                raise ValueError(f"{name!r} has parameter {p!r} that 'pretrained' lacks;"
                                 f" exclude it (e.g. exclude=[{p!r}]) and keep it yourself")
    state = _StreamState(pre, fts, names, check_finite)
    inp = MergeInputs(paths=tuple(included), num_tasks=len(fts), theta0=state.theta0, taus=state.taus,
                      streaming=True)
    return inp, copied, state
