"""Read the next tensor while the current one is merged: a one-ahead prefetching source wrapper.

:class:`PrefetchSource` wraps any source (``paths``/``load``/``spec``) with an
expected read order.  After serving ``load(order[i])`` it asks a shared
thread pool to read ``order[i + 1]`` (wrapping around, for methods that make
several passes), so file reads overlap the merge arithmetic (both release the
GIL).  A load that was not predicted is read synchronously and the stale read
is dropped, so results never depend on the prediction.  Each wrapper holds at
most one read-ahead tensor: with ``K`` models, prefetching adds ``K + 1``
tensors to the resident set, independently of the model size.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

__all__ = ["PrefetchSource", "prefetch_all"]


class PrefetchSource:
    def __init__(self, source, order: Sequence[str], executor: Executor):
        self.source = source
        order = list(order)
        self._next = {p: order[(i + 1) % len(order)] for i, p in enumerate(order)} if order else {}
        self._pool = executor
        self._pending = None  # (path, future)
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def paths(self):
        return self.source.paths()

    def spec(self, path):
        return self.source.spec(path) if hasattr(self.source, "spec") else None

    @property
    def reads_rows(self) -> bool:
        """Row chunks are read alone when the wrapped source can (see :func:`mtl.merging.sources.reads_rows`)."""
        from mtl.merging.sources import reads_rows

        return reads_rows(self.source)

    def load_part(self, key):
        """The tensor (or row chunk: a :class:`mtl.merging.sources.Chunk`) at ``key``; ``order`` holds keys."""
        from mtl.merging.sources import load_part

        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and pending[0] == key:
            x = pending[1].result()
            self.hits += 1
        else:
            if pending is not None:
                pending[1].cancel()
            x = load_part(self.source, key)
            self.misses += 1
        nxt = self._next.get(key)
        if nxt is not None:
            with self._lock:
                self._pending = (nxt, self._pool.submit(load_part, self.source, nxt))
        return x

    load = load_part

    def drop(self) -> None:
        """Forget the read-ahead tensor (at the end of a merge)."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].cancel()


@contextlib.contextmanager
def prefetch_all(sources: Sequence, order: Sequence[str], workers: int = 2):
    """Wrap ``sources`` as :class:`PrefetchSource` s over one pool of ``workers`` reader threads."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mtl-prefetch")
    wrapped = [PrefetchSource(s, order, pool) for s in sources]
    try:
        yield wrapped
    finally:
        for w in wrapped:
            w.drop()
        pool.shutdown(wait=True, cancel_futures=True)
