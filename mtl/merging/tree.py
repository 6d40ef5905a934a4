"""Parameter pytrees as flat ``{"a/b/c": array}`` maps, validation, task vectors.

Paths join the pytree keys with ``/``: ``nnx.to_pure_dict(nnx.state(model,
nnx.Param))`` gives paths like ``encoder/layers/0/kernel`` (integer keys are
written in decimal).  Pure dicts are the intended input; an ``nnx.State``
also works (its paths are the same, and merges return an ``nnx.State``).

Excluded entries
----------------
A task vector is a pytree with the pretrained model's structure in which an
*excluded* parameter is ``None`` (never zeros).  Every merge in this package
applies one rule: **a path that is ``None`` in the task vectors is copied
unchanged from the pretrained model** and takes no part in any statistic
(TIES' global top-k counts only included entries).  A path must be excluded in
all task vectors or in none (a mixed path raises ``ValueError``).  Parameters
that exist only in the fine-tuned models (task-specific heads) are not part of
the task vector at all: exclude them (``exclude=["heads/*"]``) and keep them
yourself.  Non-floating leaves (integer counters, ...) are always excluded.
"""
from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "flatten",
    "unflatten",
    "path_filter",
    "check_compatible",
    "task_vector",
    "task_vectors",
    "is_traced",
]


def _key_str(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_str(path, sep: str) -> str:
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]  # an nnx.Variable's payload: "a/kernel", not "a/kernel/value"
    return sep.join(_key_str(k) for k in path)


def _leaves_with_paths(tree: PyTree, sep: str = "/"):
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return [(_path_str(path, sep), leaf) for path, leaf in pairs], treedef


def flatten(tree: PyTree, sep: str = "/") -> dict[str, Any]:
    """``{path: leaf}`` in pytree order; ``None`` leaves are kept as ``None``.

    A flat mapping (already ``{path: array}``) flattens to itself.
    """
    pairs, _ = _leaves_with_paths(tree, sep)
    out: dict[str, Any] = {}
    for path, leaf in pairs:
        if path in out:
            raise ValueError(f"two leaves flatten to the same path {path!r}; keys must not contain {sep!r}")
        out[path] = leaf
    return out


def unflatten(flat: Mapping[str, Any], like: PyTree = None, sep: str = "/") -> PyTree:
    """Inverse of :func:`flatten`.

    With ``like`` the result has exactly ``like``'s structure (key types
    included, e.g. nnx's integer layer keys) and ``flat`` must hold every path
    of ``like``.  Without it, nested ``dict`` s with string keys are built.
    """
    if like is not None:
        pairs, treedef = _leaves_with_paths(like, sep)
        missing = [p for p, _ in pairs if p not in flat]
        if missing:
            raise ValueError(f"unflatten: {len(missing)} path(s) of the template are missing, first {missing[0]!r}")
        extra = set(flat) - {p for p, _ in pairs}
        if extra:
            raise ValueError(f"unflatten: path {sorted(extra)[0]!r} is not in the template")
        return jax.tree_util.tree_unflatten(treedef, [flat[p] for p, _ in pairs])
    root: dict = {}
    for path, leaf in flat.items():
        node = root
        parts = path.split(sep)
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"unflatten: {path!r} descends into a leaf")
        node[parts[-1]] = leaf
    return root


def _as_patterns(patterns) -> list:
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        return [patterns]
    return list(patterns)


