"""Exact global top-k magnitude threshold (TIES' trim step): a sampled bracket plus one counting pass.

The magnitude of an entry is ``|τ|`` cast to float32 (exact for bf16/f16/f32;
float64 task vectors are compared after rounding to float32).  Non-negative
float32 values order like their int32 bit patterns, so everything below works
on bit patterns.  Per task, the threshold is the ``n``-th largest magnitude
(``n = round(k N / 100)``) over all included entries; entries tied with it
are all kept.  It is found in two reads of each tensor:

1. *sample*: a strided slice of every tensor (about ``2**18`` entries per
   task in all) brackets the ``n``-th largest value: ``[lo, hi]`` around its
   sample estimate, several standard deviations of the sample quantile wide;
2. *count*: one fused pass per tensor labels each entry above / inside /
   below the bracket (two bytes per entry per 8 tasks); the host counts the entries above and collects the few
   inside, and the exact threshold is the ``(n − above)``-th largest of those.

The bracket is checked (``above < n <= above + inside``); a task whose check
fails, whose bracket holds too many entries, or any traced (jitted) call falls
back to the exact two-level radix select (two histogram passes:
:func:`radix_thresholds`).  Either way the result equals sorting all
magnitudes and taking the ``n``-th largest.  Counts are exact (int64 on the
host; int32 under tracing, where the total size must stay below 2**31).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mtl.merging.sources import MergeInputs, form_taus
from mtl.merging.tree import is_traced

__all__ = ["num_keep", "kth_largest_magnitudes", "radix_thresholds", "ties_thresholds_of", "magnitude"]

_HI_BINS = 1 << 16
_LO_BITS = 15
_LO_BINS = 1 << _LO_BITS


def magnitude(x):
    """``|x|`` as float32: the quantity TIES ranks."""
    return jnp.abs(x).astype(jnp.float32)


def _bits(x):
    return jax.lax.bitcast_convert_type(magnitude(x), jnp.int32).ravel()


@jax.jit
def _hist_hi(taus):
    return jnp.stack([jnp.zeros(_HI_BINS, jnp.int32).at[_bits(t) >> _LO_BITS].add(1) for t in taus])


@jax.jit
def _hist_lo(taus, hi_bin):
    out = []
    for k, t in enumerate(taus):
        b = _bits(t)
        inside = ((b >> _LO_BITS) == hi_bin[k]).astype(jnp.int32)
        out.append(jnp.zeros(_LO_BINS, jnp.int32).at[b & (_LO_BINS - 1)].add(inside))
    return jnp.stack(out)


def num_keep(k: float, n: int) -> int:
    """Entries TIES keeps for ``k`` percent of ``n``: ``round(k * n / 100)`` (half to even)."""
    if not 0 <= k <= 100:
        raise ValueError(f"k is a percentage in [0, 100], got {k}")
    return min(n, max(0, int(round(k * n / 100))))


def _pick(xp, hist, need):
    """Per row, the bin holding the ``need``-th largest entry and the count strictly above it."""
    ge = xp.flip(xp.cumsum(xp.flip(hist, 1), 1), 1)  # ge[:, b] = count(bin >= b)
    b = xp.maximum(xp.sum(ge >= need[:, None], axis=1) - 1, 0)
    at = lambda a: xp.take_along_axis(a, b[:, None], 1)[:, 0]  # noqa: E731
    return b, at(ge) - at(hist)


def radix_thresholds(paths, taus, num_tasks: int, k: float):
    """:func:`kth_largest_magnitudes` by the exact two-pass radix select (also under tracing)."""
    n_total, h1 = 0, None
    for p in paths:
        ts = taus(p)
        n_total += int(np.size(ts[0]))
        h1 = _accumulate(h1, _hist_hi(ts))
    n_keep = num_keep(k, n_total)
    if n_keep == 0 or h1 is None:
        return jnp.full((num_tasks,), jnp.inf, jnp.float32)
    traced = is_traced(h1)
    if traced and n_total >= 2**31:
        raise ValueError("traced top-k over 2**31 or more entries: call TIES eagerly (not under jit)")
    xp = jnp if traced else np
    need = xp.full((num_tasks,), n_keep, dtype=h1.dtype)
    hi, above = _pick(xp, h1, need)
    hi_arg = jnp.asarray(hi).astype(jnp.int32)
    h2 = None
    for p in paths:
        h2 = _accumulate(h2, _hist_lo(taus(p), hi_arg))
    lo, _ = _pick(xp, h2, need - above)
    bits = (hi << _LO_BITS) | lo
    if traced:
        return jax.lax.bitcast_convert_type(bits.astype(jnp.int32), jnp.float32)
    return jnp.asarray(bits.astype(np.int32).view(np.float32))


def _accumulate(total, h):
    """Sum histograms: int64 numpy on the host, int32 jax under tracing."""
    if not is_traced(h):
        h = np.asarray(h, np.int64)
    return h if total is None else total + h


# ---------------------------------------------------------------- sampled bracket + one counting pass

_SAMPLES = 1 << 18      # sample entries per task, over all tensors together
_MAX_INSIDE = 1 << 22   # a task whose bracket holds more entries than this falls back to the radix select
_TOP = np.int32(np.iinfo(np.int32).max)


def _bits_of(taus):
    return [jax.lax.bitcast_convert_type(magnitude(t), jnp.int32).ravel() for t in taus]


@functools.partial(jax.jit, static_argnames=("relative", "stride"))
def _sample(theta0, operands, drop, *, relative, stride):
    """Every ``stride``-th magnitude bit pattern of each ``τ_k`` (flat order, from 0): a strided slice,
    which XLA:CPU reads about twice as fast as a gather of the same entries."""
    _, taus = form_taus(theta0, operands, relative, drop)
    return jnp.stack([b[::stride] for b in _bits_of(taus)])


@functools.partial(jax.jit, static_argnames="relative")
def _label(theta0, operands, drop, lo, hi, *, relative):
    """Per group of 8 tasks, one uint16 code per entry: bit ``j`` says task ``8g + j``'s entry lies
    above its bracket, bit ``8 + j`` that it lies inside.  Two bytes per entry per 8 tasks go to the
    host, which counts and locates them: ``np.count_nonzero`` / ``np.flatnonzero`` are several times
    faster than XLA:CPU's reductions (measured here: ~0.2 ns vs ~2.5 ns per entry).  One output, so
    one loop over the inputs (XLA:CPU gives each output of a kernel its own loop, reading the inputs
    again); the per-task boolean masks this replaced were 2 K bytes per entry."""
    _, taus = form_taus(theta0, operands, relative, drop)
    bits = _bits_of(taus)
    one = lambda f, j: f.astype(jnp.uint16) << j  # noqa: E731
    return [functools.reduce(jnp.bitwise_or, [one(b > hi[g + j], j) | one((b >= lo[g + j]) & (b <= hi[g + j]), 8 + j)
                                              for j, b in enumerate(bits[g:g + 8])])
            for g in range(0, len(bits), 8)]


def _count_bits(code: np.ndarray) -> list[int]:
    """For each task ``j`` of a code group, the number of entries above its bracket."""
    return [int(np.count_nonzero(code & np.uint16(1 << j))) for j in range(8)]


def _where_bits(code: np.ndarray) -> list[np.ndarray]:
    """For each task ``j`` of a code group, the flat positions inside its bracket (their union located
    once: ``flatnonzero`` of a boolean array is several times faster than of an integer one)."""
    pos = np.flatnonzero(code >= np.uint16(1 << 8))
    c = code[pos] >> np.uint16(8)
    return [pos[((c >> np.uint16(j)) & np.uint16(1)).astype(bool)] for j in range(8)]


@functools.partial(jax.jit, static_argnames="relative")
def _gather(theta0, operands, drop, idx, *, relative):
    _, taus = form_taus(theta0, operands, relative, drop)
    return [jnp.take(b, i) for b, i in zip(_bits_of(taus), idx)]


def _bits_at(theta0, operands, drop, idx, *, relative):
    """Per task, the magnitude bit patterns of ``τ_k`` at flat positions ``idx[k]``.  Plain task vectors
    are read on the host (a numpy gather of the device buffer, several times faster than XLA:CPU's);
    with ``relative`` or DARE's drop, ``τ_k`` is formed by :func:`_gather` on the device."""
    if drop is None and not relative:
        return [np.abs(np.asarray(x).reshape(-1)[i]).astype(np.float32).view(np.int32)
                for x, i in zip(operands, idx)]
    size = padded_size(max(i.size for i in idx))
    got = jax.device_get(_gather(theta0, operands, drop, [_pad(i, size) for i in idx], relative=relative))
    return [g[:i.size] for g, i in zip(got, idx)]


def _stride(n_total: int) -> int:
    """An odd stride (so that rows of even length are not sampled in one column) giving ~_SAMPLES samples."""
    s = max(1, n_total // _SAMPLES)
    return s if s % 2 or s == 1 else s + 1


def _bracket(sample: np.ndarray, n_keep: int, n_total: int):
    """``(lo, hi)`` bit patterns bracketing the ``n_keep``-th largest value, from an (unsorted)
    sample: its ``j_hi``-th and ``j_lo``-th largest entries, ``j ± half`` around the sample
    position ``j`` of the quantile (two order statistics by ``np.partition``, no sort)."""
    m = sample.size
    q = n_keep / n_total
    j = q * m
    half = 6.0 * math.sqrt(max(m * q * (1 - q), 1.0)) + 16
    j_hi, j_lo = int(math.floor(j - half)), int(math.ceil(j + half))
    ks = [m - 1 - i for i in (j_hi, j_lo) if 0 <= i < m]   # descending position i = ascending m - 1 - i
    part = np.partition(sample, ks) if ks else sample
    hi = _TOP if j_hi < 0 else part[m - 1 - j_hi]
    lo = np.int32(0) if j_lo >= m else part[m - 1 - j_lo]
    return lo, hi


def _pad(i: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([i, np.zeros(size - i.size, i.dtype)]).astype(np.int32)


def padded_size(n: int) -> int:
    """``n`` rounded up to a power of two (at least 1024): a few padded sizes, a few compiles."""
    return 1 << max(10, (n - 1).bit_length())


def entry_sizes(inp: MergeInputs) -> dict:
    """Entries per path (from ``inp.sizes`` where known, else from ``θ0``)."""
    return inp.sizes if inp.sizes is not None else {p: int(np.size(inp.theta0(p))) for p in inp.paths}


def sample_brackets(inp: MergeInputs, sizes, n_keep: int):
    """Step 1: per task, ``(lo, hi)`` int32 bit patterns bracketing the ``n_keep``-th largest magnitude,
    from a strided sample of every tensor; ``None`` under tracing (the caller takes the radix select)."""
    n_total = sum(sizes[p] for p in inp.paths)
    stride, samples = _stride(n_total), []
    for i, p in enumerate(inp.paths):
        theta0, operands, drop = inp.read(p)
        if i == 0 and (is_traced(theta0) or any(is_traced(x) for x in operands)):
            return None  # under jit: the histograms stay on the device
        samples.append(_sample(theta0, operands, drop, relative=inp.relative, stride=stride))
        del theta0, operands, drop
    sample = np.concatenate(jax.device_get(samples), axis=1)
    brackets = [_bracket(sample[t], n_keep, n_total) for t in range(inp.num_tasks)]
    return np.array([b[0] for b in brackets], np.int32), np.array([b[1] for b in brackets], np.int32)


class Tally:
    """Step 2's bookkeeping: per task, the entries above its bracket and the bit patterns inside it.

    :meth:`thresholds` is the exact threshold from them, or ``None`` where a
    bracket missed (or held more than ``_MAX_INSIDE`` entries): the caller
    then takes the radix select.
    """

    def __init__(self, lo: np.ndarray, hi: np.ndarray, n_keep: int):
        self.lo, self.hi, self.n_keep = lo, hi, n_keep
        num = lo.size
        self.above = np.zeros(num, np.int64)
        self.inside = np.zeros(num, np.int64)
        self.ok = np.ones(num, bool)
        self.cands: list[list] = [[] for _ in range(num)]

    def wants(self, t: int) -> bool:
        """Whether task ``t``'s in-bracket values are still needed (its bracket is wider than one value)."""
        return bool(self.ok[t] and self.lo[t] != self.hi[t])

    def add(self, t: int, above: int, inside: int) -> None:
        self.above[t] += above
        self.inside[t] += inside
        if self.inside[t] > _MAX_INSIDE:
            self.ok[t] = False
            self.cands[t] = []

    def collect(self, t: int, bits: np.ndarray) -> None:
        if self.wants(t):
            self.cands[t].append(np.asarray(bits))

    def thresholds(self):
        out = np.zeros(self.lo.size, np.int32)
        for t in range(self.lo.size):
            need = self.n_keep - self.above[t]
            if not (self.ok[t] and 0 < need <= self.inside[t]):
                return None
            if self.lo[t] == self.hi[t]:
                out[t] = self.lo[t]
            else:
                c = np.concatenate(self.cands[t])
                out[t] = np.partition(c, c.size - need)[c.size - need]
        return jnp.asarray(out.view(np.float32))


def ties_thresholds_of(inp: MergeInputs, k: float):
    """Per task, TIES' magnitude threshold over ``inp``'s paths (float32 ``[K]``; see the module docstring)."""
    num = inp.num_tasks
    sizes = entry_sizes(inp)
    n_keep = num_keep(k, sum(sizes[p] for p in inp.paths))
    if n_keep == 0 or not inp.paths:
        return jnp.full((num,), jnp.inf, jnp.float32)
    radix = lambda: radix_thresholds(inp.paths, inp.taus, num, k)  # noqa: E731
    brackets = sample_brackets(inp, sizes, n_keep)
    if brackets is None:
        return radix()
    lo, hi = brackets
    tally = Tally(lo, hi, n_keep)
    for p in inp.paths:  # 2. count above, collect inside
        theta0, operands, drop = inp.read(p)
        codes = [np.asarray(c) for c in _label(theta0, operands, drop, lo, hi, relative=inp.relative)]
        idx = []
        for code in codes:  # np.asarray: the device buffer itself on CPU (no copy)
            for n_up, where in zip(_count_bits(code), _where_bits(code)):
                t = len(idx)
                if t < num:
                    tally.add(t, n_up, where.size)
                    idx.append(where if tally.wants(t) else where[:0])
        if any(i.size for i in idx):
            for t, g in enumerate(_bits_at(theta0, operands, drop, idx, relative=inp.relative)):
                tally.collect(t, g)
        del theta0, operands, drop, codes
    out = tally.thresholds()
    return radix() if out is None else out  # a bracket missed: the exact radix select for every task (rare)


def kth_largest_magnitudes(paths, taus, num_tasks: int, k: float):
    """Per task, the magnitude threshold keeping the top ``k`` percent of all entries.

    ``taus(path)`` returns the ``num_tasks`` task-vector tensors at ``path``.
    Returns a float32 array ``[num_tasks]`` (``inf`` when nothing is kept):
    an entry is kept iff ``magnitude(τ) >= threshold``.  Entries tied with the
    threshold are all kept, so slightly more than k% can survive when
    magnitudes repeat; the result never depends on tensor order or sharding.
    """
    # not relative: θ0 only lends its shape to the kernels, any operand does
    inp = MergeInputs(paths=tuple(paths), num_tasks=num_tasks, theta0=lambda p: taus(p)[0], operands=taus)
    return ties_thresholds_of(inp, k)
