"""A multi-task run together with its single-task baselines, and Δm%.

``config.baselines.train=True`` trains one model per task with the same config (only
``data.tasks`` changes) under ``workdir/baselines/<task>``; ``baselines.from_dir``
reuses such directories from an earlier run. Each baseline is an ordinary run, so an
interrupted experiment resumes baseline by baseline.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from mtl import config as config_lib
from mtl import integrity
from mtl.train.loop import log, run
from mtl.train.results import DELTA_M_DEFINITION, delta_m, format_results_table


def baseline_config(cfg: ml_collections.ConfigDict, task: str) -> ml_collections.ConfigDict:
    sub = ml_collections.ConfigDict(cfg.to_dict())
    sub.data.tasks = (task,)
    sub.baselines.train = False
    sub.baselines.from_dir = ""
    sub.name = f"{cfg.name or 'run'}/stl-{task}"
    if len(sub.train.loss_weights):
        sub.train.loss_weights = ()
    # one task: nothing to aggregate, so the plain single-backward step (EW) is the baseline
    sub.optim = config_lib.base_config().optim
    return sub


def run_experiment(cfg, workdir: str, *, overwrite: bool = False, resume: bool = False) -> dict:
    """Train the multi-task model, then (if configured) the baselines; write Δm% into results.json."""
    cfg = config_lib.with_defaults(cfg)
    results = run(cfg, workdir, overwrite=overwrite, resume=resume)
    if results and cfg.model.get("arch", "shared") == "slimmable" and cfg.train.slim_table \
            and jax.process_index() == 0:
        from mtl.nn.slimmable.runs import build_table, summary

        log(summary(build_table(workdir, "best", log=log)))
    task_names = [t["name"] for t in results["tasks"]]
    base_dir = None
    if cfg.baselines.train:
        base_dir = os.path.join(workdir, "baselines")
        for task in task_names:
            log(f"[mtl] single-task baseline: {task}")
            run(baseline_config(cfg, task), os.path.join(base_dir, task), overwrite=overwrite, resume=resume)
    elif cfg.baselines.from_dir:
        base_dir = cfg.baselines.from_dir
    if base_dir is None:
        log("\n" + format_results_table(results))
        return results
    baselines = {}
    for task in task_names:
        path = os.path.join(base_dir, task, "results.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no single-task baseline for task {task!r}: {path} is missing "
                                    "(train them with --config.baselines.train=True)")
        with open(path) as f:
            baselines[task] = json.load(f)
    hib = {t["name"]: t["higher_is_better"] for t in results["tasks"]}
    for split in ("val", "test"):
        stl = {t: baselines[t][split][t] for t in task_names}
        results[f"delta_m_{split}"] = delta_m(results[split], stl, hib)
    results["baselines"] = {t: {s: baselines[t][s][t] for s in ("val", "test")} for t in task_names}
    results["delta_m_definition"] = DELTA_M_DEFINITION
    if jax.process_index() == 0:
        integrity.atomic_write_json(os.path.join(workdir, "results.json"), results, indent=2)
    log("\nTest results (model selected on validation):\n" + format_results_table(results, baselines))
    log(f"\nΔm% (test) = {results['delta_m_test']['delta_m']:+.2f}   "
        f"(validation: {results['delta_m_val']['delta_m']:+.2f})\n{DELTA_M_DEFINITION}")
    return results
