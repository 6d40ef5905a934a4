"""``mtl.train.run(config, workdir)``: the training loop behind ``mtl train``.

A run writes into ``workdir``:
  config.json        the resolved config
  metrics.jsonl      one JSON object per logged train step and per evaluation
  checkpoints/       orbax checkpoints of the whole train state (async, periodic)
  best/              parameters of the best validation step (model selection)
  results.json       final per-task metrics on validation and test (+ Δm% with baselines)

Running the same command again resumes from the latest checkpoint and ends with the
same parameters and metrics as an uninterrupted run (batches are a pure function of
seed and step). A workdir holding a different config is refused unless ``resume`` or
``overwrite`` is given.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import jax
import numpy as np

from mtl import config as config_lib
from mtl import sharding as shd
from mtl.checkpoint import CheckpointStore
from mtl.data.pipeline import TrainBatches, eval_batches, split_validation
from mtl.nn.build import model_factory
from mtl.tasks import Task
from mtl.train.optimizer import make_optimizer
from mtl.train.step import Steps


class NonFiniteLossError(FloatingPointError):
    """A task's loss (or the gradient) became NaN/inf during training."""


class WorkdirConflictError(RuntimeError):
    """The workdir already holds a run with another config."""


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def load_data(cfg):
    from mtl.data.registry import load_dataset

    bundle = load_dataset(cfg.data.name, **dict(cfg.data.kwargs))
    names = list(cfg.data.tasks) or bundle.task_names
    infos = [bundle.task(n) for n in names]
    if bundle.val is None:
        train, val = split_validation(bundle.train, cfg.data.val_fraction, cfg.data.seed)
    else:
        train, val = bundle.train, bundle.val
    return bundle, infos, train, val


def build(cfg, bundle, infos, mesh=None):
    """Tasks, model factory, optimizer and jitted steps for a resolved config."""
    tasks = [Task.from_info(i, hidden=tuple(cfg.model.head_hidden)) for i in infos]
    factory = model_factory(cfg.model, tasks, bundle.input_shape)
    tx = make_optimizer(steps=cfg.train.steps, **{k: v for k, v in cfg.optimizer.items()})
    mesh = mesh if mesh is not None else shd.make_mesh(dict(cfg.mesh))
    weights = list(cfg.train.loss_weights) or None
    return Steps(factory, tasks, tx, mesh, rules=cfg.rules, loss_weights=weights, seed=cfg.seed,
                 optim=cfg.optim, accum_steps=int(cfg.train.accum_steps))


def _with_new_defaults(old: dict) -> dict:
    """A stored config.json with keys added to ``base_config`` since it was written filled
    in with their defaults (unchanged if it no longer validates)."""
    import ml_collections

    try:
        return config_lib.to_json(config_lib.with_defaults(ml_collections.ConfigDict(old)))
    except Exception:  # noqa: BLE001 - an old or foreign config: compare it as stored
        return old


def _prepare_workdir(workdir: str, cfg_json: dict, overwrite: bool, resume: bool) -> None:
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            try:
                old = json.load(f)
            except json.JSONDecodeError:
                old = None
        if old is not None and old != cfg_json:
            old = _with_new_defaults(old)  # a key added since that run, at its default, is no change
        if old != cfg_json:
            if overwrite:
                if jax.process_index() == 0:
                    shutil.rmtree(workdir)
            elif resume:
                log(f"resuming {workdir} with a changed config")
            else:
                changes = config_lib.diff(old or {}, cfg_json) if old is not None else ["(unreadable config.json)"]
                raise WorkdirConflictError(
                    f"{workdir} holds another run (config differs: {'; '.join(changes[:6])}"
                    f"{' ...' if len(changes) > 6 else ''}). Nothing was changed. Use --resume to continue it "
                    "with this config, --overwrite to delete it and start again, or another --workdir.")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(cfg_json, f, indent=2, sort_keys=True)


def _truncate_metrics(path: str, step: int) -> None:
    """Keep only records up to ``step`` (a resumed run rewrites what came after)."""
    if not os.path.exists(path) or jax.process_index() != 0:
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln).get("step", 0) <= step:
                keep.append(ln)
        except json.JSONDecodeError:
            break  # a line cut by the interruption
    with open(path, "w") as f:
        f.writelines(keep)


