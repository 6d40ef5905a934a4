"""Byte-level language-modelling corpora: fixed-length windows of raw bytes.

``python_stdlib``: a real code corpus available offline, the Python standard library's
own source files (``sysconfig.get_paths()["stdlib"]``, ``site-packages``/``dist-packages``
excluded; any other directory through ``root=``). The split is **by file** and
deterministic: a file's split is fixed by the SHA-256 of its path relative to the root
(``u = first 8 hex digits / 16^8``; ``u < val_fraction`` -> validation, ``u <
val_fraction + test_fraction`` -> test, else train), so it does not depend on the file
system's listing order, on which other files exist, or on a seed. Each split's files are
concatenated in hash order (a deterministic pseudo-random order, so a byte budget
``max_*_bytes`` takes an unbiased sample of whole files rather than the first
directories) and cut into windows: window ``i`` has inputs ``s[iL : iL+L]`` and labels
``s[iL+1 : iL+L+1]`` (every byte after the first is predicted exactly once).

``tfds_text``: the same windows over the text feature of a tensorflow-datasets text
corpus (for full-scale corpora prepared in array_record format), read through
:func:`mtl.data.tfds_source.open_data_source`.

Both give one task of kind ``language_model`` (256-way next-byte prediction, bits per
byte reported).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from typing import Iterable, Sequence

import numpy as np

from mtl.data.base import DataBundle, TaskInfo

VOCAB = 256


class WindowSource:
    """Random-access next-byte windows over one byte stream (labels = inputs shifted by one)."""

    def __init__(self, stream: np.ndarray, seq_len: int, task: str):
        self.stream = np.asarray(stream, np.uint8)
        self.seq_len, self.task = int(seq_len), task
        self.n = max((self.stream.size - 1) // self.seq_len, 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx) -> dict:
        idx = np.asarray(idx, np.int64)
        if idx.size and (idx.min() < -self.n or idx.max() >= self.n):
            raise IndexError(f"window index out of range for {self.n} windows")
        idx = np.where(idx < 0, idx + self.n, idx)
        starts = idx[..., None] * self.seq_len + np.arange(self.seq_len + 1)
        w = self.stream[starts]
        return {"inputs": w[..., :-1].astype(np.int32), "labels": {self.task: w[..., 1:].astype(np.int32)},
                "masks": {self.task: np.ones(idx.shape, bool)}}


def path_unit(relpath: str) -> float:
    """The file's position in [0, 1) from the SHA-256 of its relative path (POSIX separators)."""
    return int(hashlib.sha256(relpath.replace(os.sep, "/").encode()).hexdigest()[:8], 16) / 16 ** 8


