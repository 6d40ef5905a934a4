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
import functools
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from mtl.merging import dare_mask
from mtl.merging.tree import PyTree, check_compatible, flatten, is_traced, path_filter, unflatten

__all__ = ["Source", "DictSource", "as_source", "MergeInputs", "DropSpec", "Checks", "run_tree", "stream_inputs",
           "form_taus", "kernel_flags", "Chunk", "row_chunks", "load_part", "reads_rows", "base_path"]


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

    def load_rows(self, path: str, start: int, stop: int):
        return self._flat[path][start:stop]

    def spec(self, path: str):
        x = self._flat[path]
        return None if x is None else jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


class Chunk(str):
    """Rows ``start:stop`` (axis 0) of the tensor at ``base``, merged on their own.

    A key of :class:`MergeInputs` paths when a tensor is merged in row chunks
    (its string reads ``"base[rows start:stop]"`` in messages).  ``offset`` is
    the flat index of its first entry in the whole tensor (DARE's mask is a
    function of it), ``total`` the whole tensor's number of entries.
    """

    def __new__(cls, base: str, start: int, stop: int, shape: Sequence[int]):
        self = super().__new__(cls, f"{base}[rows {int(start)}:{int(stop)}]")
        row = int(np.prod(shape[1:], dtype=np.int64))
        self.base, self.start, self.stop, self.rows = str(base), int(start), int(stop), int(shape[0])
        self.offset, self.total = self.start * row, self.rows * row
        return self

    @property
    def last(self) -> bool:
        return self.stop == self.rows

    def __reduce__(self):
        return Chunk, (self.base, self.start, self.stop, (self.rows, self.total // max(self.rows, 1)))


def base_path(key: str) -> str:
    """The tensor path of a :class:`MergeInputs` key (a path, or a :class:`Chunk` of one)."""
    return key.base if isinstance(key, Chunk) else key


def reads_rows(src) -> bool:
    """Whether ``src`` reads a row range without loading the whole tensor (``load_rows``)."""
    return bool(getattr(src, "reads_rows", hasattr(src, "load_rows")))


def load_part(src, key: str):
    """``src``'s tensor at a :class:`MergeInputs` key: the whole tensor, or a :class:`Chunk`'s rows
    (read alone by ``load_rows`` where the source has it, else sliced out of the whole tensor)."""
    if hasattr(src, "load_part"):
        return src.load_part(key)
    if not isinstance(key, Chunk):
        return src.load(key)
    if hasattr(src, "load_rows"):
        return src.load_rows(key.base, key.start, key.stop)
    return src.load(key.base)[key.start:key.stop]


def row_chunks(paths: Sequence[str], shapes: Mapping[str, tuple], copies: int, chunk_bytes: int | None) -> list:
    """``paths`` with each tensor whose ``copies`` copies exceed ``chunk_bytes`` split into row chunks
    of at most ``chunk_bytes`` over all copies (at least one row each).

    ``shapes[path] = (shape, itemsize)``.  Scalars, single-row tensors and
    everything when ``chunk_bytes`` is None stay whole.
    """
    if chunk_bytes is not None and chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    out: list = []
    for p in paths:
        shape, itemsize = shapes[p]
        shape = tuple(int(d) for d in shape)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * int(itemsize) * copies
        if chunk_bytes is None or len(shape) == 0 or shape[0] < 2 or row_bytes * shape[0] <= chunk_bytes:
            out.append(p)
            continue
        step = max(1, chunk_bytes // max(row_bytes, 1))
        out.extend(Chunk(p, a, min(a + step, shape[0]), shape) for a in range(0, shape[0], step))
    return out


def as_source(obj) -> Source:
    """``obj`` itself if it has ``paths``/``load``; a :class:`DictSource` for a pytree."""
    if hasattr(obj, "paths") and hasattr(obj, "load"):
        return obj
    return DictSource(obj)


@dataclasses.dataclass(frozen=True)
class MergeInputs:
    """What a merge core reads at each included path: ``θ0`` and ``K`` operand tensors.

    The operands are the task vectors ``τ_k`` (pytree API) or, with
    ``relative=True`` (streaming), the fine-tuned tensors ``θ_k``: the fused
    kernels form ``τ_k = θ_k − θ0`` themselves and never write it out.
    ``drop`` (DARE) makes the kernels drop and rescale entries of each ``τ_k``
    first.  Kernels return per-tensor flags that the cores hand to
    :meth:`record`; :class:`Checks` inspects them once at the end.
    """

    paths: tuple[str, ...]
    num_tasks: int
    theta0: Callable[[str], Any]
    operands: Callable[[str], list]
    relative: bool = False
    streaming: bool = False
    checks: "Checks | None" = None
    drop: "DropSpec | None" = None
    sizes: Mapping[str, int] | None = None  # number of entries per path, where known without loading

    def taus(self, path: str) -> list:
        """The task vectors at ``path`` (after DARE's drop, if any) as arrays, for code that needs them whole."""
        if not self.relative and self.drop is None:
            return list(self.operands(path))
        theta0, operands, drop = self.read(path)
        return _materialise(theta0, operands, drop, relative=self.relative)

    def with_taus(self, taus: Callable[[str], list]) -> "MergeInputs":
        return dataclasses.replace(self, operands=taus, relative=False, drop=None)

    def read(self, path: str):
        """``(θ0, operands, drop)`` at ``path``: the arguments of a fused kernel."""
        drop = None if self.drop is None else self.drop.at(path, self.num_tasks)
        return self.theta0(path), self.operands(path), drop

    def record(self, path: str, flags) -> None:
        if self.checks is not None:
            self.checks.add(path, flags)


@dataclasses.dataclass(frozen=True)
class DropSpec:
    """DARE's drop: task ``k`` at ``path`` keeps entry ``i`` iff its hash is at most a threshold
    (:mod:`mtl.merging.dare_mask`; the words from ``path_key(key, k, path)``), then rescales by ``scale``."""

    key: Any
    keep_prob: float
    scale: float

    def at(self, path: str, num_tasks: int):
        """The kernel's ``drop`` argument at ``path`` (a key: a path or a :class:`Chunk`):
        ``(words [K, 2] uint32, threshold uint32, scale, offset uint32)``; ``offset`` is the chunk's
        first flat index, so a chunk's mask is the whole tensor's rows."""
        if isinstance(path, Chunk) and path.total >= 2**32:
            raise ValueError(f"DARE mask: a tensor of {path.total} entries (2**32 or more) is not supported")
        w = _tensor_words(self.key, np.uint32(zlib.crc32(base_path(path).encode())), num_tasks=num_tasks)
        offset = np.uint32(path.offset if isinstance(path, Chunk) else 0)
        return w, np.uint32(dare_mask.threshold(self.keep_prob)), self.scale, offset


@functools.partial(jax.jit, static_argnames="num_tasks")
def _tensor_words(key, crc, *, num_tasks):
    """Per task, the mask words of one tensor: ``bits(fold_in(fold_in(key, task), crc32(path)))``."""
    k = jax.random.fold_in
    return jnp.stack([dare_mask.words(k(k(key, t), crc)) for t in range(num_tasks)])


def form_taus(x0, xs, relative: bool, drop):
    """Inside a kernel: ``(raw, taus)``: ``τ_k`` (``θ_k − θ0`` when ``relative``), then DARE's drop if any.

    ``raw`` is before the drop.  Both keep the parameters' dtype, exactly as
    materialised task vectors would; a dropped entry of a non-finite ``τ``
    stays non-finite (NaN), so the merged tensor still shows it.
    """
    raw = [_rounded(jnp.subtract, x, x0) for x in xs] if relative else list(xs)
    if drop is None:
        return raw, raw
    w, thresh, scale, offset = drop
    # a dropped entry is ``τ − τ``: +0 where τ is finite (as a literal 0 would be), NaN where it is not, so a
    # non-finite input is never dropped out of sight of the kernel's finiteness probe
    return raw, [jnp.where(dare_mask.keep_mask(t.shape, w[k], thresh, offset), _rounded(jnp.multiply, t, scale), t - t
                           ).astype(t.dtype) for k, t in enumerate(raw)]


def _rounded(op, a, b):
    """``op(a, b)`` in ``a``'s dtype, rounded to it even inside a fusion.

    XLA:CPU computes bf16/f16 arithmetic in float32 and, inside one fused
    kernel, may skip the rounding back ("excess precision"); a materialised
    task vector is rounded.  An explicit ``reduce_precision`` of the float32
    result keeps the fused kernels bit-identical to materialising ``τ``.
    """
    dt = jnp.result_type(a)
    if not jnp.issubdtype(dt, jnp.floating) or jnp.finfo(dt).bits >= 32:
        return op(a, b)
    f = jnp.finfo(dt)
    b = jnp.asarray(b, dt) if not hasattr(b, "dtype") or jnp.result_type(b) != dt else b
    exact = op(a.astype(jnp.float32), b.astype(jnp.float32))
    return jax.lax.reduce_precision(exact, exponent_bits=f.nexp, mantissa_bits=f.nmant).astype(dt)


def kernel_flags(x0, xs, relative: bool, probe):
    """Inside a kernel: float32 ``[1 + K]``: ``[0]`` is 0 iff ``probe`` is finite; ``[1 + k]`` is 1 where a
    strided sample of ``τ_k`` (at most 8 entries per axis) is nonzero.

    ``probe`` is any array that is non-finite wherever an input is: the
    merged tensor, whose kernels keep non-finite inputs visible (see
    :func:`form_taus` and TIES' trim); a flagged
    tensor is re-checked exactly at the end, so an overflow in finite inputs
    raises nothing.  A model whose samples are all zero is checked exactly too.
    """
    fin = jnp.sum(jax.lax.optimization_barrier(probe).astype(jnp.float32) * 0)
    sl = tuple(slice(None, None, max(1, n // 8)) for n in np.shape(x0))
    nz = [jnp.any(x[sl] != x0[sl]) if relative else jnp.any(x[sl] != 0) for x in xs]
    return jnp.stack([fin] + [n.astype(jnp.float32) for n in nz])


class Checks:
    """Finiteness and "identical to θ0" checks of one merge, from the kernels' flags, done once at the end.

    ``exact_finite(path) -> [θ0 finite, operand 1 finite, ...]`` and
    ``exact_nonzero(path, k) -> bool`` are the slow exact checks, run only on
    the paths a flag points at (and on paths no kernel reported).
    ``order="names"`` raises for the first name (θ0 first) with a non-finite
    tensor anywhere, ``"paths"`` for the first path.
    """

    def __init__(self, paths, names, exact_finite, exact_nonzero, *, check_finite=True, order="paths",
                 warning=None):
        self.paths, self.names = list(paths), list(names)
        self.exact_finite, self.exact_nonzero = exact_finite, exact_nonzero
        self.check_finite, self.order = check_finite, order
        self.warning = warning or (lambda name: f"{name!r} is identical to 'pretrained' on all merged parameters:"
                                   " its task vector is zero")
        self.flags: dict[str, Any] = {}

    def add(self, path, flags):
        self.flags[path] = flags

    def _traced(self) -> bool:
        return any(is_traced(f) for f in self.flags.values())

    def finish(self, stacklevel: int = 3) -> None:
        """Raise ``ValueError`` naming the first non-finite tensor; warn for each model equal to θ0."""
        if self._traced():
            return
        got = dict(zip(self.flags, jax.device_get(list(self.flags.values()))))  # the one host sync
        unflagged = [p for p in self.paths if p not in got]
        if self.check_finite:
            suspect = [p for p in self.paths if p in unflagged or got[p][0] != 0]
            self._raise_non_finite(suspect)
        num = len(self.names) - 1
        seen = [any(p in got and got[p][1 + k] > 0 for p in self.paths) for k in range(num)]
        for k in range(num):
            if not seen[k] and not any(self.exact_nonzero(p, k) for p in self.paths):
                warnings.warn(self.warning(self.names[1 + k]), UserWarning, stacklevel=stacklevel)

    def _raise_non_finite(self, suspect):
        if not suspect:
            return
        exact = {p: self.exact_finite(p) for p in suspect}
        bad = [(i, p) for p in suspect for i, ok in enumerate(exact[p]) if not ok]
        if not bad:
            return  # finite inputs whose merge overflowed: not an input error
        i, p = min(bad, key=(lambda b: b[0]) if self.order == "names" else (lambda b: suspect.index(b[1])))
        raise ValueError(f"parameter {p!r} of {self.names[i]!r} has non-finite values (NaN or inf)")


@functools.partial(jax.jit, static_argnames="relative")
def _materialise(theta0, operands, drop, *, relative):
    return form_taus(theta0, operands, relative, drop)[1]


@jax.jit
def _finite(xs):
    return [jnp.all(jnp.isfinite(x)) for x in xs]


@jax.jit
def _any_nonzero(x):
    return jnp.any(x != 0)


@jax.jit
def _any_differs(x, x0):
    return jnp.any(x != x0)


def _exact_finite(xs) -> list[bool]:
    inexact = [i for i, x in enumerate(xs) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    flags = [True] * len(xs)
    for i, f in zip(inexact, jax.device_get(_finite([xs[i] for i in inexact]))):
        flags[i] = bool(f)
    return flags


def _on_device(xs: list) -> list:
    """Host (numpy) arrays moved to the default device in one call; device arrays (sharded or not) as they are.

    On CPU, ``jax.device_put`` of a 64-byte-aligned numpy array may alias it without a copy;
    that is kept for memory-mapped arrays (``np.memmap``: their pages are the file's), while a
    source's fresh in-memory array is copied (``may_alias=False``), so the device value never
    keeps the source's buffer alive past this tensor: at most one tensor of each model is
    resident, whatever the allocator's alignment (aliasing made that depend on it). The copy is
    asynchronous and holds the host buffer until it completes, so this waits for it (one wait
    per call, for all the tensors moved together), so transfers never pile up. Even then jaxlib
    drops its reference to the host array a moment later (from its transfer thread, at its next
    garbage pass); this module keeps none, which ``tests/merging_stream_test.py`` checks.
    """
    host = [i for i, x in enumerate(xs) if isinstance(x, np.ndarray)]
    if host:
        moved = jax.device_put([xs[i] for i in host],
                               may_alias=[isinstance(xs[i], np.memmap) for i in host])
        jax.block_until_ready(moved)
        xs = list(xs)
        for i, m in zip(host, moved):
            xs[i] = m
    return xs


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
    check_compatible(inc(pre), *[inc(tv) for tv in tvs], names=["pretrained"] + names, check_finite=False,
                     warn_identical=False)
    checks = Checks(included, ["pretrained"] + names,
                    exact_finite=lambda p: _exact_finite([pre[p]] + [tv[p] for tv in tvs]),
                    exact_nonzero=lambda p, k: bool(_any_nonzero(tvs[k][p])), order="names",
                    warning=lambda name: f"{name!r} is all zeros: that model equals the pretrained one")
    inp = MergeInputs(paths=tuple(included), num_tasks=len(tvs), theta0=pre.__getitem__,
                      operands=lambda p: [tv[p] for tv in tvs], checks=checks,
                      sizes={p: int(np.size(pre[p])) for p in included})
    return inp, pre


def run_tree(core, pretrained: PyTree, task_vectors: Sequence[PyTree], **hparams) -> PyTree:
    """Run a merge core on in-memory task vectors; excluded paths keep ``θ0``.

    Inputs are checked (finite; warn for an all-zero task vector) once, after
    the merge, from the flags the kernels return.
    """
    inp, pre = _tree_inputs(pretrained, task_vectors)
    out = dict(pre)
    for path, merged in core(inp, **hparams):
        out[path] = merged
    inp.checks.finish(stacklevel=4)
    return unflatten(out, like=pretrained)


class _StreamState:
    """Reads sources for :func:`stream_inputs`: ``θ0`` once per path (moved to the device once), the
    fine-tuned tensors as they come; its :class:`Checks` run in :meth:`finish`."""

    def __init__(self, pre, fts, names, check_finite, paths):
        self.pre, self.fts, self.names, self.check_finite = pre, fts, names, check_finite
        self._cache: tuple[str, Any] | None = None
        self.checks = Checks(paths, ["pretrained"] + list(names), self._exact_finite, self._exact_nonzero,
                             check_finite=check_finite, order="paths")

    def theta0(self, path):
        if self._cache is None or self._cache[0] != path:
            self._cache = None  # drop the previous tensor before loading the next
            self._cache = (path, _on_device([load_part(self.pre, path)])[0])
        return self._cache[1]

    def operands(self, path):
        x0 = self.theta0(path)
        out = []
        for src, name in zip(self.fts, self.names):
            x = load_part(src, path)
            if np.shape(x) != np.shape(x0) or jnp.result_type(x) != jnp.result_type(x0):
                raise ValueError(f"parameter {path!r} differs: 'pretrained' has {_desc(x0)}, {name!r} has {_desc(x)}")
            out.append(x)
        return _on_device(out)

    def _exact_finite(self, path):
        return _exact_finite([load_part(self.pre, path)] + [load_part(src, path) for src in self.fts])

    def _exact_nonzero(self, path, k):
        return bool(_any_differs(load_part(self.fts[k], path), self.theta0(path)))

    def finish(self):
        """Raise for the first non-finite input tensor; warn for each model identical to ``pretrained``."""
        self.checks.finish(stacklevel=4)

    warn_identical = finish  # the name the streaming driver used before the checks moved here


def _is_float_dtype(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _shape_dtype(src, path):
    """``(shape, dtype)`` of a source's tensor, from its ``spec`` when it has one (else by loading it), or None."""
    spec = src.spec(path) if hasattr(src, "spec") else src.load(path)
    return None if spec is None else (tuple(spec.shape), jnp.result_type(spec.dtype))


def stream_inputs(pretrained, finetuned: Sequence, include=None, exclude=None, names=None,
                  check_finite: bool = True, chunk_bytes: int | None = None):
    """Lazy :class:`MergeInputs` over sources; returns ``(inputs, copied_paths, state)``.

    The inputs' operands are the fine-tuned tensors (``relative=True``);
    call ``state.finish()`` after the merge for the input checks.

    ``copied_paths`` are pretrained paths that are not merged (excluded by the
    filters or non-floating) and are copied from ``pretrained``.

    ``chunk_bytes``: a tensor whose ``K + 1`` copies exceed it is merged in
    row chunks (:class:`Chunk` keys, :func:`row_chunks`), so that at most
    about ``chunk_bytes`` of input is resident at once, when every source
    reads row ranges on its own (safetensors files, in-memory trees and their
    prefetching wrappers do; orbax checkpoints, artifacts and Hugging Face
    name-mapped sources do not, and their tensors stay whole).
    """
    pre = as_source(pretrained)
    fts = [as_source(f) for f in finetuned]
    if not fts:
        raise ValueError("need at least one fine-tuned model")
    names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(fts))]
    keep = path_filter(include, exclude)
    pre_paths = list(pre.paths())
    pre_set = set(pre_paths)
    included, copied, sizes, shapes = [], [], {}, {}
    for p in pre_paths:
        shape_dtype = _shape_dtype(pre, p)  # (shape, dtype) only: no loaded tensor outlives this line
        if shape_dtype is None or not keep(p) or not _is_float_dtype(shape_dtype[1]):
            copied.append(p)
        else:
            included.append(p)
            sizes[p] = int(np.prod(shape_dtype[0], dtype=np.int64))
            shapes[p] = shape_dtype
    for src, name in zip(fts, names):
        ft_paths = set(src.paths())
        for p in included:
            if p not in ft_paths:
                raise ValueError(f"{name!r} lacks parameter {p!r} that 'pretrained' has")
        for p in sorted(ft_paths - pre_set):
            if keep(p):
                raise ValueError(f"{name!r} has parameter {p!r} that 'pretrained' lacks;"
                                 f" exclude it (e.g. exclude=[{p!r}]) and keep it yourself")
    keys = included
    if chunk_bytes is not None and all(reads_rows(s) for s in [pre, *fts]):
        keys = row_chunks(included, {p: (sd[0], np.dtype(sd[1]).itemsize) for p, sd in shapes.items()},
                          len(fts) + 1, chunk_bytes)
        for p in dict.fromkeys(base_path(k) for k in keys if isinstance(k, Chunk)):
            for src, name in zip(fts, names):  # a chunk's shape cannot show a mismatch of the whole tensor
                got = _shape_dtype(src, p)
                if got is not None and (got[0] != shapes[p][0] or got[1] != shapes[p][1]):
                    raise ValueError(f"parameter {p!r} differs: 'pretrained' has {shapes[p][0]} {shapes[p][1]},"
                                     f" {name!r} has {got[0]} {got[1]}")
        sizes = {k: (k.total // k.rows) * (k.stop - k.start) if isinstance(k, Chunk) else sizes[k] for k in keys}
    state = _StreamState(pre, fts, names, check_finite, keys)
    inp = MergeInputs(paths=tuple(keys), num_tasks=len(fts), theta0=state.theta0, operands=state.operands,
                      relative=True, streaming=True, checks=state.checks, sizes=sizes)
    return inp, copied, state
