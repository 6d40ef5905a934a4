"""Exact global top-k magnitude threshold, one tensor at a time (TIES' trim step).

The magnitude of an entry is ``|τ|`` cast to float32 (exact for bf16/f16/f32;
float64 task vectors are compared after rounding to float32).  Non-negative
float32 values order like their int32 bit patterns, so the k-th largest
magnitude is found by an exact two-level radix select:

1. pass 1 histograms the top 16 bits (``bits >> 15``, 65,536 bins) of every
   entry of every tensor, and picks the bin holding the k-th largest entry;
2. pass 2 histograms the low 15 bits of the entries inside that bin, which
   pins the exact bit pattern of the k-th largest magnitude.

Each pass reads each tensor once and keeps only the histograms (per task), so
streaming needs two reads of every model before the merge pass.  Counts are
accumulated on the host in int64 (in int32 under tracing, where the total
size must stay below 2**31).  The result equals sorting all magnitudes and
taking the k-th largest.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtl.merging.tree import is_traced

__all__ = ["num_keep", "kth_largest_magnitudes", "magnitude"]

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


def kth_largest_magnitudes(paths, taus, num_tasks: int, k: float):
    """Per task, the magnitude threshold keeping the top ``k`` percent of all entries.

    ``taus(path)`` returns the ``num_tasks`` task-vector tensors at ``path``.
    Returns a float32 array ``[num_tasks]`` (``inf`` when nothing is kept):
    an entry is kept iff ``magnitude(τ) >= threshold``.  Entries tied with the
    threshold are all kept, so slightly more than k% can survive when
    magnitudes repeat; the result never depends on tensor order or sharding.
    """
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