def split_of(relpath: str, val_fraction: float, test_fraction: float) -> str:
    u = path_unit(relpath)
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def corpus_files(root: str, suffixes: Sequence[str] = (".py",),
                 exclude_dirs: Sequence[str] = ("site-packages", "dist-packages", "__pycache__")) -> list[str]:
    """Relative paths of the files under ``root`` ending in one of ``suffixes`` (sorted)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"corpus directory {root!r} does not exist; pass root= a directory of text files")
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in exclude_dirs)
        out += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(tuple(suffixes))]
    if not out:
        raise ValueError(f"corpus directory {root!r} holds no files ending in {tuple(suffixes)}")
    return sorted(out)


def _concat(chunks: Iterable[bytes], max_bytes: int) -> tuple[np.ndarray, int]:
    parts, total, count = [], 0, 0
    for c in chunks:
        if max_bytes and total >= max_bytes:
            break
        parts.append(c)
        total += len(c)
        count += 1
    stream = np.frombuffer(b"".join(parts), np.uint8)
    return (stream[:max_bytes] if max_bytes else stream), count


def _check(seq_len, val_fraction, test_fraction):
    if int(seq_len) < 1:
        raise ValueError(f"seq_len must be >= 1; got {seq_len}")
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be > 0 with a sum < 1 (the rest is train); "
                         f"got {val_fraction}, {test_fraction}")


def _bundle(name, streams: dict, seq_len: int, task: str, meta: dict) -> DataBundle:
    srcs = {}
    for split, stream in streams.items():
        srcs[split] = WindowSource(stream, seq_len, task)
        if len(srcs[split]) == 0:
            raise ValueError(f"{name}: the {split} split has {stream.size} bytes, fewer than one window of "
                             f"{seq_len} + 1; lower seq_len or raise the split's byte budget / fraction")
    meta = dict(meta, bytes={k: int(v.size) for k, v in streams.items()},
                windows={k: len(v) for k, v in srcs.items()})
    return DataBundle(name=name, tasks=[TaskInfo(task, "language_model", VOCAB)], train=srcs["train"],
                      val=srcs["val"], test=srcs["test"], input_shape=(int(seq_len),), input_dtype="int32",
                      meta=meta)


def python_stdlib(seq_len: int = 128, *, root: str | None = None, val_fraction: float = 0.05,
                  test_fraction: float = 0.05, max_train_bytes: int = 0, max_eval_bytes: int = 0,
                  suffixes: Sequence[str] = (".py",), task: str = "next_byte") -> DataBundle:
    """Next-byte windows over the files under ``root`` (default: the standard library's
    source). ``max_train_bytes`` / ``max_eval_bytes`` (0 = all) cap each split's stream
    (whole files in hash order, the last one cut)."""
    _check(seq_len, val_fraction, test_fraction)
    root = os.path.abspath(root or sysconfig.get_paths()["stdlib"])
    files = corpus_files(root, suffixes)
    by_split = {"train": [], "val": [], "test": []}
    for f in sorted(files, key=path_unit):
        by_split[split_of(f, val_fraction, test_fraction)].append(f)

    def read(paths):
        for p in paths:
            with open(os.path.join(root, p), "rb") as fh:
                yield fh.read()

    streams, used = {}, {}
    for split, paths in by_split.items():
        cap = int(max_train_bytes if split == "train" else max_eval_bytes)
        streams[split], used[split] = _concat(read(paths), cap)
    meta = {"root": root, "files": {k: len(v) for k, v in by_split.items()}, "files_used": used,
            "split": "sha256(relative path) -> [0,1): val < val_fraction <= test < val+test fractions <= train"}
    return _bundle("python_stdlib", streams, seq_len, task, meta)


def tfds_text(name: str, seq_len: int = 128, *, text_key: str = "text",
              splits: Sequence[str] = ("train", "validation", "test"), max_train_bytes: int = 0,
              max_eval_bytes: int = 0, data_dir: str | None = None, task: str = "next_byte") -> DataBundle:
    """Next-byte windows over the ``text_key`` feature of tfds dataset ``name`` (records
    joined by a newline, in record order); ``splits`` names its train / validation / test splits."""
    from mtl.data.tfds_source import open_data_source

    if len(splits) != 3:
        raise ValueError(f"splits must name the (train, validation, test) splits; got {tuple(splits)}")
    if int(seq_len) < 1:
        raise ValueError(f"seq_len must be >= 1; got {seq_len}")

    def records(src):
        for i in range(len(src)):
            rec = src[i]
            if text_key not in rec:
                raise KeyError(f"tfds dataset {name!r} has no feature {text_key!r}; it has {sorted(rec)}")
            t = rec[text_key]
            yield (t.encode("utf-8") if isinstance(t, str) else bytes(t)) + b"\n"

    streams = {}
    for split, tf_split in zip(("train", "val", "test"), splits):
        cap = int(max_train_bytes if split == "train" else max_eval_bytes)
        streams[split], _ = _concat(records(open_data_source(name, tf_split, data_dir=data_dir)), cap)
    return _bundle(f"tfds_text:{name}", streams, seq_len, task, {"tfds": name, "splits": list(splits)})
