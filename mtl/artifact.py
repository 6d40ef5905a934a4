"""Shareable artifacts: export a trained run, load it back with one call.

An artifact is a directory with ``params/`` (orbax, a plain nested dict of arrays)
and ``metadata.json`` (format, library version, the run's config, its tasks and input
shape, and every parameter's path, shape and dtype). It needs neither the training
data nor the workdir to load.

    mtl.artifact.export_run("runs/quickstart", "quickstart.mtl")        # or: mtl export
    model, meta = mtl.artifact.load_model("quickstart.mtl")             # a ready nnx model
    mtl.artifact.load_params(model, "quickstart.mtl")                   # into your own model

Loading into a model of a different shape fails with ``CheckpointMismatchError``
naming the first mismatching parameter path and both shapes.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
from flax import nnx

import mtl
from mtl import checkpoint as ckpt
from mtl.nn.build import model_factory
from mtl.nn.heads import head_from_json
from mtl.tasks import Task


def tasks_from_json(items) -> list[Task]:
    return [Task(d["name"], head_from_json(d["head"])) for d in items]


def restore_run(workdir: str, which: str = "best"):
    """A run's parameters: ``(steps, params, step, cfg, bundle)``.

    ``which``: ``best`` (the validation-selected parameters), ``last``, or a step number.
    ``params`` is an nnx State on ``steps.mesh``; ``steps.model(params)`` is the model.
    """
    from mtl import config as config_lib
    from mtl.train.loop import build, load_data

    with open(os.path.join(workdir, "config.json")) as f:
        cfg_json = json.load(f)
    cfg = config_lib.with_defaults(ml_collections.ConfigDict(cfg_json))
    bundle, infos, _, _ = load_data(cfg)
    steps = build(cfg, bundle, infos)
    if which == "best" and os.path.isdir(os.path.join(workdir, "best")):
        store = ckpt.CheckpointStore(os.path.join(workdir, "best"), max_to_keep=None)
        results_path = os.path.join(workdir, "results.json")
        step = None
        if os.path.exists(results_path):
            with open(results_path) as f:
                step = json.load(f).get("selected_step")
        step = step if step in store.steps() else store.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir} has no saved best parameters; use which='last'")
        params, _ = store.restore(step, steps.abstract_state.params)
    else:
        store = ckpt.CheckpointStore(os.path.join(workdir, "checkpoints"), max_to_keep=None)
        have = store.steps()
        if which in ("best", "last"):
            step = store.latest_step()
        else:
            try:
                step = int(which)
            except ValueError:
                store.close()
                raise ValueError(f"--which must be best, last or a step number; got {which!r}") from None
            if step not in have:
                store.close()
                raise FileNotFoundError(f"{workdir} has no checkpoint at step {step}; the steps kept are "
                                        f"{', '.join(map(str, have)) or 'none'} (train.keep_checkpoints "
                                        "sets how many are kept)")
        if step is None:
            store.close()
            raise FileNotFoundError(f"{workdir} has no checkpoints")
        state, _ = store.restore(step, steps.abstract_state)
        params = state.params
    store.close()
    return steps, params, int(step), cfg, bundle


def run_config(path: str) -> dict:
    """The config (as JSON) of a workdir (its ``config.json``) or an artifact (its metadata)."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return ckpt.read_artifact_metadata(path).get("config", {})
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} is neither an mtl workdir (no config.json) nor an artifact "
                                "(no metadata.json)")
    with open(cfg_path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is corrupt: {e}") from None


def load_params_from(path: str, expected: dict, which: str = "best") -> dict:
    """Parameters (nested dict of host arrays) of a workdir (``which``, see :func:`restore_run`)
    or an artifact, checked against ``expected`` (a nested dict of arrays or ShapeDtypeStructs):
    ``CheckpointMismatchError`` names the first mismatching path and both shapes."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        params, _ = ckpt.load_artifact_params(path, expected)
        return jax.device_get(params)
    steps, params, step, _, _ = restore_run(path, which)
    found = jax.device_get(nnx.to_pure_dict(params))
    ckpt.compare_trees(ckpt.flat_shapes(expected), ckpt.flat_shapes(found), what=f"run {path} (step {step})")
    return found


def export_run(workdir: str, out: str, which: str = "best", overwrite: bool = False) -> str:
    """Write the artifact of a training run (``which``: best | last | a step number)."""
    steps, params, step, cfg, bundle = restore_run(workdir, which)
    from mtl import config as config_lib

    meta = {
        "mtl_version": mtl.__version__,
        "config": config_lib.to_json(cfg),
        "tasks": [t.to_json() for t in steps.tasks],
        "input_shape": list(bundle.input_shape),
        "dataset": bundle.name,
        "step": step,
        "source_workdir": os.path.abspath(workdir),
    }
    if cfg.model.get("arch", "shared") == "slimmable":  # the width search's lookup table travels with it
        from mtl.nn.slimmable.runs import table_for

        meta["slim_table"] = table_for(workdir, which).to_json()
    return ckpt.export_artifact(out, jax.device_get(nnx.to_pure_dict(params)), meta, overwrite=overwrite)


def load_params(model: nnx.Module, path: str) -> dict:
    """Load an artifact's parameters into ``model`` in place; returns the metadata.

    Raises ``CheckpointMismatchError`` (first mismatching path and shapes) when the
    artifact was written for a differently shaped model.
    """
    state = nnx.state(model, nnx.Param)
    expected = nnx.to_pure_dict(state)
    params, meta = ckpt.load_artifact_params(path, expected)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return meta


def load_model(path: str, seed: int = 0):
    """Rebuild the model an artifact was exported from and load its parameters."""
    meta = ckpt.read_artifact_metadata(path)
    tasks = tasks_from_json(meta["tasks"])
    model_cfg = ml_collections.ConfigDict(meta["config"]["model"])
    factory = model_factory(model_cfg, tasks, tuple(meta["input_shape"]))
    with nnx.use_eager_sharding(False):
        model = factory(nnx.Rngs(seed))
    load_params(model, path)
    return model, meta


def load_model_at(path: str, widths, seed: int = 0):
    """A slimmable artifact's model fixed at one width configuration: ``(view, meta)``.

    ``widths``: a ``WidthConfig``, one float (everywhere), or the text form of
    ``mtl eval --widths`` (``"encoder=0.5,seg=1"``); checked against the trained width set
    (an error names it). ``view(x)`` runs that configuration; ``view.model`` is the full model."""
    meta = ckpt.read_artifact_metadata(path)
    arch = meta.get("config", {}).get("model", {}).get("arch", "shared")
    if arch != "slimmable":
        raise ValueError(f"{path} is not a slimmable artifact (model.arch={arch!r}); only slimmable models run at a width")
    model, meta = load_model(path, seed)
    from mtl.nn.slimmable.search import parse_widths
    from mtl.nn.slimmable.widths import WidthConfig

    if not isinstance(widths, WidthConfig):
        widths = parse_widths(widths, model.task_names, model.widths)
    return model.at(widths), meta
