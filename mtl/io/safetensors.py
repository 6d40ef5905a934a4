"""The safetensors format, read lazily and written shard by shard (no dependency).

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes
of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``, space-padded) and the raw little-endian,
row-major tensor bytes; offsets count from the end of the header.  A sharded
checkpoint is a directory of such files plus ``*.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``), as
Hugging Face's ``save_pretrained`` writes it.

* :class:`SafetensorsSource` is a merge source (``paths()``, ``load(path)``,
  ``spec(path)``) over a file, a sharded directory or an index file.  It reads
  only the headers up front; ``load`` reads one tensor with ``preadv`` straight
  into a fresh numpy array, so resident memory is that tensor (no memory map
  whose touched pages would count as resident until the file is closed).
* :class:`SafetensorsWriter` plans the whole layout from the tensor specs
  (name, shape, dtype) first, writes every header, and then takes tensors in
  any order as a sink ``writer(name, tensor)`` (``pwrite`` at the planned
  offset); :meth:`~SafetensorsWriter.close` checks that every tensor arrived
  and renames the temporary files into place, so an interrupted or failed
  write leaves nothing behind under the final name.

Here the format is implemented directly (it is a page of spec) so that
``bfloat16`` and ``float8`` tensors load as ``ml_dtypes`` arrays and reads go
into preallocated buffers; the ``safetensors`` package is the independent
reference the tests compare against.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsSource", "SafetensorsWriter", "TensorSpec", "read_header", "load_safetensors",
           "save_safetensors", "is_safetensors", "specs_of", "DTYPES"]

#: safetensors dtype codes and their numpy dtypes
DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
INDEX_SUFFIX = ".safetensors.index.json"
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("mtl.io.safetensors assumes a little-endian machine")


class SafetensorsError(ValueError):
    """A safetensors file or index is malformed, truncated, or does not match what was expected."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor (what ``Source.spec(path)`` returns)."""

    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape)) * self.dtype.itemsize


def dtype_code(dtype) -> str:
    dt = np.dtype(dtype)
    if dt not in _CODES:
        raise SafetensorsError(f"dtype {dt} has no safetensors code; supported: {', '.join(map(str, _CODES))}")
    return _CODES[dt]


@dataclasses.dataclass(frozen=True)
class _Entry:
    file: str
    spec: TensorSpec
    offset: int  # absolute byte offset in ``file``


