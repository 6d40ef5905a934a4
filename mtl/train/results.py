"""Multi-task results: Δm% against single-task baselines, and the results table.

Δm% (methods.md §1): for every task t and each of its metrics m,
r = (M_mtl − M_stl) / M_stl, negated when lower is better; average the r within a
task, then across tasks; ×100. Positive = the multi-task model beats single-task
training. (The task loss is not counted as a metric.)
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

DELTA_M_DEFINITION = ("Δm% = mean over tasks of the mean over the task's metrics of "
                      "±(M_mtl − M_stl)/M_stl × 100 (sign + when higher is better); positive = better than single-task.")


def delta_m(mtl: Mapping[str, Mapping[str, float]], stl: Mapping[str, Mapping[str, float]],
            higher_is_better: Mapping[str, Mapping[str, bool]]) -> dict:
    """``{"delta_m": float, "per_task": {task: float}}`` (percent).

    ``mtl``/``stl``: ``{task: {metric: value}}``; ``higher_is_better``: ``{task: {metric: bool}}``
    names the metrics that count.
    """
    per_task = {}
    for task, hib in higher_is_better.items():
        rs = []
        for metric, higher in hib.items():
            m, s = float(mtl[task][metric]), float(stl[task][metric])
            if s == 0:
                raise ValueError(f"Δm is undefined: the single-task {task}/{metric} is 0")
            r = (m - s) / abs(s)
            rs.append(r if higher else -r)
        per_task[task] = 100.0 * float(np.mean(rs))
    return {"delta_m": float(np.mean(list(per_task.values()))), "per_task": per_task}


def format_results_table(results: Mapping, baselines: Mapping | None = None, split: str = "test") -> str:
    """Markdown table of per-task metrics (MTL, and STL + relative change when given)."""
    tasks = results["tasks"]
    rows = []
    if baselines:
        rows.append("| task | metric | multi-task | single-task | Δ% |")
        rows.append("|---|---|---:|---:|---:|")
    else:
        rows.append("| task | metric | multi-task |")
        rows.append("|---|---|---:|")
    for tk in tasks:
        name = tk["name"]
        for metric in tk["metrics"]:
            v = results[split][name][metric]
            if baselines:
                b = baselines[name][split][name][metric]
                sign = 1 if tk["higher_is_better"][metric] else -1
                rel = sign * (v - b) / abs(b) * 100 if b else float("nan")
                rows.append(f"| {name} | {metric} | {v:.4f} | {b:.4f} | {rel:+.2f} |")
            else:
                rows.append(f"| {name} | {metric} | {v:.4f} |")
    return "\n".join(rows)
