"""Checkpoint formats: safetensors (single or sharded), orbax pytrees, mtl artifacts, Hugging Face layouts.

    src = mtl.io.open_source("ft_cars/")            # any format; paths()/load()/spec()
    with mtl.io.open_writer("merged/", mtl.io.specs_of(src)) as sink:   # writer by name/format
        for p in src.paths():
            sink(p, src.load(p))

Every reader is a merge source (:mod:`mtl.merging.sources`) and every writer a
sink for :func:`mtl.merging.merge_stream`, so any mix of formats can be merged
and written (:mod:`mtl.merging.files`).  :mod:`mtl.io.hf` maps Hugging Face
ViT / CLIP-vision / GPT-2 names onto the mtl encoders and back.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from mtl.io.artifacts import ArtifactSource, OrbaxSource, TreeWriter, is_artifact, is_orbax
from mtl.io.prefetch import PrefetchSource, prefetch_all
from mtl.io.safetensors import (SafetensorsError, SafetensorsSource, SafetensorsWriter, TensorSpec,
                                is_safetensors, load_safetensors, save_safetensors, specs_of)

__all__ = ["open_source", "open_writer", "convert", "detect_format", "FORMATS", "SafetensorsSource",
           "SafetensorsWriter", "SafetensorsError", "OrbaxSource", "ArtifactSource", "TreeWriter",
           "TensorSpec", "specs_of", "load_safetensors", "save_safetensors", "PrefetchSource", "prefetch_all"]

FORMATS = ("safetensors", "orbax", "artifact")


def detect_format(path: str) -> str:
    """``safetensors`` | ``artifact`` | ``orbax`` for an existing checkpoint path."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if is_artifact(path):
        return "artifact"
    if is_orbax(path):
        return "orbax"
    if is_safetensors(path):
        return "safetensors"
    raise ValueError(f"{path}: unknown checkpoint format; expected a .safetensors file, a directory of"
                     " safetensors shards with *.safetensors.index.json, an mtl artifact (metadata.json +"
                     " params/) or an orbax checkpoint directory (_METADATA)")


def open_source(path: str, format: str | None = None):
    """A lazy merge source over the checkpoint at ``path`` (format detected unless given)."""
    fmt = format or detect_format(path)
    if fmt == "safetensors":
        return SafetensorsSource(path)
    if fmt == "artifact":
        return ArtifactSource(path)
    if fmt == "orbax":
        return OrbaxSource(path)
    raise ValueError(f"unknown checkpoint format {fmt!r}; valid: {', '.join(FORMATS)}")


def output_format(out: str, format: str | None = None) -> str:
    """``format`` or, from the name: ``*.mtl`` an artifact, anything else safetensors."""
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"unknown output format {format!r}; valid: {', '.join(FORMATS)}")
        return format
    return "artifact" if out.rstrip("/").endswith(".mtl") else "safetensors"


def open_writer(out: str, specs: Mapping, format: str | None = None, *, max_shard_bytes: int | None = None,
                metadata: Mapping | None = None, overwrite: bool = False):
    """A sink writer for tensors of ``specs``; ``close()`` (or leaving ``with``) finishes it.

    safetensors: shard by shard to disk as tensors arrive (``metadata`` is the
    file's ``__metadata__``); artifact/orbax: kept in memory, written on close
    (``metadata`` is the artifact's metadata).
    """
    fmt = output_format(out, format)
    if fmt == "safetensors":
        return SafetensorsWriter(out, specs, max_shard_bytes=max_shard_bytes, metadata=metadata,
                                 overwrite=overwrite)
    if max_shard_bytes:
        raise ValueError(f"max_shard_bytes applies to safetensors output, not {fmt}")
    return TreeWriter(out, fmt, specs=specs, metadata=metadata, overwrite=overwrite)


def convert(src: str, out: str, format: str | None = None, *, max_shard_bytes: int | None = None,
            metadata: Mapping | None = None, overwrite: bool = False) -> str:
    """Copy every tensor of the checkpoint ``src`` into ``out`` (any format to any format), one at a time."""
    source = open_source(src)
    if metadata is None and isinstance(source, ArtifactSource) and output_format(out, format) == "artifact":
        metadata = source.meta
    with open_writer(out, specs_of(source), format, max_shard_bytes=max_shard_bytes, metadata=metadata,
                     overwrite=overwrite) as w:
        for p in source.paths():
            w(p, source.load(p))
    return w.out