def _match(pattern, path: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.search(path) is not None
    if not isinstance(pattern, str):
        raise TypeError(f"path pattern must be a str or re.Pattern, got {type(pattern).__name__}")
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


def path_filter(include=None, exclude=None) -> Callable[[str], bool]:
    """Predicate ``path -> bool`` from include/exclude patterns.

    A pattern is a glob matched against the whole path with
    :func:`fnmatch.fnmatchcase` (``*`` also matches ``/``: ``"*bias"`` matches
    every bias, ``"heads/*"`` everything under ``heads``), or a regex, given as
    a compiled ``re.Pattern`` or a string ``"re:<regex>"`` (``re.search``).
    A path is kept if it matches some include pattern (or ``include`` is None)
    and no exclude pattern.
    """
    inc, exc = _as_patterns(include), _as_patterns(exclude)

    def keep(path: str) -> bool:
        if inc and not any(_match(p, path) for p in inc):
            return False
        return not any(_match(p, path) for p in exc)

    return keep


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _desc(x) -> str:
    if x is None:
        return "None (excluded)"
    return f"{tuple(np.shape(x))} {jnp.result_type(x)}"


def _default_names(n: int) -> list[str]:
    return ["reference"] + [f"model {i}" for i in range(1, n)]


def check_compatible(reference: PyTree, *others: PyTree, names: Sequence[str] | None = None,
                     check_finite: bool = True, warn_identical: bool = True) -> None:
    """Raise ``ValueError`` unless every tree in ``others`` matches ``reference``.

    Checks, path by path in the reference's order: same set of paths (the
    first missing or extra path is named), same shape and dtype (path and both
    shapes/dtypes are named), finite values (path and model named; skipped
    under tracing).  Warns (``UserWarning``) when another tree equals the
    reference exactly, e.g. a "fine-tuned" model that was never trained.
    ``names`` names the reference then each other tree.
    """
    trees = (reference,) + others
    names = list(names) if names is not None else _default_names(len(trees))
    if len(names) != len(trees):
        raise ValueError(f"names has {len(names)} entries for {len(trees)} trees")
    flats = [flatten(t) for t in trees]
    ref = flats[0]
    for name, flat in zip(names[1:], flats[1:]):
        missing = [p for p in ref if p not in flat]
        extra = [p for p in flat if p not in ref]
        if missing:
            raise ValueError(f"{name!r} lacks parameter {missing[0]!r} that {names[0]!r} has"
                             f" ({len(missing)} missing in all)")
        if extra:
            raise ValueError(f"{name!r} has parameter {extra[0]!r} that {names[0]!r} lacks ({len(extra)} extra"
                             " in all); exclude task-specific parameters such as heads before merging")
        for path, a in ref.items():
            b = flat[path]
            if (a is None) != (b is None) or (a is not None and (
                    np.shape(a) != np.shape(b) or jnp.result_type(a) != jnp.result_type(b))):
                raise ValueError(f"parameter {path!r} differs: {names[0]!r} has {_desc(a)},"
                                 f" {name!r} has {_desc(b)}")
    if check_finite:
        _raise_non_finite(names, flats)
    if warn_identical:
        for name, flat in zip(names[1:], flats[1:]):
            leaves = [(ref[p], b) for p, b in flat.items() if b is not None]
            if leaves and not any(is_traced(a) or is_traced(b) for a, b in leaves) and all(
                    jax.device_get([_equal(a, b) for a, b in leaves])):
                warnings.warn(f"{name!r} is identical to {names[0]!r}: its task vector is zero"
                              " (was the model fine-tuned and loaded correctly?)", UserWarning, stacklevel=2)


@jax.jit
def _equal(a, b):
    return jnp.array_equal(a, b)


@jax.jit
def _finite(x):
    return jnp.all(jnp.isfinite(x))


def _raise_non_finite(names, flats) -> None:
    """Name the first (tree, path) with a non-finite value; all flags come back in one host sync."""
    todo = [(name, path, a) for name, flat in zip(names, flats) for path, a in flat.items()
            if a is not None and not is_traced(a) and jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
    ok = jax.device_get([_finite(a) for _, _, a in todo])
    for (name, path, _), good in zip(todo, ok):
        if not good:
            raise ValueError(f"parameter {path!r} of {name!r} has non-finite values (NaN or inf)")


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def task_vector(finetuned: PyTree, pretrained: PyTree, include=None, exclude=None, *,
                name: str = "finetuned", check: bool = True, check_pretrained: bool = True) -> PyTree:
    """``τ = θ_k − θ0`` with the pretrained structure; excluded paths are ``None``.

    ``include``/``exclude``: see :func:`path_filter`.  Paths of ``finetuned``
    absent from ``pretrained`` (task heads) must be excluded (they are then
    dropped); an included path absent from ``finetuned`` or differing in
    shape/dtype raises ``ValueError``.  ``τ`` has the parameters' dtype.
    """
    keep = path_filter(include, exclude)
    pre, ft = flatten(pretrained), flatten(finetuned)
    for path in ft:
        if path not in pre and keep(path):
            raise ValueError(f"{name!r} has parameter {path!r} that the pretrained model lacks;"
                             f" exclude it (e.g. exclude=[{path!r}]) and keep it yourself")
    included = {p for p, a in pre.items() if a is not None and keep(p) and _is_float(a)}
    for path in pre:
        if path in included and path not in ft:
            raise ValueError(f"{name!r} lacks parameter {path!r} that the pretrained model has")
    if check:
        check_compatible({p: pre[p] for p in included}, {p: ft[p] for p in included},
                         names=("pretrained", name), check_finite=False, warn_identical=False)
    out, flags = {}, []
    for p, a in pre.items():
        if p in included:
            out[p], finite, nonzero = _sub_stats(ft[p], a)
            flags.append((p, finite, nonzero))
        else:
            out[p] = None
    if check and flags and not any(is_traced(f) for _, f, _ in flags):
        if check_pretrained:
            _raise_non_finite(["pretrained"], [{p: pre[p] for p in included}])
        got = jax.device_get([(f, z) for _, f, z in flags])  # one host sync for every tensor
        for (p, _, _), (finite, _) in zip(flags, got):
            if not finite:
                raise ValueError(f"parameter {p!r} of {name!r} has non-finite values (NaN or inf)")
        if not any(z for _, z in got):
            warnings.warn(f"{name!r} is identical to the pretrained model on all included parameters:"
                          " its task vector is zero", UserWarning, stacklevel=2)
    return unflatten(out, like=pretrained)


@jax.jit
def _sub_stats(x, x0):
    """``τ = x − x0`` with ``x`` finite and ``τ`` nonzero flags, in one pass."""
    tau = x - x0
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return tau, finite, jnp.any(tau != 0)


def task_vectors(finetuned: Sequence[PyTree], pretrained: PyTree, include=None, exclude=None,
                 names: Sequence[str] | None = None) -> list[PyTree]:
    """:func:`task_vector` for each fine-tuned model (the pretrained model is checked once, not K times)."""
    names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(finetuned))]
    return [task_vector(f, pretrained, include, exclude, name=n, check_pretrained=i == 0)
            for i, (f, n) in enumerate(zip(finetuned, names))]
