"""Merge checkpoint files out of core: K models that need not fit in memory, any mix of formats.

    from mtl.merging.files import merge_files
    merge_files("ties", "base.safetensors", ["ft_a/", "ft_b.mtl"], "merged/", k=20)
    mtl merge-files --method ties --base base.safetensors --models ft_a/ ft_b.mtl --out merged/ --kw k=20

The inputs are opened as lazy sources (:func:`mtl.io.open_source`:
safetensors files or sharded directories, mtl artifacts, orbax checkpoints),
wrapped in a one-ahead prefetcher (:mod:`mtl.io.prefetch`) so the next
tensor of every model is read while the current one is merged (and a
write-behind thread writes the previous result), and fed to
:func:`mtl.merging.merge_stream`, which reads one tensor at a time across the
K models.  Each merged tensor goes straight to the writer
(:func:`mtl.io.open_writer`: safetensors written shard by shard at planned
offsets; artifact/orbax output is collected in memory and written at the
end).  Peak resident memory for safetensors in and out is therefore a few
tensors per model plus a constant, whatever the model size
(``experiments/bench/merge_ooc.py`` measures it); a tensor whose K + 1
copies exceed ``chunk_bytes`` (default 1 GiB) is read, merged and written in
row chunks, so no single tensor needs to fit K + 1 times.  Nothing is left under
``out`` when the merge fails.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from mtl.io import ArtifactSource, open_source, open_writer, output_format, prefetch_all, specs_of
from mtl.merging.sources import Chunk, reads_rows, row_chunks
from mtl.merging.stream import merge_stream
from mtl.merging.tree import path_filter

__all__ = ["merge_files", "parse_size", "AUTO_CHUNK_BYTES"]

#: ``chunk_bytes="auto"``: tensors whose K + 1 copies exceed 1 GiB are merged in row chunks
AUTO_CHUNK_BYTES = 1 << 30


def parse_size(s) -> int | None:
    """``"5GB"`` / ``"500MB"`` / ``"2GiB"`` / bytes -> bytes (``None`` stays ``None``)."""
    if s is None or isinstance(s, int):
        return s
    t = str(s).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for u, m in units.items():
        if t.endswith(u):
            try:
                return int(float(t[:-len(u)]) * m)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"size {s!r}: expected bytes or a number with KB/MB/GB/KiB/MiB/GiB") from None


class _Progress:
    """``[i/N] tensors, MB/s`` on stderr (a carriage-return line; one line per 10% when not a tty)."""

    def __init__(self, sink, total: int, nbytes: Mapping[str, int], enabled: bool):
        self.sink, self.total, self.nbytes, self.enabled = sink, total, nbytes, enabled
        self.done, self.bytes, self.t0, self._last = 0, 0, time.perf_counter(), -1
        self.tty = enabled and sys.stderr.isatty()

    accepts_chunks = property(lambda self: getattr(self.sink, "accepts_chunks", False))

    def __call__(self, path, tensor):
        self.sink(path, tensor)
        if isinstance(path, Chunk):  # a row chunk: its share of the bytes, the tensor counted at its last
            self.bytes += self.nbytes.get(path.base, 0) * (path.stop - path.start) // max(path.rows, 1)
            if not path.last:
                return
        else:
            self.bytes += self.nbytes.get(path, 0)
        self.done += 1
        if not self.enabled:
            return
        tenth = 10 * self.done // max(self.total, 1)
        if self.tty or tenth != self._last or self.done == self.total:
            self._last = tenth
            rate = self.bytes / max(time.perf_counter() - self.t0, 1e-9) / 1e6
            end = "\r" if self.tty and self.done < self.total else "\n"
            print(f"merge: [{self.done}/{self.total}] tensors, {self.bytes / 1e6:.0f} MB written, {rate:.0f} MB/s",
                  end=end, file=sys.stderr, flush=True)


def _is_hf(path: str) -> bool:
    import json

    from mtl.io.hf_layouts import _MODEL_TYPES

    cfg = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg) as f:
        return json.load(f).get("model_type") in _MODEL_TYPES


def _open(m, map_hf: str | None):
    if not isinstance(m, str):
        return m
    if map_hf is not None and _is_hf(m):
        from mtl.io.hf import HFSource

        return HFSource(m, prefix=map_hf)
    return open_source(m)


class _WriteBehind:
    """Hand each merged tensor to a writer thread (at most ``depth`` queued), so writes overlap the next merge.

    A failure in the writer thread is raised at the next call or at :meth:`finish`.
    """

    accepts_chunks = property(lambda self: getattr(self.sink, "accepts_chunks", False))

    def __init__(self, sink, depth: int = 1):
        self.sink, self._q, self._err = sink, queue.Queue(maxsize=depth), None
        self._t = threading.Thread(target=self._run, name="mtl-write-behind", daemon=True)
        self._t.start()

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._err is None:
                try:
                    self.sink(*item)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    self._err = e

    def _raise(self):
        if self._err is not None:
            raise self._err

    def __call__(self, path, tensor):
        self._raise()
        self._q.put((path, np.asarray(tensor)))  # np.asarray waits for the device; the write happens later

    def finish(self):
        self._q.put(None)
        self._t.join()
        self._raise()

    def finish_quietly(self):
        if self._t.is_alive():
            self._err = self._err or RuntimeError("aborted")
            self._q.put(None)
            self._t.join()


def _merged_order(pre, include, exclude) -> list[str]:
    keep = path_filter(include, exclude)
    out = []
    for p in pre.paths():
        s = pre.spec(p) if hasattr(pre, "spec") else None
        if keep(p) and (s is None or jnp.issubdtype(s.dtype, jnp.floating)):
            out.append(p)
    return out


def merge_files(method: str, base, models: Sequence, out: str, *, format: str | None = None,
                include=None, exclude=None, names: Sequence[str] | None = None,
                max_shard_bytes: int | str | None = None, metadata: Mapping | None = None,
                overwrite: bool = False, prefetch: bool = True, workers: int = 2, write_behind: bool = True,
                progress: bool = False, map_hf: str | None = None,
                check_finite: bool = True, chunk_bytes: int | str | None = "auto", **hparams) -> str:
    """Merge the checkpoints ``models`` into ``base`` with ``method`` and write ``out``; returns ``out``.

    ``base``/``models``: paths (any format :func:`mtl.io.open_source` reads)
    or source objects.  ``out``: ``*.safetensors`` (one file), ``*.mtl`` (an
    artifact: the base artifact's metadata plus a ``merge`` entry), or a
    directory (safetensors, sharded at ``max_shard_bytes``, e.g. ``"5GB"``; a
    ``config.json`` beside the base is copied, so a merged Hugging Face model
    loads like its base);
    ``format`` overrides the choice.  ``method`` and ``hparams`` are those of
    :func:`mtl.merging.merge_stream`, as are ``include``/``exclude``/``names``.
    ``prefetch`` reads every model's next tensor ahead (``workers`` threads);
    ``write_behind`` writes merged tensors from a thread (one queued at most).
    ``map_hf``: open Hugging Face checkpoints (a supported ``config.json``
    beside the weights) as :class:`mtl.io.hf.HFSource` in mtl names under
    this prefix (e.g. ``"encoder/"``), so they merge with mtl artifacts or
    with HF files whose name prefixes differ; the result is in mtl names.
    ``chunk_bytes`` (bytes or ``"512MB"``; ``None``: never): a tensor whose
    K + 1 copies exceed it is merged in row chunks, read and written in place
    (:func:`mtl.merging.merge_stream`); ``"auto"`` is 1 GiB, except for
    RegMean, which merges whole tensors.
    """
    if not models:
        raise ValueError("merge_files: need at least one fine-tuned model")
    pre = _open(base, map_hf)
    fts = [_open(m, map_hf) for m in models]
    names = list(names) if names is not None else [m if isinstance(m, str) else f"model {i + 1}"
                                                   for i, m in enumerate(models)]
    specs = specs_of(pre)
    fmt = output_format(out, format)
    if fmt == "artifact" and metadata is None:
        if not isinstance(pre, ArtifactSource):
            raise ValueError("artifact output needs the model's metadata: merge into an artifact base,"
                             " pass metadata=..., or write safetensors (out=DIR or *.safetensors)")
        metadata = {**pre.meta, "merge": {"method": method, "kwargs": {k: repr(v) for k, v in hparams.items()},
                                          "pretrained": str(base), "finetuned": [str(m) for m in models]}}
    if fmt == "safetensors" and metadata is None:
        metadata = getattr(getattr(pre, "source", pre), "metadata", None)  # e.g. {"format": "pt"}, which HF requires
    writer = open_writer(out, specs, fmt, max_shard_bytes=parse_size(max_shard_bytes), metadata=metadata,
                         overwrite=overwrite)
    if fmt == "safetensors" and not writer.single_file and isinstance(base, str) and map_hf is None:
        cfg = os.path.join(base if os.path.isdir(base) else os.path.dirname(base), "config.json")
        if os.path.isfile(cfg):  # a Hugging Face model directory: the merge loads like the base
            with open(cfg) as f:
                writer.extra_files["config.json"] = f.read()
    nbytes = {p: int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for p, s in specs.items()}
    if isinstance(chunk_bytes, str) and chunk_bytes.strip().lower() == "auto":
        chunk_bytes = None if method == "regmean" or hparams.get("then") == "regmean" else AUTO_CHUNK_BYTES
    chunk_bytes = parse_size(chunk_bytes)
    order = _merged_order(pre, include, exclude)
    if chunk_bytes is not None and all(reads_rows(s) for s in [pre, *fts]):
        order = row_chunks(order, {p: (specs[p].shape, np.dtype(specs[p].dtype).itemsize) for p in order},
                           len(fts) + 1, chunk_bytes)
    sink = _WriteBehind(_Progress(writer, len(specs), nbytes, progress)) if write_behind else \
        _Progress(writer, len(specs), nbytes, progress)
    try:
        if prefetch:
            with prefetch_all([pre, *fts], order, workers) as (wpre, *wfts):
                merge_stream(method, wpre, wfts, include=include, exclude=exclude, names=names, sink=sink,
                             check_finite=check_finite, chunk_bytes=chunk_bytes, **hparams)
        else:
            merge_stream(method, pre, fts, include=include, exclude=exclude, names=names, sink=sink,
                         check_finite=check_finite, chunk_bytes=chunk_bytes, **hparams)
        if write_behind:
            sink.finish()
    except BaseException:
        if write_behind:
            sink.finish_quietly()
        writer.abort()
        raise
    return writer.close()
