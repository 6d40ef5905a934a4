"""Checkpoints and shareable artifacts (the only module that imports orbax).

* ``CheckpointStore``: periodic, asynchronous training checkpoints of the whole train
  state plus a small JSON ``meta`` dict, restorable onto any mesh (the abstract target
  carries the new shardings).
* ``export_artifact`` / ``load_artifact``: parameters as a plain nested dict plus
  ``metadata.json`` (config, tasks, library version, parameter shapes) that another
  user loads into the same model definition with one call.

Before anything is restored, the stored tree is compared with the expected one and a
mismatch raises ``CheckpointMismatchError`` naming the first differing path and shapes.

Integrity (``mtl.integrity``): once a step's asynchronous save has completed, every file
of it gets its size and SHA-256 in ``<step>/mtl_digests.json``; artifacts carry the same
record for ``params/`` in ``metadata.json``. ``restore`` verifies first and raises
``CheckpointCorruptError`` naming the step and the file; ``restore_latest`` falls back to
the newest step that verifies and renames each bad step aside into ``<directory>.corrupt/``.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from mtl import integrity

ARTIFACT_FORMAT = "mtl-artifact/1"


class CheckpointMismatchError(ValueError):
    """A checkpoint or artifact does not match the model it is loaded into."""


class CheckpointCorruptError(integrity.IntegrityError):
    """A checkpoint's files fail their digests or cannot be read (names the step and file)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


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


# the JSON files orbax writes into a step (checked by name when a step has no manifest)
_JSON_FILES = ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA", "state/_sharding",
               "state/array_metadatas/process_0")


