"""Deterministic, host-sharded batching from random-access sources.

The training batch at step ``s`` is a pure function of ``(seed, s)``: epoch
``e = s // steps_per_epoch`` uses the permutation ``default_rng([seed, e])`` of the
split, and the step takes the next ``global_batch`` indices of it. Each host reads only
its contiguous slice of those indices and the global array is assembled with
``jax.make_array_from_process_local_data``. Resuming at step ``s`` therefore needs no
iterator state, and every step sees the same examples whatever the number of hosts.

Evaluation walks a split in order; the last batch is padded with masked-out rows so
sums and counts stay exact.
"""
from __future__ import annotations

import numpy as np
import jax

from mtl.data.base import Source, SubsetSource


def split_validation(train: Source, fraction: float, seed: int) -> tuple[Source, Source]:
    """Carve a validation split out of ``train`` (a fixed permutation of ``seed``)."""
    n = len(train)
    n_val = int(round(n * float(fraction)))
    if not 0 < n_val < n:
        raise ValueError(f"val_fraction={fraction} leaves {n_val} of {n} training examples for validation; "
                         "choose a fraction that keeps both splits non-empty")
    perm = np.random.default_rng([int(seed), 7919]).permutation(n)
    return SubsetSource(train, np.sort(perm[n_val:])), SubsetSource(train, np.sort(perm[:n_val]))


def _to_global(local: dict, sharding_fn, global_batch: int):
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding_fn(x.ndim), x, (global_batch,) + x.shape[1:])
    return jax.tree.map(put, local)


class TrainBatches:
    """``batches[step]`` -> the global training batch for that step (device arrays)."""

    def __init__(self, source: Source, global_batch: int, seed: int, sharding_fn=None,
                 process_index: int | None = None, process_count: int | None = None):
        self.source = source
        self.n = len(source)
        self.global_batch = int(global_batch)
        if self.global_batch > self.n:
            raise ValueError(f"batch size {global_batch} exceeds the {self.n} training examples")
        self.seed = int(seed)
        self.steps_per_epoch = self.n // self.global_batch
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if self.global_batch % self.process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the {self.process_count} hosts")
        self.local_batch = self.global_batch // self.process_count
        self.sharding_fn = sharding_fn
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def global_indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(int(step), self.steps_per_epoch)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        perm = self._perm_cache[1]
        return perm[k * self.global_batch:(k + 1) * self.global_batch]

    def local_indices(self, step: int) -> np.ndarray:
        idx = self.global_indices(step)
        lo = self.process_index * self.local_batch
        return idx[lo:lo + self.local_batch]

    def host_batch(self, step: int) -> dict:
        return self.source[np.sort(self.local_indices(step))]

    def __getitem__(self, step: int):
        local = self.host_batch(step)
        if self.sharding_fn is None:
            return jax.tree.map(np.asarray, local)
        return _to_global(local, self.sharding_fn, self.global_batch)


def eval_batches(source: Source, batch_size: int, sharding_fn=None, process_index: int | None = None,
                 process_count: int | None = None):
    """Yield batches covering ``source`` once in order; the last is padded with masked rows."""
    n = len(source)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if batch_size % pc:
        raise ValueError(f"eval batch {batch_size} is not divisible by the {pc} hosts")
    local = batch_size // pc
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = idx < n
        idx = np.where(valid, idx, 0)
        lo = pi * local
        idx, valid = idx[lo:lo + local], valid[lo:lo + local]
        b = source[idx]
        b["masks"] = {k: np.logical_and(m, valid) for k, m in b["masks"].items()}
        if sharding_fn is None:
            yield jax.tree.map(np.asarray, b)
        else:
            yield _to_global(b, sharding_fn, batch_size)
