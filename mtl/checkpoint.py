"""Checkpoints and shareable artifacts (the only module that imports orbax).

* ``CheckpointStore``: periodic, asynchronous training checkpoints of the whole train
  state plus a small JSON ``meta`` dict, restorable onto any mesh (the abstract target
  carries the new shardings).
* ``export_artifact`` / ``load_artifact``: parameters as a plain nested dict plus
  ``metadata.json`` (config, tasks, library version, parameter shapes) that another
  user loads into the same model definition with one call.

Before anything is restored, the stored tree is compared with the expected one and a
mismatch raises ``CheckpointMismatchError`` naming the first differing path and shapes.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

ARTIFACT_FORMAT = "mtl-artifact/1"


class CheckpointMismatchError(ValueError):
    """A checkpoint or artifact does not match the model it is loaded into."""


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """``a/b/c`` for a pytree key path (the ``value`` slot of nnx Variables is left out)."""
    keys = [_key_str(k) for k in path]
    if len(keys) > 1 and keys[-1] == "value":
        keys = keys[:-1]
    return "/".join(keys)


def flat_shapes(tree) -> dict:
    """``{"a/b/c": (shape, dtype)}`` for every array-like leaf of a pytree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if leaf is None:
            continue
        out[path_str(path)] = (tuple(np.shape(leaf)), np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype)).name)
    return out


def compare_trees(expected: Mapping, found: Mapping, what: str = "checkpoint") -> None:
    """Raise ``CheckpointMismatchError`` naming the first path whose presence, shape or dtype differ.

    Both arguments are ``flat_shapes`` dicts.
    """
    for p in sorted(set(expected) | set(found)):
        if p not in found:
            raise CheckpointMismatchError(
                f"{what} does not match the model: parameter {p!r} (shape {expected[p][0]}) is missing from the {what}")
        if p not in expected:
            raise CheckpointMismatchError(
                f"{what} does not match the model: the {what} has parameter {p!r} (shape {found[p][0]}) "
                "that the model does not have")
        (es, ed), (fs, fd) = expected[p], found[p]
        if es != fs:
            raise CheckpointMismatchError(
                f"{what} does not match the model: parameter {p!r} has shape {fs} in the {what} "
                f"but {es} in the model")
        if ed != fd:
            raise CheckpointMismatchError(
                f"{what} does not match the model: parameter {p!r} has dtype {fd} in the {what} "
                f"but {ed} in the model")


def _metadata_shapes(tree_metadata) -> dict:
    tree = getattr(tree_metadata, "tree", tree_metadata)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if leaf is None or not hasattr(leaf, "shape"):
            continue
        out[path_str(path)] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
    return out


class CheckpointStore:
    """Training checkpoints under one directory: ``save(step, state, meta)`` (async) and
    ``restore(step, abstract_state)``. Incomplete (interrupted) saves are never listed."""

    def __init__(self, directory: str, max_to_keep: int | None = 2, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                            enable_async_checkpointing=asynchronous)
        self._mgr = ocp.CheckpointManager(
            self.directory, options=opts,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, state, meta: Mapping | None = None, force: bool = True) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(dict(meta or {})))
        self._mgr.save(int(step), args=args, force=force)

    def check(self, step: int, abstract_state, what: str = "checkpoint") -> None:
        md = self._mgr.item_metadata(int(step))
        if md is None or md.get("state") is None:
            raise CheckpointMismatchError(f"{self.directory} step {step} is not an mtl checkpoint (no 'state' item)")
        found = _metadata_shapes(md["state"])
        compare_trees(flat_shapes(abstract_state), found, what=f"{what} {self.directory} step {step}")

    def restore(self, step: int, abstract_state):
        """Restore onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs)."""
        self.check(step, abstract_state)
        res = self._mgr.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return res["state"], dict(res["meta"] or {})

    def delete(self, step: int) -> None:
        self._mgr.delete(int(step))

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs for ``tree`` (optionally with the given sharding tree)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                           sharding=getattr(x, "sharding", None)), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------- artifacts

