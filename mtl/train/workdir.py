"""The run directory: is it this run, another one, or new? Validation before any write.

Rule: nothing in a workdir changes until everything that can refuse the command has been
checked (config values, data sizes, batch vs mesh divisibility, the workdir's own config,
the checkpoint's tree against the model). ``inspect_workdir`` only reads; the files are
then written atomically (``mtl.integrity``), so a refused or killed command leaves the
workdir as it found it.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import jax

from mtl import config as config_lib
from mtl import integrity


class WorkdirConflictError(RuntimeError):
    """The workdir already holds a run with another config."""


def _with_new_defaults(old: dict) -> dict:
    """A stored config.json with keys added to ``base_config`` since it was written filled
    in with their defaults (unchanged if it no longer validates)."""
    import ml_collections

    try:
        return config_lib.to_json(config_lib.with_defaults(ml_collections.ConfigDict(old)))
    except Exception:  # noqa: BLE001 - an old or foreign config: compare it as stored
        return old


def inspect_workdir(workdir: str, cfg_json: dict, overwrite: bool, resume: bool) -> str:
    """What to do with ``workdir`` (reads only): ``"new"``, ``"same"`` (resume it),
    ``"changed"`` (resume with a changed config, ``resume=True``) or ``"overwrite"``.
    Raises ``WorkdirConflictError`` for another run without either flag."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return "new"
    with open(path) as f:
        try:
            old = json.load(f)
        except json.JSONDecodeError:
            old = None
    if old is not None and old != cfg_json:
        old = _with_new_defaults(old)  # a key added since that run, at its default, is no change
    if old == cfg_json:
        return "same"
    if overwrite:
        return "overwrite"
    if resume:
        return "changed"
    changes = config_lib.diff(old or {}, cfg_json) if old is not None else ["(unreadable config.json)"]
    raise WorkdirConflictError(
        f"{workdir} holds another run (config differs: {'; '.join(changes[:6])}"
        f"{' ...' if len(changes) > 6 else ''}). Nothing was changed. Use --resume to continue it "
        "with this config, --overwrite to delete it and start again, or another --workdir.")


def clear_workdir(workdir: str) -> None:
    if jax.process_index() == 0 and os.path.isdir(workdir):
        shutil.rmtree(workdir)


def write_config(workdir: str, cfg_json: dict) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        integrity.atomic_write_json(os.path.join(workdir, "config.json"), cfg_json, indent=2, sort_keys=True)


def _prepare_workdir(workdir: str, cfg_json: dict, overwrite: bool, resume: bool) -> str:
    """``inspect_workdir`` then (``overwrite``: clear it and) write ``config.json``."""
    action = inspect_workdir(workdir, cfg_json, overwrite, resume)
    if action == "overwrite":
        clear_workdir(workdir)
    write_config(workdir, cfg_json)
    return action


def truncate_metrics(path: str, step: int) -> None:
    """Keep only records up to ``step`` (a resumed run rewrites what came after); atomic."""
    if not os.path.exists(path) or jax.process_index() != 0:
        return
    with open(path) as f:
        lines = [ln if ln.endswith("\n") else ln + "\n" for ln in f if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln).get("step", 0) <= step:
                keep.append(ln)
        except json.JSONDecodeError:
            break  # a line cut by the interruption
    integrity.atomic_write_text(path, "".join(keep))


def batch_shards(sharding) -> int:
    """How many ways a batch's leading axis is split by ``sharding`` (a NamedSharding)."""
    spec = tuple(sharding.spec)
    first = spec[0] if spec else None
    axes = () if first is None else (first if isinstance(first, tuple) else (first,))
    return math.prod(int(sharding.mesh.shape[a]) for a in axes)


def check_batches(cfg, n_train: int, shards: int) -> None:
    """Batch sizes against the data and the mesh, with errors that name the fix."""
    t = cfg.train
    if int(t.batch_size) > n_train:
        raise ValueError(f"train.batch_size={t.batch_size} exceeds the {n_train} training examples "
                         f"(after the validation split); use at most {n_train}")
    micro = int(t.batch_size) // int(t.accum_steps)
    for key, value in (("train.batch_size", int(t.batch_size)), ("train.eval_batch_size", int(t.eval_batch_size))):
        if value % shards:
            raise ValueError(f"{key}={value} is not divisible by the {shards} batch shards of mesh "
                             f"{dict(cfg.mesh)}: use a multiple of {shards} (e.g. {max(shards, value // shards * shards)}) "
                             "or a mesh with fewer data-parallel devices")
    if micro % shards:
        raise ValueError(f"the micro-batch train.batch_size/train.accum_steps = {micro} is not divisible by the "
                         f"{shards} batch shards of mesh {dict(cfg.mesh)}: make batch_size a multiple of "
                         f"{shards * int(t.accum_steps)}")
