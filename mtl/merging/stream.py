"""Merging tensor by tensor from lazy sources: peak memory ≈ θ0 + result + K tensors.

``merge_stream(method, pretrained, finetuned, ...)`` reads the ``K`` fine-tuned
models (sources with ``paths()``/``load(path)``, or in-memory pytrees) one
tensor at a time and runs the same fused per-tensor kernels as the pytree API
on ``θ0`` (moved to the device once per tensor) and the ``K`` fine-tuned
tensors: ``τ_k = θ_k − θ0`` is formed inside the kernel and never written
out, and the results are bit-identical to ``MERGERS[method](pretrained,
task_vectors(...))``.  TIES (also after DARE) first reads every tensor twice
for its exact global top-k threshold (a sample, then one counting pass:
:mod:`mtl.merging.topk`), so it reads every model three times; the other
methods read each tensor once.  Non-finite inputs and fine-tunes identical
to ``pretrained`` are found from flags the kernels return, checked once
after the last tensor: with a ``sink``, the error comes after every tensor
was handed on, so a writer should commit its output only once this returns.  Pass ``sink(path, tensor)``
to hand each merged tensor on (e.g. to a checkpoint writer) instead of
keeping the result.  Sharded tensors stay sharded.  A pretrained source
without ``spec(path)`` is read once more up front to learn each dtype.

``chunk_bytes`` bounds the input resident at once for tensors too large to
hold ``K + 1`` times: such a tensor is merged in row chunks (every method but
RegMean is a function of each entry's position, so the chunks give the whole
tensor's result bit for bit, DARE's mask included).  A sink with
``accepts_chunks = True`` (:class:`mtl.io.SafetensorsWriter`) receives each
chunk under a :class:`mtl.merging.sources.Chunk` key and writes it in place;
any other sink, and the returned dict, get whole tensors assembled on the host.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from mtl.merging.registry import get_core
from mtl.merging.sources import Chunk, stream_inputs

__all__ = ["merge_stream"]


def merge_stream(method: str, pretrained, finetuned: Sequence, *, include=None, exclude=None,
                 names: Sequence[str] | None = None, sink: Callable | None = None, check_finite: bool = True,
                 chunk_bytes: int | None = None, **hparams):
    """Merge ``finetuned`` models into ``pretrained`` one tensor at a time.

    ``method``: a name in ``CORES`` (``average``, ``task_arithmetic``,
    ``combine``, ``ties``, ``dare``, ``fisher``, ``regmean``) with its
    hyper-parameters (``fishers`` may be sources too).  ``include``/``exclude``
    filter paths as in :func:`mtl.merging.task_vector`; unmerged pretrained
    paths are copied, paths only in the fine-tuned models (heads) must be
    excluded and are not returned.  Returns a flat ``{path: tensor}`` dict in
    the pretrained order (``unflatten(result, like=...)`` rebuilds the tree),
    or ``None`` when ``sink`` is given.  ``chunk_bytes``: see the module docstring.
    """
    core = get_core(method, **hparams)
    inp, copied, state = stream_inputs(pretrained, finetuned, include, exclude, names, check_finite,
                                       chunk_bytes=chunk_bytes)
    out: dict = {}
    emit = sink if sink is not None else out.__setitem__
    whole = _Assemble(emit, in_memory=sink is None) if not getattr(sink, "accepts_chunks", False) else emit
    for p in copied:
        emit(p, state.pre.load(p))
    for p, x in core(inp):
        (whole if isinstance(p, Chunk) else emit)(p, x)
    state.finish()
    if sink is not None:
        return None
    return {p: out[p] for p in state.pre.paths() if p in out}


class _Assemble:
    """Collect a tensor's row chunks (in order) into one host array; hand it on after the last chunk."""

    def __init__(self, emit, in_memory: bool):
        self.emit, self.in_memory, self.buf = emit, in_memory, None

    def __call__(self, key: Chunk, x):
        x = np.asarray(x)
        if key.start == 0:
            self.buf = np.empty((key.rows,) + x.shape[1:], x.dtype)
        self.buf[key.start:key.stop] = x
        if key.last:
            buf, self.buf = self.buf, None
            self.emit(key.base, jnp.asarray(buf) if self.in_memory else buf)
