"""Search on a trained run: measure candidates, build the lookup table, answer queries.

    table = build_table("runs/slimmable_dense")            # writes RUN/slim_table.json
    out = slim("runs/slimmable_dense", "12MFLOPs", "depth=2,seg=1")
    out["widths"], out["flops"], out["latency_s"], out["val"]

Validation losses come from the run's own validation split (carved from train, as in
training); FLOPs from XLA's cost analysis (:func:`mtl.nn.slimmable.cost.flops`), per
example. :func:`slim` reads the table when the run has one (no validation data needed
then) and builds it first otherwise.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl.nn.slimmable import cost
from mtl.nn.slimmable.search import (TABLE_FILE, SlimTable, candidates, default_preferences, key_of, parse_budget,
                                     parse_preference, search)
from mtl.nn.slimmable.widths import WidthConfig


def _log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)  # stdout stays the command's JSON answer


def check_slimmable(cfg, where: str) -> None:
    arch = cfg.model.get("arch", "shared")
    if arch != "slimmable":
        raise ValueError(f"{where} is not a slimmable run (model.arch={arch!r}); "
                         "width search needs a model trained with model.arch='slimmable'")


def load_run(workdir: str, which: str = "best"):
    """``(steps, model, cfg, bundle)`` of a slimmable run (a ready nnx model on the run's mesh)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} holds no run (no config.json)")
    with open(path) as f:
        arch = json.load(f).get("model", {}).get("arch", "shared")
    if arch != "slimmable":
        raise ValueError(f"{workdir} is not a slimmable run (model.arch={arch!r}); "
                         "width search needs a model trained with model.arch='slimmable'")
    from mtl.artifact import restore_run

    steps, params, _, cfg, bundle = restore_run(workdir, which)
    rest = steps.init().rest
    return steps, nnx.merge(steps.graphdef, params, rest), cfg, bundle


def _eval_fn(tasks):
    from mtl.tasks import metric_sums

    def f(graphdef, state, batch, widths):
        return metric_sums(tasks, nnx.merge(graphdef, state)(batch["inputs"], widths), batch)
    return jax.jit(f, static_argnums=(0, 3))


def evaluate_at(steps, model, src, batch_size: int, widths: WidthConfig, _fn=None) -> dict:
    """``{task: {metric: value}}`` of ``model`` at ``widths`` over ``src`` (like Steps.evaluate)."""
    from mtl.data.pipeline import eval_batches

    fn = _fn or _eval_fn(steps.tasks)
    graphdef, state = nnx.split(model)
    total = None
    with steps.activate():
        for b in eval_batches(src, batch_size, steps.batch_sharding):
            s = fn(graphdef, state, b, widths)
            total = s if total is None else jax.tree.map(jnp.add, total, s)
    total = jax.device_get(total)
    return {t: {m: float(sc[0] / max(sc[1], 1.0)) for m, sc in d.items()} for t, d in total.items()}


def measure(steps, model, src, batch_size: int, input_shape, configs: Sequence[WidthConfig], log=None) -> dict:
    """Table entries ``{key: {widths, flops (per example), val}}`` of ``configs``.

    Every configuration is its own compiled program, and XLA:CPU keeps ~120 memory maps per
    configuration's programs (measured on the slimmable CNN), so a few hundred configurations
    in one process would reach the kernel's ``vm.max_map_count`` (65530 by default) and
    crash. JAX's compilation caches are therefore cleared after each configuration: programs
    compiled before the call are compiled again when next used."""
    out = {}
    for i, cfg in enumerate(configs):
        val = evaluate_at(steps, model, src, batch_size, cfg, _eval_fn(steps.tasks))
        out[key_of(cfg)] = {"widths": cfg.to_json(), "flops": cost.flops(model, cfg, input_shape), "val": val}
        jax.clear_caches()
        if log:
            log(f"  [{i + 1}/{len(configs)}] {cfg.to_json()}: {out[key_of(cfg)]['flops'] / 1e6:.3f} MFLOPs")
    return out


def budget_grid(flops: Sequence[float], n: int = 8) -> list:
    """``n`` budgets spaced geometrically from the cheapest to the dearest candidate."""
    lo, hi = min(flops), max(flops)
    return [float(v) for v in np.geomspace(lo, hi, n)] if hi > lo else [float(lo)]


def build_table(workdir: str, which: str = "best", preferences=None, n_budgets: int = 8, log=_log,
                save: bool = True) -> SlimTable:
    """Measure every candidate of a preference grid on the validation split; write
    ``RUN/slim_table.json`` (atomically, unless ``save=False``) with the chosen configuration
    per budget x preference."""
    from mtl.train.loop import load_data

    steps, model, cfg, bundle = load_run(workdir, which)
    tasks = list(model.task_names)
    prefs = [parse_preference(p, tasks) for p in (preferences or default_preferences(tasks))]
    configs = [model.widest, model.narrowest]  # the objective's reference, the minimum budget
    for p in prefs:
        configs += [c for c in candidates(p, model.widths) if c not in configs]
    log(f"[mtl slim] measuring {len(configs)} configurations on the validation split")
    val_src = load_data(cfg)[3]
    entries = measure(steps, model, val_src, int(cfg.train.eval_batch_size), bundle.input_shape, configs, log)
    table = SlimTable(tasks, list(model.widths), entries,
                      meta={"workdir": os.path.abspath(workdir), "which": which, "split": "val",
                            "input_shape": list(bundle.input_shape),
                            "flops": "per example, XLA cost analysis of the compiled forward"})
    for b in budget_grid([e["flops"] for e in entries.values()], n_budgets):
        for p in prefs:
            c = search(table, b, p)
            table.grid.append({"budget": b, "preference": p, "choice": key_of(c.widths), "objective": c.objective})
    if save:
        table.save(os.path.join(workdir, TABLE_FILE))
    return table


def table_for(workdir: str, which: str = "best", log=_log) -> SlimTable:
    """The run's lookup table for ``which``: ``RUN/slim_table.json`` when it was built for the
    same parameters, else measured now (and saved only for the default ``best``)."""
    path = os.path.join(workdir, TABLE_FILE)
    if os.path.exists(path):
        table = SlimTable.load(path)
        if table.meta.get("which", "best") == which:
            return table
    return build_table(workdir, which, log=log, save=which == "best")


def summary(table: SlimTable) -> str:
    """The uniform-width rows of a table as text: MFLOPs per example and validation loss per task."""
    tasks = list(table.tasks)
    lines = ["slimmable: uniform widths on the validation split (full table: mtl slim; RUN/slim_table.json)",
             f"{'width':>6} {'MFLOPs':>10} " + " ".join(f"{t + ' loss':>14}" for t in tasks)]
    for w in sorted(table.widths, reverse=True):
        cfg = WidthConfig.uniform(w, tasks)
        if table.has(cfg):
            losses = table.losses(cfg)
            lines.append(f"{w:>6g} {table.flops(cfg) / 1e6:>10.3f} " + " ".join(f"{losses[t]:>14.4g}" for t in tasks))
    return "\n".join(lines)


def is_artifact(path: str) -> bool:
    """An exported artifact (``metadata.json``, no ``config.json``) rather than a run's workdir."""
    return os.path.isfile(os.path.join(path, "metadata.json")) and not os.path.exists(os.path.join(path, "config.json"))


def slim_artifact(path: str, budget, preference, repeats: int = 20) -> dict:
    """:func:`slim` on an exported artifact: the choice from the lookup table stored in it
    (no validation data), latency measured on the artifact's model at that configuration."""
    from mtl import checkpoint as ckpt
    from mtl.artifact import load_model

    meta = ckpt.read_artifact_metadata(path)
    arch = meta.get("config", {}).get("model", {}).get("arch", "shared")
    if arch != "slimmable":
        raise ValueError(f"{path} is not a slimmable artifact (model.arch={arch!r}); width search needs a model "
                         "trained with model.arch='slimmable'")
    if "slim_table" not in meta:
        raise ValueError(f"artifact {path} holds no lookup table (exported before tables were stored); "
                         "export it again from its run with `mtl export`")
    table = SlimTable.from_json(meta["slim_table"])
    choice = search(table, budget, preference)  # bad budget / preference: fails before any loading
    model, _ = load_model(path)
    lat = cost.latency(model, choice.widths, tuple(meta["input_shape"]), repeats=repeats)
    return {"artifact": os.path.abspath(path), "budget_mflops": choice.budget / 1e6, "preference": choice.preference,
            "widths": choice.widths.to_json(), "mflops": choice.flops / 1e6, "latency_ms": lat * 1e3,
            "objective": choice.objective, "val": table.entries[key_of(choice.widths)]["val"]}


def slim(workdir: str, budget, preference, which: str = "best", repeats: int = 20, log=_log) -> dict:
    """The configuration for (budget, preference): widths, FLOPs, measured latency, val metrics.

    ``workdir`` may also be an exported artifact (:func:`slim_artifact`: the table it carries).
    Bad input (budget, preference, a non-slimmable run) fails before anything is written."""
    if is_artifact(workdir):
        return slim_artifact(workdir, budget, preference, repeats)
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} holds no run (no config.json)")
    with open(path) as f:
        run_cfg = json.load(f)
    if run_cfg.get("model", {}).get("arch", "shared") != "slimmable":
        raise ValueError(f"{workdir} is not a slimmable run (model.arch={run_cfg['model'].get('arch')!r}); "
                         "width search needs a model trained with model.arch='slimmable'")
    parse_budget(budget)
    steps, model, cfg, bundle = load_run(workdir, which)
    parse_preference(preference, model.task_names)
    narrow = cost.flops(model, model.narrowest, bundle.input_shape)
    if parse_budget(budget) < narrow * (1 - 1e-9):
        raise ValueError(f"budget {parse_budget(budget) / 1e6:.4g} MFLOPs is below the narrowest configuration: the "
                         f"minimum feasible budget is {narrow / 1e6:.4g} MFLOPs per example")
    tpath = os.path.join(workdir, TABLE_FILE)
    table = SlimTable.load(tpath) if os.path.exists(tpath) else build_table(workdir, which, log=log)
    choice = search(table, budget, preference)
    lat = cost.latency(model, choice.widths, bundle.input_shape, repeats=repeats)
    return {"workdir": os.path.abspath(workdir), "budget_mflops": choice.budget / 1e6, "preference": choice.preference,
            "widths": choice.widths.to_json(), "mflops": choice.flops / 1e6, "latency_ms": lat * 1e3,
            "objective": choice.objective, "val": table.entries[key_of(choice.widths)]["val"]}