def read_header(path: str) -> tuple[dict[str, _Entry], dict]:
    """``({name: entry}, metadata)`` of one file, validated against the file size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path} is not a safetensors file: {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(f"{path} is truncated or not a safetensors file: header length {n}"
                                       f" but the file has {size} bytes")
            raw = f.read(n)
    except FileNotFoundError:
        raise FileNotFoundError(f"no safetensors file {path}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path} is corrupt: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} is corrupt: its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries, spans = {}, []
    for name, d in header.items():
        try:
            code, shape, (b, e) = d["dtype"], tuple(int(s) for s in d["shape"]), d["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path} is corrupt: tensor {name!r} has a malformed entry {d!r}") from None
        if code not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {code!r}, which mtl does not read;"
                                   f" supported: {', '.join(DTYPES)}")
        spec = TensorSpec(shape, DTYPES[code])
        if any(s < 0 for s in shape) or e - b != spec.nbytes or b < 0:
            raise SafetensorsError(f"{path} is corrupt: tensor {name!r} ({code} {list(shape)}) spans bytes"
                                   f" [{b}, {e}), expected {spec.nbytes} bytes")
        if start + e > size:
            raise SafetensorsError(f"{path} is truncated: tensor {name!r} ends at byte {start + e}"
                                   f" but the file has {size} bytes")
        entries[name] = _Entry(path, spec, start + b)
        spans.append((b, e, name))
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise SafetensorsError(f"{path} is corrupt: tensors {n0!r} and {n1!r} overlap")
    return dict(sorted(entries.items(), key=lambda kv: kv[1].offset)), meta


def _index_file(path: str) -> str | None:
    if path.endswith(INDEX_SUFFIX) and os.path.isfile(path):
        return path
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*" + INDEX_SUFFIX)))
        if len(found) > 1:
            raise SafetensorsError(f"{path} holds several index files ({', '.join(map(os.path.basename, found))});"
                                   " pass the one to read")
        return found[0] if found else None
    return None


def is_safetensors(path: str) -> bool:
    """A ``.safetensors`` file, an index file, or a directory holding either."""
    if os.path.isfile(path):
        return path.endswith(".safetensors") or path.endswith(INDEX_SUFFIX)
    return os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*.safetensors")))


class SafetensorsSource:
    """A lazy merge source over a safetensors file, a sharded directory, or its index file.

    ``paths()`` are the tensor names as stored (Hugging Face's ``a.b.c`` or
    mtl's ``a/b/c``), in file order; ``load(name)`` reads one tensor into a
    fresh numpy array; ``spec(name)`` costs nothing.  ``metadata`` is the
    ``__metadata__`` of the (first) file.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        index = _index_file(self.path)
        if index is not None:
            self._entries, self.metadata = self._read_index(index)
        else:
            file = self.path
            if os.path.isdir(file):
                files = sorted(glob.glob(os.path.join(file, "*.safetensors")))
                if len(files) != 1:
                    raise FileNotFoundError(
                        f"{path}: expected one .safetensors file or a *{INDEX_SUFFIX} index in the directory;"
                        f" found {len(files)} .safetensors files and no index")
                file = files[0]
            self._entries, self.metadata = read_header(file)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _read_index(index: str):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{index} is not a safetensors index (expected a 'weight_map'): {e}") from None
        root = os.path.dirname(index)
        entries, metadata, headers = {}, None, {}
        for shard in dict.fromkeys(weight_map.values()):
            file = os.path.join(root, shard)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{index} names shard {shard!r}, which is missing from {root}")
            headers[shard], meta = read_header(file)
            metadata = meta if metadata is None else metadata
        for shard, header in headers.items():
            for name, entry in header.items():
                if weight_map.get(name) == shard:
                    entries[name] = entry
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise SafetensorsError(f"{index} maps tensor {name!r} to {shard!r}, which does not hold it")
        return entries, metadata or {}

    def paths(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def spec(self, name: str) -> TensorSpec:
        return self._entry(name).spec

    def load(self, name: str) -> np.ndarray:
        e = self._entry(name)
        out = np.empty(e.spec.shape, e.spec.dtype)
        with self._lock:  # loads may come from a prefetch thread (mtl.io.prefetch)
            fd = self._fds.get(e.file)
            if fd is None:
                fd = self._fds[e.file] = os.open(e.file, os.O_RDONLY)
        _pread_into(fd, out.reshape(-1).view(np.uint8), e.offset, e.file, name)
        return out

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (axis 0) of a tensor, read alone (for merges in row chunks)."""
        e = self._entry(name)
        shape = e.spec.shape
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{self.path}: rows {start}:{stop} of {name!r} {shape} are out of range")
        out = np.empty((stop - start,) + tuple(shape[1:]), e.spec.dtype)
        row = out.nbytes // max(stop - start, 1) if stop > start else 0
        with self._lock:
            fd = self._fds.get(e.file)
            if fd is None:
                fd = self._fds[e.file] = os.open(e.file, os.O_RDONLY)
        _pread_into(fd, out.reshape(-1).view(np.uint8), e.offset + start * row, e.file, name)
        return out

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self):
        return f"SafetensorsSource({self.path!r}, {len(self._entries)} tensors)"


def _pread_into(fd: int, buf: np.ndarray, offset: int, file: str, name: str) -> None:
    view, done = memoryview(buf), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + (1 << 30)]], offset + done)
        if n == 0:
            raise SafetensorsError(f"{file} is truncated: tensor {name!r} could not be read in full")
        done += n


def _pwrite_all(fd: int, buf: np.ndarray, offset: int) -> None:
    view, done = memoryview(buf), 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:done + (1 << 30)]], offset + done)


def specs_of(source) -> dict[str, TensorSpec]:
    """``{path: TensorSpec}`` of a source (from ``spec`` when it has one, else by loading)."""
    out = {}
    for p in source.paths():
        s = source.spec(p) if hasattr(source, "spec") else np.asarray(source.load(p))
        if s is not None:
            out[p] = TensorSpec(tuple(s.shape), np.dtype(s.dtype))
    return out


def _header_bytes(layout: list[tuple[str, TensorSpec, int]], metadata: Mapping | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, spec, off in layout:
        header[name] = {"dtype": dtype_code(spec.dtype), "shape": list(spec.shape),
                        "data_offsets": [off, off + spec.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-(8 + len(raw)) % 8)


def _plan_shards(specs: Mapping[str, TensorSpec], max_shard_bytes: int | None) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        if max_shard_bytes and shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += spec.nbytes
    return shards


class CommitOnExit:
    """A writer as a context manager: ``close()`` (commit) on a clean exit, ``abort()``
    (nothing left behind) when the block raises."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class SafetensorsWriter(CommitOnExit):
    """Write tensors of known specs into one safetensors file or a sharded directory.

    ``out`` ending in ``.safetensors`` is one file; anything else is a
    directory holding ``model.safetensors`` or, when ``max_shard_bytes`` splits
    the tensors, ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` (Hugging Face's names).  ``specs`` maps
    names to ``TensorSpec``/``(shape, dtype)``/arrays, in file order.  Use as a
    sink (``writer(name, tensor)``), then :meth:`close`; as a context manager
    a failure removes everything written.  ``overwrite=False`` refuses an
    existing ``out``.  ``extra_files`` (``{name: text}``, e.g. a ``config.json``)
    are written into the directory before it is moved into place.  ``fsync=True`` flushes the files to the disk before the
    rename (durable across a power loss, not only a crash of the process).
    """

    def __init__(self, out: str, specs: Mapping, *, max_shard_bytes: int | None = None,
                 metadata: Mapping | None = None, overwrite: bool = False, prefix: str = "model",
                 fsync: bool = False, extra_files: Mapping[str, str] | None = None):
        self.out, self.fsync = os.path.abspath(out), fsync
        self.extra_files = dict(extra_files or {})
        if os.path.exists(self.out) and not overwrite:
            raise FileExistsError(f"{self.out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        self.specs = {n: _as_spec(s) for n, s in specs.items()}
        if not self.specs:
            raise ValueError("SafetensorsWriter: no tensors to write")
        self.single_file = self.out.endswith(".safetensors")
        if self.single_file and self.extra_files:
            raise ValueError(f"{out}: extra files ({', '.join(self.extra_files)}) need a directory output")
        shards = _plan_shards(self.specs, max_shard_bytes)
        if self.single_file and len(shards) > 1:
            raise ValueError(f"{out}: {len(shards)} shards do not fit one .safetensors file;"
                             " give a directory to write a sharded checkpoint")
        self._tmp = f"{self.out}.tmp-{uuid.uuid4().hex[:8]}"
        if not self.single_file:
            os.makedirs(self._tmp)
        names = ([f"{prefix}.safetensors"] if len(shards) == 1 else
                 [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        self._slots: dict[str, tuple[int, int]] = {}  # name -> (fd, absolute offset)
        self._fds: list[int] = []
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        try:
            for fname, shard in zip(names, shards):
                file = self._tmp if self.single_file else os.path.join(self._tmp, fname)
                layout, off = [], 0
                for n in shard:
                    layout.append((n, self.specs[n], off))
                    off += self.specs[n].nbytes
                head = _header_bytes(layout, metadata)
                fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                os.pwrite(fd, len(head).to_bytes(8, "little") + head, 0)
                os.ftruncate(fd, 8 + len(head) + off)
                for n, _, o in layout:
                    self._slots[n] = (fd, 8 + len(head) + o)
                    self.weight_map[n] = fname
                self.files.append(fname)
        except BaseException:
            self.abort()
            raise
        self._written: set[str] = set()
        self._rows: dict[str, int] = {}  # rows of a chunked tensor written so far
        self._closed = False

    #: tensors may arrive in row chunks (``name`` a :class:`mtl.merging.sources.Chunk`: its rows are
    #: written in place; the tensor counts as written once all its rows are)
    accepts_chunks = True

    def __call__(self, name: str, tensor) -> None:
        chunked = hasattr(name, "base")
        base = name.base if chunked else name
        if base not in self._slots:
            raise KeyError(f"{self.out}: tensor {base!r} is not among the {len(self._slots)} planned ones")
        if base in self._written:
            raise ValueError(f"{self.out}: tensor {base!r} was written twice")
        x = np.asarray(tensor)
        spec = self.specs[base]
        start, stop = (name.start, name.stop) if chunked else (0, spec.shape[0] if spec.shape else 1)
        want = (stop - start,) + spec.shape[1:] if chunked else spec.shape
        if tuple(x.shape) != want or x.dtype != spec.dtype:
            raise ValueError(f"{self.out}: tensor {name!r} is {tuple(x.shape)} {x.dtype},"
                             f" planned as {want} {spec.dtype}")
        fd, off = self._slots[base]
        row = spec.nbytes // max(spec.shape[0], 1) if spec.shape else spec.nbytes
        _pwrite_all(fd, np.ascontiguousarray(x).reshape(-1).view(np.uint8), off + start * row)
        rows = self._rows.get(base, 0) + (stop - start)
        if not chunked or rows >= (spec.shape[0] if spec.shape else 1):
            self._rows.pop(base, None)
            self._written.add(base)
        else:
            self._rows[base] = rows

    write = __call__

    def close(self) -> str:
        """Check every planned tensor arrived, then move the files into place; returns ``out``."""
        if self._closed:
            return self.out
        missing = [n for n in self.specs if n not in self._written]
        if missing:
            self.abort()
            raise ValueError(f"{self.out}: {len(missing)} planned tensors were never written"
                             f" (first: {missing[0]!r}); nothing was kept")
        for fd in self._fds:
            if self.fsync:
                os.fsync(fd)
            os.close(fd)
        self._fds = []
        for fname, text in self.extra_files.items():
            with open(os.path.join(self._tmp, fname), "w") as f:
                f.write(text)
        if not self.single_file and len(self.files) > 1:
            total = sum(s.nbytes for s in self.specs.values())
            with open(os.path.join(self._tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": self.weight_map}, f, indent=2)
        _replace(self._tmp, self.out)
        self._closed = True
        return self.out

    def abort(self) -> None:
        """Remove everything written so far (the final ``out`` is never touched)."""
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        if os.path.isdir(self._tmp):
            shutil.rmtree(self._tmp, ignore_errors=True)
        elif os.path.exists(self._tmp):
            os.remove(self._tmp)
        self._closed = True


def _replace(tmp: str, out: str) -> None:
    """Move ``tmp`` to ``out``, replacing an existing ``out`` only once ``tmp`` is complete."""
    if os.path.isdir(out) and not os.path.islink(out):
        old = f"{out}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _as_spec(s) -> TensorSpec:
    if isinstance(s, TensorSpec):
        return s
    if isinstance(s, tuple) and len(s) == 2 and not hasattr(s, "shape"):
        return TensorSpec(tuple(int(d) for d in s[0]), np.dtype(s[1]))
    return TensorSpec(tuple(np.shape(s)), np.dtype(s.dtype))


def save_safetensors(out: str, tensors: Mapping, *, max_shard_bytes: int | None = None,
                     metadata: Mapping | None = None, overwrite: bool = False) -> str:
    """Write an in-memory ``{name: array}`` (one file, or shards + index for a directory)."""
    arrays = {n: np.asarray(t) for n, t in tensors.items()}
    with SafetensorsWriter(out, arrays, max_shard_bytes=max_shard_bytes, metadata=metadata,
                           overwrite=overwrite) as w:
        for n, a in arrays.items():
            w(n, a)
    return w.out


def load_safetensors(path: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """``{name: array}`` of a file or sharded directory (all tensors, or ``names``)."""
    src = SafetensorsSource(path)
    try:
        return {n: src.load(n) for n in (src.paths() if names is None else names)}
    finally:
        src.close()