def export_artifact(path: str, params: Mapping, metadata: Mapping, overwrite: bool = False) -> str:
    """Write ``params`` (a nested dict of arrays) and ``metadata`` to ``path``.

    The artifact is a directory: ``params/`` (orbax) and ``metadata.json``.
    """
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        if not os.path.isfile(os.path.join(path, "metadata.json")):
            raise FileExistsError(f"{path} exists and is not an mtl artifact; refusing to overwrite it")
        shutil.rmtree(path)
    os.makedirs(path)
    meta = dict(metadata)
    meta["format"] = ARTIFACT_FORMAT
    meta["params"] = {p: {"shape": list(s), "dtype": d} for p, (s, d) in flat_shapes(params).items()}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, "params"), jax.tree.map(np.asarray, dict(params)))
    ckpt.wait_until_finished()
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=str)
    return path


def read_artifact_metadata(path: str) -> dict:
    mfile = os.path.join(path, "metadata.json")
    if not os.path.isfile(mfile):
        raise FileNotFoundError(f"{path} is not an mtl artifact (no metadata.json); "
                                "write one with `mtl export` or mtl.checkpoint.export_artifact")
    try:
        with open(mfile) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{mfile} is corrupt: {e}") from None
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path}: unknown artifact format {meta.get('format')!r}; expected {ARTIFACT_FORMAT!r}")
    return meta


def load_artifact_params(path: str, expected: Mapping | None = None, shardings=None) -> tuple[dict, dict]:
    """Read an artifact's parameters (nested dict) and metadata.

    With ``expected`` (a nested dict of arrays or ShapeDtypeStructs, e.g. a model's
    params), the stored tree is checked first and mismatches name the first bad path.
    """
    path = os.path.abspath(path)
    meta = read_artifact_metadata(path)
    stored = {p: (tuple(v["shape"]), v["dtype"]) for p, v in meta["params"].items()}
    ckpt = ocp.StandardCheckpointer()
    if expected is not None:
        compare_trees(flat_shapes(expected), stored, what=f"artifact {path}")
        target = abstract_like(expected, shardings)
        params = ckpt.restore(os.path.join(path, "params"), target)
    else:
        params = ckpt.restore(os.path.join(path, "params"))
    return params, meta


# ----------------------------------------------------------------------------- leaf-wise access (mtl.io)

def _orbax_leaf_paths(path: str) -> dict:
    """``{"a/b/c": (key tuple, shape, dtype name)}`` of a pytree checkpoint, from its metadata only."""
    md = ocp.StandardCheckpointer().metadata(os.path.abspath(path))
    tree = getattr(getattr(md, "item_metadata", md), "tree", getattr(md, "item_metadata", md))
    out = {}
    for kpath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if leaf is None or not hasattr(leaf, "shape"):
            continue
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in kpath)
        out[path_str(kpath)] = (keys, tuple(leaf.shape), np.dtype(leaf.dtype).name)
    return out


def orbax_tree_specs(path: str) -> dict:
    """``{"a/b/c": (shape, dtype name)}`` of an orbax pytree checkpoint (e.g. an artifact's ``params/``)."""
    return {p: (s, d) for p, (_, s, d) in _orbax_leaf_paths(path).items()}


def restore_orbax_leaves(path: str, paths, leaf_paths: dict | None = None) -> dict:
    """Restore only ``paths`` (``"a/b/c"`` strings) of an orbax pytree checkpoint, as numpy arrays."""
    leaf_paths = _orbax_leaf_paths(path) if leaf_paths is None else leaf_paths
    item, restore_args = {}, {}
    for p in paths:
        if p not in leaf_paths:
            raise KeyError(f"orbax checkpoint {path} has no parameter {p!r}")
        keys, shape, dtype = leaf_paths[p]
        node, args = item, restore_args
        for k in keys[:-1]:
            node, args = node.setdefault(k, {}), args.setdefault(k, {})
        node[keys[-1]] = np.zeros((), dtype)
        args[keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
    res = ocp.PyTreeCheckpointer().restore(os.path.abspath(path), args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    out = {}
    for p in paths:
        node = res
        for k in leaf_paths[p][0]:
            node = node[k]
        out[p] = np.asarray(node)
    return out


def save_orbax_tree(path: str, tree: Mapping, overwrite: bool = False) -> str:
    """Write a nested dict of arrays as an orbax pytree checkpoint (``StandardCheckpointer``)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    tmp = f"{path}.tmp-{os.getpid()}"
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp, jax.tree.map(np.asarray, dict(tree)), force=True)
    ckpt.wait_until_finished()
    if os.path.exists(path):  # replaced only once the new checkpoint is complete
        shutil.rmtree(path)
    os.rename(tmp, path)
    return path
