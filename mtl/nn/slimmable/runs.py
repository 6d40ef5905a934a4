"""Search on a trained run: measure candidates, build the lookup table, answer queries.

    table = build_table("runs/slimmable_dense")            # writes RUN/slim_table.json
    tables = build_tables([run_a, run_b])                 # several runs of one config (seeds, variants):
                                                          # each configuration compiled once for all
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
    """Table entries ``{key: {widths, flops (per example), val}}`` of ``configs`` (one run:
    :func:`measure_many`)."""
    return measure_many(steps, [(model, src)], batch_size, input_shape, configs, log)[0]


def measure_many(steps, runs: Sequence[tuple], batch_size: int, input_shape, configs: Sequence[WidthConfig],
                 log=None) -> list:
    """:func:`measure` for several runs of one architecture (``runs``: ``(model, val_src)``
    pairs, e.g. seeds or training variants of one config): one entries dict per run.

    Every configuration is its own compiled program. Here each configuration is compiled
    once for all the runs (the parameters are arguments of the program, so runs of the
    same architecture share it) and its FLOPs are read once: the cost of a table over
    several runs is one compilation per configuration plus one evaluation per run.

    XLA:CPU keeps ~120 memory maps per configuration's programs (measured on the slimmable
    CNN), so a few hundred configurations in one process would reach the kernel's
    ``vm.max_map_count`` (65530 by default) and crash. JAX's compilation caches are
    therefore cleared after each configuration: programs compiled before the call are
    compiled again when next used."""
    runs = list(runs)
    if not runs:
        raise ValueError("measure_many needs at least one (model, val_src) run")
    graphdef, key = nnx.graphdef(runs[0][0]), runs[0][0].inference_key()
    for i, (m, _) in enumerate(runs[1:], 1):
        # separately built models never share a graphdef (tasks compare by identity, training
        # options differ), so the forwards are compared and run i's state is put on run 0's
        if m.inference_key() != key:
            raise ValueError(f"run {i} has another architecture than run 0: one table measurement needs runs of "
                             "one model config (same encoder, decoders and widths)")
    runs = runs[:1] + [(nnx.merge(graphdef, nnx.state(m)), src) for m, src in runs[1:]]
    fn = _eval_fn(steps.tasks)
    out = [{} for _ in runs]
    for i, cfg in enumerate(configs):
        fl = cost.flops(runs[0][0], cfg, input_shape)
        for entries, (m, src) in zip(out, runs):
            entries[key_of(cfg)] = {"widths": cfg.to_json(), "flops": fl,
                                    "val": evaluate_at(steps, m, src, batch_size, cfg, fn)}
        jax.clear_caches()
        if log:
            log(f"  [{i + 1}/{len(configs)}] {cfg.to_json()}: {fl / 1e6:.3f} MFLOPs")
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
    return build_tables([workdir], which, preferences, n_budgets, log, save)[0]


def build_tables(workdirs: Sequence[str], which: str = "best", preferences=None, n_budgets: int = 8, log=_log,
                 save: bool = True) -> list:
    """:func:`build_table` for several runs of one model config at once (seeds, training
    variants), each on its own validation split: every configuration is compiled once for
    all of them (:func:`measure_many`). All runs are loaded and checked before anything is
    measured or written."""
    from mtl.train.loop import load_data

    if not workdirs:
        raise ValueError("build_tables needs at least one workdir")
    loaded = [load_run(wd, which) for wd in workdirs]
    steps, model0, cfg0, bundle0 = loaded[0]
    tasks = list(model0.task_names)
    for wd, (_, m, c, b) in zip(workdirs[1:], loaded[1:]):
        if ((list(m.task_names), tuple(m.widths), tuple(b.input_shape), int(c.train.eval_batch_size))
                != (tasks, tuple(model0.widths), tuple(bundle0.input_shape), int(cfg0.train.eval_batch_size))):
            raise ValueError(f"{wd} has other tasks, widths, inputs or eval batch size than {workdirs[0]}: tables are "
                             "built together only for runs of one model config")
    prefs = [parse_preference(p, tasks) for p in (preferences or default_preferences(tasks))]
    configs = [model0.widest, model0.narrowest]  # the objective's reference, the minimum budget
    for p in prefs:
        configs += [c for c in candidates(p, model0.widths) if c not in configs]
    log(f"[mtl slim] measuring {len(configs)} configurations on the validation split"
        + (f" of {len(workdirs)} runs" if len(workdirs) > 1 else ""))
    srcs = [load_data(c)[3] for _, _, c, _ in loaded]
    all_entries = measure_many(steps, [(m, src) for (_, m, _, _), src in zip(loaded, srcs)],
                               int(cfg0.train.eval_batch_size), bundle0.input_shape, configs, log)
    tables = []
    for wd, (_, m, _, b), entries in zip(workdirs, loaded, all_entries):
        table = SlimTable(tasks, list(m.widths), entries,
                          meta={"workdir": os.path.abspath(wd), "which": which, "split": "val",
                                "input_shape": list(b.input_shape),
                                "flops": "per example, XLA cost analysis of the compiled forward"})
        for bud in budget_grid([e["flops"] for e in entries.values()], n_budgets):
            for p in prefs:
                c = search(table, bud, p)
                table.grid.append({"budget": bud, "preference": p, "choice": key_of(c.widths),
                                   "objective": c.objective})
        if save:
            table.save(os.path.join(wd, TABLE_FILE))
        tables.append(table)
    return tables


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
