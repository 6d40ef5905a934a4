"""Merge methods by name: ``MERGERS``, :func:`get_merger`, and the streaming cores.

The registry imports the method modules; no method module imports the registry. DARE's
composition by name (``then="ties"``) therefore lives here: the named core is resolved
and handed to :func:`mtl.merging.static.dare_core`.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

from mtl.merging.fisher import fisher, fisher_core
from mtl.merging.regmean import regmean, regmean_core
from mtl.merging.sources import run_tree
from mtl.merging.static import (average, average_core, combine_core, dare_core, task_arithmetic, task_arithmetic_core,
                                ties, ties_core)
from mtl.merging.tree import PyTree

__all__ = ["MERGERS", "CORES", "get_merger", "get_core", "dare_merge"]


def dare_then_core(inp, *, p: float = 0.5, seed: int = 0, key=None, then: str = "task_arithmetic", **then_hparams):
    """DARE's drop, then the core named ``then`` with ``then_hparams`` (fused: one kernel per tensor)."""
    if then == "dare":
        raise ValueError("DARE cannot be followed by DARE")
    return dare_core(inp, p=p, seed=seed, key=key, then=get_core(then, **then_hparams))


def dare_merge(pretrained: PyTree, task_vectors: Sequence[PyTree], *, p: float = 0.5, seed: int = 0, key=None,
               then: str = "task_arithmetic", **then_hparams) -> PyTree:
    """DARE then another merge: ``MERGERS[then](pretrained, dare(task_vectors, p, key), **then_hparams)``.

    ``then`` is ``"task_arithmetic"`` (default), ``"ties"`` (use ``k=100`` to
    skip TIES' own trim, as in DARE-TIES), ``"average"``, ``"combine"``, ...
    """
    return run_tree(dare_then_core, pretrained, task_vectors, p=p, seed=seed, key=key, then=then, **then_hparams)


#: name -> ``fn(pretrained, task_vectors, **hparams) -> merged`` on pytrees.
MERGERS = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare_merge,
    "fisher": fisher,
    "regmean": regmean,
}

#: name -> tensor-by-tensor core ``core(inputs, **hparams) -> iterator of (path, tensor)``.
CORES = {
    "average": average_core,
    "task_arithmetic": task_arithmetic_core,
    "combine": combine_core,
    "ties": ties_core,
    "dare": dare_then_core,
    "fisher": fisher_core,
    "regmean": regmean_core,
}


def _validate(kind: str, table: dict, name: str, hparams: dict):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(table))}")
    fn = table[name]
    params = inspect.signature(fn).parameters.values()
    allowed = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    extra = {k: v for k, v in hparams.items() if k not in allowed}
    if extra and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):  # DARE forwards to `then`
        then = hparams.get("then", "task_arithmetic")
        if then == name:
            raise ValueError(f"{name!r} cannot be followed by itself")
        try:
            _validate(kind, table, then, extra)
        except TypeError as e:
            raise TypeError(f"{kind} {name!r} (then={then!r}): {e}") from None
    elif extra:
        raise TypeError(f"{kind} {name!r} got unknown hyper-parameter(s) {', '.join(sorted(extra))};"
                        f" valid: {', '.join(sorted(allowed)) or 'none'}")
    return fn


def get_merger(name: str, **hparams):
    """``MERGERS[name]`` with ``hparams`` bound: call it as ``merger(pretrained, task_vectors)``.

    Unknown names raise ``ValueError`` listing the valid ones; unknown
    hyper-parameters raise ``TypeError`` naming them and the valid ones.
    """
    return functools.partial(_validate("merger", MERGERS, name, hparams), **hparams)


def get_core(name: str, **hparams):
    """``CORES[name]`` with ``hparams`` bound (validated like :func:`get_merger`)."""
    return functools.partial(_validate("merge core", CORES, name, hparams), **hparams)
