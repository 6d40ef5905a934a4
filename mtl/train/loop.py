"""``mtl.train.run(config, workdir)``: the training loop behind ``mtl train``.

A run writes into ``workdir``:
  config.json        the resolved config
  metrics.jsonl      one JSON object per logged train step and per evaluation
  checkpoints/       orbax checkpoints of the whole train state (async, periodic)
  best/              parameters of the best validation step (model selection)
  results.json       final per-task metrics on validation and test (+ Δm% with baselines)
  curves.png         per-task train/val loss, validation metrics and task weights (each eval, and at the end)
  tensorboard/       the same as TensorBoard events (when tensorboardX is installed)

Running the same command again resumes from the latest checkpoint and ends with the
same parameters and metrics as an uninterrupted run (batches are a pure function of
seed and step). A workdir holding a different config is refused unless ``resume`` or
``overwrite`` is given.

Nothing in the workdir changes before the whole command has been validated (see
``mtl.train.workdir``); every checkpoint is verified against its digests on restore, with
fallback to the newest step that verifies (``mtl.checkpoint``).
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from mtl import config as config_lib
from mtl import integrity
from mtl import sharding as shd
from mtl.checkpoint import CheckpointStore
from mtl.data.pipeline import TrainBatches, eval_batches, split_validation
from mtl.nn.build import model_factory
from mtl.tasks import Task
from mtl.nn.parscale import TwoStage
from mtl.train.optimizer import freeze, make_optimizer
from mtl.train import curves
from mtl.train.events import EventWriter
from mtl.train.step import Steps
from mtl.train.workdir import (WorkdirConflictError, _prepare_workdir, batch_shards, check_batches,  # noqa: F401
                               clear_workdir, inspect_workdir, truncate_metrics, write_config)


class NonFiniteLossError(FloatingPointError):
    """A task's loss (or the gradient) became NaN/inf during training."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: the state was saved as checkpoint ``step`` (``message`` says where)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.message, self.step = message, step


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
    two_stage = TwoStage.from_model_config(cfg.model)
    if two_stage.freeze_backbone:  # ParScale two-stage: only the prefixes and the aggregator train
        tx = freeze(tx, two_stage.is_frozen)
    mesh = mesh if mesh is not None else shd.make_mesh(dict(cfg.mesh))
    weights = list(cfg.train.loss_weights) or None
    return Steps(factory, tasks, tx, mesh, rules=cfg.rules, loss_weights=weights, seed=cfg.seed,
                 optim=cfg.optim, accum_steps=int(cfg.train.accum_steps))


def gradient_record(m: dict, task_names) -> dict:
    """The diagnostics of one step as JSON: task weights, per-task gradient norms, pairwise
    cosines ``{"a|b": cos}`` and the fraction of conflicting (cos < 0) pairs of present tasks."""
    cos = np.asarray(m["cosines"])
    pairs = {f"{a}|{b}": float(cos[i, j]) for i, a in enumerate(task_names)
             for j, b in enumerate(task_names) if i < j}
    rec = {"weights": {n: float(v) for n, v in zip(task_names, m["weights"])},
           "grad_norms": {n: float(v) for n, v in zip(task_names, m["grad_norms"])},
           "cosines": pairs, "conflict_fraction": float(m["conflict_fraction"]),
           "ok": bool(m["ok"])}
    if "solver_certificate" in m:  # the exact solver's certificate of these weights
        rec["solver_certificate"] = float(m["solver_certificate"])
        rec["solver_iterations"] = int(m["solver_iterations"])
    return rec


def _selection_value(val_metrics: dict) -> float:
    return float(np.mean([m["loss"] for m in val_metrics.values()]))


class _Outputs:
    """metrics.jsonl (standard JSON, one record a line), TensorBoard scalars and curves.png."""

    def __init__(self, workdir: str, start: int, enabled_curves: bool = True):
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.file = open(self.path, "a") if jax.process_index() == 0 else None
        self.events = EventWriter(workdir, purge_step=start + 1 if start else None, log=log)  # keep <= start
        self.plots = curves.CurveWriter(workdir, log=log) if self.file is not None and enabled_curves else None

    def write(self, rec: dict) -> None:
        if self.file is not None:
            self.file.write(integrity.dumps(rec) + "\n")
            self.file.flush()

    def curves(self) -> None:
        """Ask for curves.png to be redrawn (in the background) from what was written so far."""
        self.events.flush()
        if self.plots is not None:
            self.plots.request()

    def close(self) -> None:
        if self.plots is not None:
            self.plots.close()  # the last evaluation's curves are on disk before run() returns
            self.plots = None
        if self.file is not None:
            self.file.close()
            self.file = None
        self.events.close()


def _restore_or_init(steps, store, base=None):
    """``(start, state, meta, prev_time_s)``: the newest verifying checkpoint, or a fresh state
    (with ``base``'s parameters, see :meth:`Steps.init`)."""
    found = store.restore_latest(steps.abstract_state, log=log)
    if found is None:
        return 0, steps.init(base), {"best_value": None, "best_step": None}, 0.0
    start, state, meta = found
    prev = float(meta.pop("train_time_s", 0.0) or 0.0)
    return start, state, meta, prev