class CheckpointStore:
    """Training checkpoints under one directory: ``save(step, state, meta)`` (async) and
    ``restore(step, abstract_state)``. Incomplete (interrupted) saves are never listed.

    A step's digest manifest is written once its save has completed: by the next
    ``save``, ``wait`` or ``close``."""

    def __init__(self, directory: str, max_to_keep: int | None = 2, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                            enable_async_checkpointing=asynchronous)
        self._mgr = ocp.CheckpointManager(
            self.directory, options=opts,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        self._pending: list[int] = []

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def save(self, step: int, state, meta: Mapping | None = None, force: bool = True) -> None:
        self.wait()  # orbax would wait for the previous save anyway; digest it first
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(dict(meta or {})))
        self._mgr.save(int(step), args=args, force=force)
        self._pending.append(int(step))

    def _write_pending_digests(self) -> None:
        pending, self._pending = self._pending, []
        if jax.process_index() != 0:
            return
        for step in pending:
            d = self.step_dir(step)
            if os.path.isdir(d):  # (max_to_keep may already have removed it)
                integrity.write_manifest(d)

    def verify(self, step: int) -> int | None:
        """Check ``step``'s files against its manifest: the number of files checked, or None
        when the step has no manifest. Raises ``CheckpointCorruptError`` naming the file."""
        what = f"checkpoint {self.directory} step {step}"
        d = self.step_dir(step)
        try:
            m = integrity.read_manifest(d, what)
            if m is None:  # no digests: at least the JSON files must parse (and be named if not)
                integrity.check_json_files(d, _JSON_FILES, what)
                return None
            return integrity.verify_files(d, m["files"], what)
        except integrity.IntegrityError as e:
            raise CheckpointCorruptError(str(e)) from None

    def check(self, step: int, abstract_state, what: str = "checkpoint") -> None:
        try:
            md = self._mgr.item_metadata(int(step))
        except Exception as e:  # noqa: BLE001 - orbax raises bare Exceptions for unreadable files
            raise CheckpointCorruptError(f"{what} {self.directory} step {step}: its metadata cannot be read "
                                         f"({_first_line(e)})") from None
        if md is None or md.get("state") is None:
            raise CheckpointMismatchError(f"{self.directory} step {step} is not an mtl checkpoint (no 'state' item)")
        found = _metadata_shapes(md["state"])
        compare_trees(flat_shapes(abstract_state), found, what=f"{what} {self.directory} step {step}")

    def restore(self, step: int, abstract_state):
        """Verify, then restore onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs)."""
        self.wait()
        self.verify(step)
        self.check(step, abstract_state)
        try:
            res = self._mgr.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - e.g. a truncated file: orbax raises a bare Exception
            raise CheckpointCorruptError(f"checkpoint {self.directory} step {step} cannot be read "
                                         f"({_first_line(e)})") from None
        return res["state"], dict(res["meta"] or {})

    def quarantine(self, step: int) -> str:
        """Move a bad step out of the store (renamed, never deleted); returns where it went."""
        self.wait()
        dest_root = self.directory + ".corrupt"
        dest = os.path.join(dest_root, str(int(step)))
        if jax.process_index() == 0:
            os.makedirs(dest_root, exist_ok=True)
            k = 1
            while os.path.exists(dest):
                dest, k = os.path.join(dest_root, f"{int(step)}-{k}"), k + 1
            os.replace(self.step_dir(step), dest)
        self._mgr.reload()
        return dest

    def restore_latest(self, abstract_state, log=print):
        """``(step, state, meta)`` of the newest step that verifies and restores, or None when
        the store is empty. Each bad step on the way is renamed aside, said in one line.
        A step of another model (``CheckpointMismatchError``) is not corruption: it raises."""
        bad = []  # (step, message, where it went)
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, abstract_state)
            except CheckpointCorruptError as e:
                bad.append((step, str(e), self.quarantine(step)))
                continue
            for i, (_, msg, dest) in enumerate(bad):  # one line per bad step, the last says where it fell back
                tail = f"; fell back to checkpoint step {step}" if i == len(bad) - 1 else ""
                log(f"[mtl] {msg}; moved it to {dest}{tail}")
            return int(step), state, meta
        if bad:
            for _, msg, dest in bad:
                log(f"[mtl] {msg}; moved it to {dest}")
            raise CheckpointCorruptError(
                f"no checkpoint in {self.directory} verifies (steps {', '.join(str(b[0]) for b in bad)} moved to "
                f"{self.directory}.corrupt); run the same command again to start from step 0, "
                "or restore a copy of the checkpoints")
        return None

    def delete(self, step: int) -> None:
        self._mgr.delete(int(step))

    def wait(self) -> None:
        self._mgr.wait_until_finished()
        self._write_pending_digests()

    def close(self) -> None:
        self.wait()
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
    meta["digests"] = {"algorithm": integrity.ALGORITHM,
                       "files": integrity.digest_files(os.path.join(path, "params"), skip=())}
    integrity.atomic_write_text(os.path.join(path, "metadata.json"),
                                json.dumps(meta, indent=2, sort_keys=True, default=str))
    return path


def verify_artifact(path: str, meta: Mapping | None = None) -> int | None:
    """Check an artifact's ``params/`` files against the digests in its metadata: the number
    of files checked, or None for an artifact written before digests. Raises
    ``CheckpointCorruptError`` naming the file."""
    meta = read_artifact_metadata(path) if meta is None else meta
    rec = meta.get("digests")
    if not rec:
        return None
    if rec.get("algorithm") != integrity.ALGORITHM:
        raise CheckpointCorruptError(f"artifact {path}: unknown digest algorithm {rec.get('algorithm')!r}")
    try:
        return integrity.verify_files(os.path.join(path, "params"), rec["files"], f"artifact {path}")
    except integrity.IntegrityError as e:
        raise CheckpointCorruptError(str(e)) from None


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
    verify_artifact(path, meta)
    stored = {p: (tuple(v["shape"]), v["dtype"]) for p, v in meta["params"].items()}
    ckpt = ocp.StandardCheckpointer()
    if expected is not None:
        compare_trees(flat_shapes(expected), stored, what=f"artifact {path}")
        target = abstract_like(expected, shardings)
    else:
        target = None
    try:
        params = ckpt.restore(os.path.join(path, "params"), target)
    except Exception as e:  # noqa: BLE001 - orbax raises bare Exceptions for unreadable files
        raise CheckpointCorruptError(f"artifact {path}: params/ cannot be read ({_first_line(e)})") from None
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
