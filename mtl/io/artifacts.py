"""Orbax pytree checkpoints and mtl artifacts as merge sources and writers.

* :class:`OrbaxSource`: any orbax pytree checkpoint directory (what
  ``ocp.StandardCheckpointer`` writes, e.g. an artifact's ``params/`` or a
  training checkpoint's ``<step>/state``); ``spec`` comes from the orbax
  metadata, ``load(path)`` restores that one leaf (orbax partial restore).
* :class:`ArtifactSource`: an mtl artifact (``params/`` + ``metadata.json``,
  :mod:`mtl.artifact`); ``meta`` is its metadata.
* :class:`TreeWriter`: a sink that keeps the tensors and writes an orbax
  checkpoint or an artifact on :meth:`~TreeWriter.close`.  Orbax writes a
  whole tree at once, so this writer holds the result in memory; write
  safetensors for out-of-core merges.

Paths are the ``a/b/c`` strings of :mod:`mtl.merging.tree`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from mtl import checkpoint as ckpt
from mtl.io.safetensors import CommitOnExit, TensorSpec

__all__ = ["OrbaxSource", "ArtifactSource", "TreeWriter", "is_artifact", "is_orbax"]


def is_artifact(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "metadata.json")) \
        and os.path.isdir(os.path.join(path, "params"))


def _pytree_dir(path: str) -> str | None:
    """``path`` if it is an orbax pytree, its ``state`` item for a training-checkpoint step, else None."""
    for d in (path, os.path.join(path, "state")):
        if os.path.isfile(os.path.join(d, "_METADATA")):
            return d
    return None


def is_orbax(path: str) -> bool:
    return os.path.isdir(path) and _pytree_dir(path) is not None


class OrbaxSource:
    """A lazy merge source over an orbax pytree checkpoint directory.

    ``path``: the directory ``StandardCheckpointer`` wrote, or a step of
    :class:`mtl.checkpoint.CheckpointStore` (its ``state`` item is read).
    ``root``: only the subtree under this path, with it stripped (e.g.
    ``root="params"`` for a training state, so paths match an artifact's).
    """

    def __init__(self, path: str, root: str | None = None):
        self.path = os.path.abspath(path)
        tree = _pytree_dir(self.path)
        if tree is None:
            raise FileNotFoundError(f"{path} is not an orbax checkpoint (no _METADATA, nor state/_METADATA);"
                                    " give the directory StandardCheckpointer wrote or a CheckpointStore step")
        self._tree = tree
        leaves = ckpt._orbax_leaf_paths(tree)
        if root:
            pre = root.rstrip("/") + "/"
            leaves = {p[len(pre):]: v for p, v in leaves.items() if p.startswith(pre)}
            if not leaves:
                raise KeyError(f"orbax checkpoint {path} has nothing under {root!r}")
        self._leaves = leaves

    def paths(self) -> list[str]:
        return list(self._leaves)

    def spec(self, path: str) -> TensorSpec:
        if path not in self._leaves:
            raise KeyError(f"orbax checkpoint {self.path} has no parameter {path!r}")
        _, shape, dtype = self._leaves[path]
        return TensorSpec(shape, np.dtype(dtype))

    def load(self, path: str) -> np.ndarray:
        if path not in self._leaves:
            raise KeyError(f"orbax checkpoint {self.path} has no parameter {path!r}")
        entry = self._leaves[path]
        full = "/".join(str(k) for k in entry[0])
        return ckpt.restore_orbax_leaves(self._tree, [full], {full: entry})[full]

    def __repr__(self):
        return f"OrbaxSource({self.path!r}, {len(self._leaves)} tensors)"


class ArtifactSource(OrbaxSource):
    """An mtl artifact as a merge source; ``meta`` holds its metadata (config, tasks, ...)."""

    def __init__(self, path: str):
        self.meta = ckpt.read_artifact_metadata(path)
        super().__init__(os.path.join(path, "params"))
        self.path = os.path.abspath(path)
        stored = {p: (tuple(v["shape"]), v["dtype"]) for p, v in self.meta["params"].items()}
        ckpt.compare_trees(stored, {p: (s, d) for p, (_, s, d) in self._leaves.items()},
                           what=f"artifact {path} (params/ against metadata.json)")

    def __repr__(self):
        return f"ArtifactSource({self.path!r}, {len(self._leaves)} tensors)"


def _nest(flat: Mapping[str, np.ndarray]) -> dict:
    out: dict = {}
    for p, x in flat.items():
        node = out
        *head, last = p.split("/")
        for k in head:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {p!r} runs through a tensor")
        node[last] = x
    return out


class TreeWriter(CommitOnExit):
    """Collect ``(path, tensor)`` from a sink and write them as orbax or an artifact on close.

    ``kind``: ``"orbax"`` (a pytree checkpoint directory) or ``"artifact"``
    (``metadata`` is the artifact's metadata, e.g. the pretrained artifact's
    with a ``merge`` entry added; ``format``/``params`` are filled in).
    ``specs`` (optional) are checked on arrival and on close.
    """

    def __init__(self, out: str, kind: str = "artifact", *, specs: Mapping | None = None,
                 metadata: Mapping | None = None, overwrite: bool = False):
        if kind not in ("orbax", "artifact"):
            raise ValueError(f"TreeWriter kind must be 'orbax' or 'artifact'; got {kind!r}")
        self.out, self.kind, self.metadata = os.path.abspath(out), kind, dict(metadata or {})
        if os.path.exists(self.out) and not overwrite:
            raise FileExistsError(f"{self.out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        self.overwrite = overwrite
        self.specs = None if specs is None else {p: (tuple(s.shape), np.dtype(s.dtype)) for p, s in specs.items()}
        self._tensors: dict[str, np.ndarray] = {}

    def __call__(self, path: str, tensor) -> None:
        x = np.asarray(tensor)
        if self.specs is not None:
            if path not in self.specs:
                raise KeyError(f"{self.out}: tensor {path!r} is not among the planned ones")
            if (tuple(x.shape), x.dtype) != self.specs[path]:
                raise ValueError(f"{self.out}: tensor {path!r} is {tuple(x.shape)} {x.dtype},"
                                 f" planned as {self.specs[path][0]} {self.specs[path][1]}")
        if path in self._tensors:
            raise ValueError(f"{self.out}: tensor {path!r} was written twice")
        self._tensors[path] = x

    write = __call__

    def close(self) -> str:
        if self.specs is not None:
            missing = [p for p in self.specs if p not in self._tensors]
            if missing:
                raise ValueError(f"{self.out}: {len(missing)} planned tensors were never written"
                                 f" (first: {missing[0]!r}); nothing was written")
        tree = _nest(self._tensors)
        if self.kind == "orbax":
            return ckpt.save_orbax_tree(self.out, tree, overwrite=self.overwrite)
        meta = {k: v for k, v in self.metadata.items() if k not in ("format", "params")}
        return ckpt.export_artifact(self.out, tree, meta, overwrite=self.overwrite)

    def abort(self) -> None:
        self._tensors.clear()