def run(cfg, workdir: str, *, overwrite: bool = False, resume: bool = False, mesh=None,
        _stop_after: int | None = None) -> dict:
    """Train (or resume) the run described by ``cfg`` in ``workdir``; returns results.json's content."""
    cfg = config_lib.with_defaults(cfg)
    cfg_json = config_lib.to_json(cfg)
    workdir = os.path.abspath(workdir)
    t = cfg.train
    # everything that can refuse the command comes before the first write
    bundle, infos, train_src, val_src = load_data(cfg)
    steps = build(cfg, bundle, infos, mesh)
    check_batches(cfg, len(train_src), batch_shards(steps.batch_sharding(1)))
    batches = TrainBatches(train_src, t.batch_size, cfg.data.seed, steps.batch_sharding)
    two_stage = TwoStage.from_model_config(cfg.model)
    # ParScale two-stage: the P = 1 base's backbone, checked against this model (read at every
    # start, resumes too: a resumed run restores its own checkpoint and does not use it)
    base = two_stage.load_backbone(steps.abstract_state.params) if two_stage.init_from else None
    action = inspect_workdir(workdir, cfg_json, overwrite, resume)
    task_names = [i.name for i in infos]
    log(f"[mtl] {cfg.name or 'run'}: {bundle.name}, tasks {task_names}, {len(train_src)} train / "
        f"{len(val_src)} val / {len(bundle.test)} test, mesh {dict(steps.mesh.shape)}, workdir {workdir}"
        + (f", {t.accum_steps} micro-batches of {t.batch_size // t.accum_steps} per step" if t.accum_steps > 1 else ""))
    if action == "overwrite":
        clear_workdir(workdir)

    store = CheckpointStore(os.path.join(workdir, "checkpoints"), max_to_keep=t.keep_checkpoints)
    best_store = CheckpointStore(os.path.join(workdir, "best"), max_to_keep=None)
    try:
        start, state, meta, prev_time = _restore_or_init(steps, store, base)
    except BaseException:
        store.close()
        best_store.close()
        raise
    write_config(workdir, cfg_json)  # only now: the checkpoint matched the model
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if base is not None and not start:
        log(f"[mtl] two-stage: backbone ({', '.join(base)}) from {two_stage.init_from}"
            + (", frozen" if two_stage.freeze_backbone else "") + "; prefixes and aggregator initialised fresh")
    if start:
        for s in best_store.steps():
            if s > start:
                best_store.delete(s)
        truncate_metrics(metrics_path, start)
        log(f"[mtl] resumed from step {start}" + (" with a changed config" if action == "changed" else ""))
    elif os.path.exists(metrics_path) and jax.process_index() == 0:
        os.remove(metrics_path)
    committed_best = meta.get("best_step")
    out = _Outputs(workdir, start, enabled_curves=bool(t.curves))

    def evaluate(src, params_state=None):
        s = state if params_state is None else params_state
        return steps.evaluate(s, eval_batches(src, t.eval_batch_size, steps.batch_sharding))

    def last_good() -> str:
        store.wait()  # a checkpoint still being written is a good one: finish it
        last = store.latest_step()
        return (f"The last good checkpoint is step {last} in {store.directory}." if last is not None
                else "No checkpoint was saved yet.")

    total = int(t.steps)
    max_skipped = int(float(t.max_skip_fraction) * total)
    reported = {"skipped": int(jax.device_get(state.nonfinite_count))}

    def check_finite(st, s1):
        count = int(jax.device_get(st.nonfinite_count))
        if count and t.on_nonfinite == "raise":
            bad_step, bad_task = (int(v) for v in jax.device_get(st.first_nonfinite))
            what = (f"the loss of task {task_names[bad_task]!r}" if bad_task >= 0
                    else "the gradient (all task losses finite)")
            raise NonFiniteLossError(
                f"{what} became NaN/inf at step {bad_step + 1}; training stopped (no update was applied). "
                f"{last_good()} Lower the learning rate, clip gradients (optimizer.grad_clip) or set "
                "train.on_nonfinite='skip'.")
        if count > reported["skipped"]:
            log(f"  skipped {count - reported['skipped']} step(s) with a non-finite loss or gradient by step {s1} "
                f"({count} in all; the limit is train.max_skip_fraction={t.max_skip_fraction} of {total} = "
                f"{max_skipped})")
            reported["skipped"] = count
            out.write({"step": s1, "split": "nonfinite", "skipped_total": count})
        if count > max_skipped:
            raise NonFiniteLossError(
                f"{count} of the first {s1} steps had a non-finite loss or gradient and were skipped, more than "
                f"train.max_skip_fraction={t.max_skip_fraction} of the {total} steps allows; training stopped. "
                f"{last_good()} Lower the learning rate or clip gradients (optimizer.grad_clip).")
        return count

    stop_at = total if _stop_after is None else min(total, _stop_after)
    t0 = time.time()
    last_t, last_step, compile_s = t0, start, None
    step = start
    try:
        diag_every = int(cfg.optim.diagnostics_every)
        for step in range(start, stop_at):
            s1 = step + 1
            diag = diag_every > 0 and s1 % diag_every == 0
            state, m = steps.step(state, batches[step], diagnostics=diag, step=step)
            if compile_s is None:  # the first step compiles: keep it out of the rate and ETA
                jax.block_until_ready(state.step)
                last_t, last_step = time.time(), s1
                compile_s = last_t - t0
            is_log = s1 % t.log_every == 0 or s1 == total
            is_eval = s1 % t.eval_every == 0 or s1 == total
            is_ckpt = s1 % t.checkpoint_every == 0 or s1 == total
            if diag or is_log or is_eval or is_ckpt:
                check_finite(state, s1)  # before anything is logged, evaluated or saved
            if diag:
                d = jax.device_get(m)
                out.write({"step": s1, "split": "diagnostics", **gradient_record(d, task_names)})
            if is_log:
                m = jax.device_get(m)
                now = time.time()
                rate = (s1 - last_step) / max(now - last_t, 1e-9) if s1 > last_step else float("nan")
                last_t, last_step = now, s1
                eta = (total - s1) / rate if rate == rate and rate > 0 else 0.0
                losses = {n: float(v) for n, v in zip(task_names, m["losses"])}
                weights = {n: float(v) for n, v in zip(task_names, m["weights"])}
                out.write({"step": s1, "split": "train", "loss": float(m["loss"]), "losses": losses,
                           "weights": weights, "aux_loss": float(m["aux_loss"]), "grad_norm": float(m["grad_norm"]),
                           "steps_per_s": rate})
                out.events.scalars(s1, {"train/loss": float(m["loss"]), "train/grad_norm": float(m["grad_norm"]),
                                        **{f"train/loss/{n}": v for n, v in losses.items()},
                                        **{f"weight/{n}": v for n, v in weights.items()}})
                parts = " ".join(f"{n}={v:.4g}" for n, v in losses.items())
                speed = (f"{rate:,.1f} steps/s | ETA {_fmt_time(eta)}" if rate == rate
                         else f"first step incl. compile {compile_s:.1f} s")
                log(f"step {s1:>6}/{total} | loss {float(m['loss']):.4f} ({parts}) | {speed}")
            if is_eval:
                val = evaluate(val_src)
                value = _selection_value(val)
                improved = meta["best_value"] is None or value < meta["best_value"]
                out.write({"step": s1, "split": "val", "metrics": val, "selection": value, "improved": improved})
                out.events.scalars(s1, {f"val/{k}/{n}": v for n, d in val.items() for k, v in d.items()})
                log(f"  val @ {s1}: " + ", ".join(f"{n}: " + " ".join(f"{k}={v:.4g}" for k, v in d.items())
                                                   for n, d in val.items()))
                if improved:
                    meta = {"best_value": value, "best_step": s1}
                    if s1 in best_store.steps():
                        best_store.delete(s1)
                    best_store.save(s1, state.params)
                out.curves()
            if is_ckpt:
                store.wait()
                best_store.wait()
                if committed_best is not None:
                    for s in best_store.steps():
                        if s < committed_best:
                            best_store.delete(s)
                store.save(s1, state, {**meta, "train_time_s": prev_time + time.time() - t0})
                committed_best = meta["best_step"]
    except KeyboardInterrupt:
        done = int(jax.device_get(state.step))
        store.wait()
        if done > (store.latest_step() or 0):
            log(f"[mtl] interrupted after step {done}; saving checkpoint step {done}")
            store.save(done, state, {**meta, "train_time_s": prev_time + time.time() - t0})
        saved = store.latest_step()
        store.close()
        best_store.close()
        out.close()
        where = (f"checkpoint step {saved} is saved in {store.directory}: run the same command again to resume"
                 if saved is not None else "no checkpoint was saved")
        raise TrainingInterrupted(f"interrupted after step {done}; {where}", done) from None
    except BaseException:
        store.close()  # finish checkpoints already started; they hold good states
        best_store.close()
        out.close()
        raise
    store.close()
    best_store.close()
    if stop_at < total:
        out.close()
        return {}

    # ---------------------------------------------------------------- final evaluation
    nonfinite = int(jax.device_get(state.nonfinite_count))
    if nonfinite:
        log(f"[mtl] {nonfinite} of {total} steps were skipped (non-finite loss or gradient; train.on_nonfinite='skip')")
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
        "nonfinite_steps_skipped": nonfinite, "train_time_s": prev_time + time.time() - t0,
        "train_time_note": "seconds of training kept in the checkpoints, summed over resumed invocations "
                           "(work redone after an interruption counts once); includes compilation",
    }
    out.close()
    if jax.process_index() == 0:
        integrity.atomic_write_json(os.path.join(workdir, "results.json"), results, indent=2)
    return integrity.json_safe(results)