def gradient_record(m: dict, task_names) -> dict:
    """The diagnostics of one step as JSON: task weights, per-task gradient norms, pairwise
    cosines ``{"a|b": cos}`` and the fraction of conflicting (cos < 0) pairs of present tasks."""
    cos = np.asarray(m["cosines"])
    pairs = {f"{a}|{b}": float(cos[i, j]) for i, a in enumerate(task_names)
             for j, b in enumerate(task_names) if i < j}
    return {"weights": {n: float(v) for n, v in zip(task_names, m["weights"])},
            "grad_norms": {n: float(v) for n, v in zip(task_names, m["grad_norms"])},
            "cosines": pairs, "conflict_fraction": float(m["conflict_fraction"]),
            "ok": bool(m["ok"])}


def _selection_value(val_metrics: dict) -> float:
    return float(np.mean([m["loss"] for m in val_metrics.values()]))


def run(cfg, workdir: str, *, overwrite: bool = False, resume: bool = False, mesh=None,
        _stop_after: int | None = None) -> dict:
    """Train (or resume) the run described by ``cfg`` in ``workdir``; returns results.json's content."""
    cfg = config_lib.with_defaults(cfg)
    cfg_json = config_lib.to_json(cfg)
    workdir = os.path.abspath(workdir)
    t = cfg.train
    # data and model first: a config that cannot build fails before anything is written
    bundle, infos, train_src, val_src = load_data(cfg)
    steps = build(cfg, bundle, infos, mesh)
    _prepare_workdir(workdir, cfg_json, overwrite, resume)
    task_names = [i.name for i in infos]
    log(f"[mtl] {cfg.name or 'run'}: {bundle.name}, tasks {task_names}, {len(train_src)} train / "
        f"{len(val_src)} val / {len(bundle.test)} test, mesh {dict(steps.mesh.shape)}, workdir {workdir}"
        + (f", {t.accum_steps} micro-batches of {t.batch_size // t.accum_steps} per step" if t.accum_steps > 1 else ""))

    store = CheckpointStore(os.path.join(workdir, "checkpoints"), max_to_keep=t.keep_checkpoints)
    best_store = CheckpointStore(os.path.join(workdir, "best"), max_to_keep=None)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    meta = {"best_value": None, "best_step": None}
    start = store.latest_step()
    if start is not None:
        state, meta = store.restore(start, steps.abstract_state)
        for s in best_store.steps():
            if s > start:
                best_store.delete(s)
        _truncate_metrics(metrics_path, start)
        log(f"[mtl] resumed from step {start}")
        start = int(start)
    else:
        state = steps.init()
        start = 0
        if os.path.exists(metrics_path) and jax.process_index() == 0:
            os.remove(metrics_path)
    committed_best = meta.get("best_step")

    batches = TrainBatches(train_src, t.batch_size, cfg.data.seed, steps.batch_sharding)
    mfile = open(metrics_path, "a") if jax.process_index() == 0 else None

    def write(rec):
        if mfile is not None:
            mfile.write(json.dumps(rec) + "\n")
            mfile.flush()

    def evaluate(src, params_state=None):
        s = state if params_state is None else params_state
        return steps.evaluate(s, eval_batches(src, t.eval_batch_size, steps.batch_sharding))

    def check_finite(st):
        count = int(jax.device_get(st.nonfinite_count))
        if count and t.on_nonfinite == "raise":
            bad_step, bad_task = (int(v) for v in jax.device_get(st.first_nonfinite))
            what = (f"the loss of task {task_names[bad_task]!r}" if bad_task >= 0
                    else "the gradient (all task losses finite)")
            store.wait()  # a checkpoint still being written is a good one: finish it
            last = store.latest_step()
            raise NonFiniteLossError(
                f"{what} became NaN/inf at step {bad_step + 1}; training stopped (no update was applied). "
                f"The last good checkpoint is step {last} in {store.directory}. "
                "Lower the learning rate, clip gradients (optimizer.grad_clip) or set train.on_nonfinite='skip'.")
        return count

    total = int(t.steps)
    stop_at = total if _stop_after is None else min(total, _stop_after)
    t0, last_t, last_step = time.time(), time.time(), start
    step = start
    try:
        diag_every = int(cfg.optim.diagnostics_every)
        for step in range(start, stop_at):
            s1 = step + 1
            diag = diag_every > 0 and s1 % diag_every == 0
            state, m = steps.step(state, batches[step], diagnostics=diag)
            is_log = s1 % t.log_every == 0 or s1 == total
            is_eval = s1 % t.eval_every == 0 or s1 == total
            is_ckpt = s1 % t.checkpoint_every == 0 or s1 == total
            if diag or is_log or is_eval or is_ckpt:
                check_finite(state)  # before anything is logged, evaluated or saved
            if diag:
                d = jax.device_get(m)
                write({"step": s1, "split": "diagnostics", **gradient_record(d, task_names)})
            if is_log:
                m = jax.device_get(m)
                now = time.time()
                rate = (s1 - last_step) / max(now - last_t, 1e-9)
                last_t, last_step = now, s1
                eta = (total - s1) / max(rate, 1e-9)
                losses = {n: float(v) for n, v in zip(task_names, m["losses"])}
                weights = {n: float(v) for n, v in zip(task_names, m["weights"])}
                write({"step": s1, "split": "train", "loss": float(m["loss"]), "losses": losses,
                       "weights": weights, "aux_loss": float(m["aux_loss"]), "grad_norm": float(m["grad_norm"]),
                       "steps_per_s": rate})
                parts = " ".join(f"{n}={v:.4g}" for n, v in losses.items())
                log(f"step {s1:>6}/{total} | loss {float(m['loss']):.4f} ({parts}) | "
                    f"{rate:,.1f} steps/s | ETA {_fmt_time(eta)}")
            if is_eval:
                val = evaluate(val_src)
                value = _selection_value(val)
                improved = meta["best_value"] is None or value < meta["best_value"]
                write({"step": s1, "split": "val", "metrics": val, "selection": value, "improved": improved})
                log(f"  val @ {s1}: " + ", ".join(f"{n}: " + " ".join(f"{k}={v:.4g}" for k, v in d.items())
                                                   for n, d in val.items()))
                if improved:
                    meta = {"best_value": value, "best_step": s1}
                    if s1 in best_store.steps():
                        best_store.delete(s1)
                    best_store.save(s1, state.params)
            if is_ckpt:
                store.wait()
                best_store.wait()
                if committed_best is not None:
                    for s in best_store.steps():
                        if s < committed_best:
                            best_store.delete(s)
                store.save(s1, state, meta)
                committed_best = meta["best_step"]
    except KeyboardInterrupt:
        log(f"[mtl] interrupted at step {step}; saving a checkpoint")
        store.wait()
        if int(jax.device_get(state.step)) > (store.latest_step() or 0):
            store.save(int(jax.device_get(state.step)), state, meta)
        store.close()
        best_store.close()
        raise
    except BaseException:
        store.close()  # finish checkpoints already started; they hold good states
        best_store.close()
        raise
    finally:
        if mfile is not None:
            mfile.close()
    store.close()
    best_store.close()
    if stop_at < total:
        return {}

    # ---------------------------------------------------------------- final evaluation
    nonfinite = int(jax.device_get(state.nonfinite_count))
    selected = total
    if t.select == "best" and meta.get("best_step") is not None and meta["best_step"] != total:
        selected = int(meta["best_step"])
        best_params = CheckpointStore(os.path.join(workdir, "best"), max_to_keep=None)
        params, _ = best_params.restore(selected, steps.abstract_state.params)
        best_params.close()
        state = state.replace(params=params)
    results = {
        "name": cfg.name, "dataset": bundle.name, "tasks": [tk.to_json() for tk in steps.tasks],
        "steps": total, "selected_step": selected, "selection": f"min mean validation loss ({t.select})",
        "val": evaluate(val_src), "test": evaluate(bundle.test),
        "nonfinite_steps_skipped": nonfinite, "train_time_s": time.time() - t0,
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results
