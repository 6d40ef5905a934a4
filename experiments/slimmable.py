"""Slimmable multi-task networks on DenseFashion: budget-performance front and controllability.

    python experiments/slimmable.py --quick            # 1 seed, 40 steps, mlp encoder
    python experiments/slimmable.py --seeds 0 1 2      # the full setting (configs/slimmable_dense.py)
    python experiments/slimmable.py --plot-only        # redraw the plot from the results' .json

Trained per seed (``mtl.train.loop.run``, one workdir each under ``--root``):
* ``sandwich+cikd`` - the sandwich rule with in-place distillation and CIKD (the config);
* ``sandwich`` - the same without CIKD (``cikd_weight=0``);
* ``fixed w`` - one model per width ``w``, trained at the uniform configuration ``w`` only
  (``sandwich.only``: the same sliced architecture, so the same FLOPs; the fair baseline).

(a) Front: for each uniform width, test Δm% (mean over tasks of the relative test-loss
improvement over the fixed full-width model, %, higher is better) vs MFLOPs per example
(XLA cost analysis). (b) Controllability: the run's lookup table (``slim_table.json``,
validation split) is built, then at each budget of ``--budgets`` (fractions of the widest
FLOPs) ``--prefs`` preferences drawn from a flat Dirichlet are searched; per task, the
Spearman correlation between p_t and the chosen configuration's test performance
(-test loss) over the preferences, averaged over tasks. The uniform-width baseline (the
widest uniform configuration within the budget, whatever the preference) gives the same
configuration for every preference: its correlation is 0 by definition (no variation).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mtl.config import load_config_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def variant_config(args, seed, name, only=None, cikd=1.0):
    c = load_config_file(os.path.join(HERE, "..", "configs", f"slimmable_dense.py:{args.encoder}"))
    c.name = f"slimmable_{name}"
    c.seed = seed
    c.data.seed = seed
    c.train.steps = args.steps
    c.train.eval_every = max(args.steps // 2, 1)
    c.train.checkpoint_every = args.steps
    c.train.log_every = max(args.steps // 4, 1)
    c.data.kwargs = dict(c.data.kwargs, n_train=args.n_train, n_test=args.n_test)
    ak = dict(c.model.arch_kwargs)
    ak["widths"] = tuple(args.widths)
    sw = dict(ak["sandwich"])
    sw["cikd_weight"] = cikd
    if only is not None:
        sw["only"] = float(only)  # this uniform width, alone
        sw["n"] = 1
    ak["sandwich"] = sw
    c.model.arch_kwargs = ak
    return c


def test_losses(steps, model, bundle, cfg, widths):
    from mtl.nn.slimmable import runs

    import jax

    res = runs.evaluate_at(steps, model, bundle.test, int(cfg.train.eval_batch_size), widths)
    jax.clear_caches()   # one program per width configuration: keep the process's memory maps bounded
    return {t: d["loss"] for t, d in res.items()}


def delta_m(losses, ref):
    return float(-100 * np.mean([(losses[t] - ref[t]) / ref[t] for t in ref]))


def spearman(a, b):
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def train_seed(args, seed, log) -> dict:
    """Train (or reuse) the seed's models: ``{model name: workdir}``."""
    from mtl.train.loop import run

    root = os.path.join(args.root, f"seed{seed}")
    wds = {"sandwich+cikd": (None, 1.0), "sandwich": (None, 0.0)}
    for w in args.widths:
        wds[f"fixed {w}"] = (w, 0.0)
    for name, (only, cikd) in wds.items():
        wd = os.path.join(root, name.replace(" ", "_").replace("+", "_"))
        cfg = variant_config(args, seed, name, only, cikd)
        marker = os.path.join(wd, "experiment_done.json")   # a stopped sweep keeps its trained models
        if os.path.exists(marker) and _read_json(marker).get("config") == cfg.to_json():
            log(f"[seed {seed}] reusing trained {name} ({wd})")
        else:
            t0 = time.time()
            run(cfg, wd, overwrite=True)
            log(f"[seed {seed}] trained {name} in {time.time() - t0:.0f} s")
            _write_atomic(marker, json.dumps({"config": cfg.to_json()}))
        wds[name] = wd
    return wds


TABLE_MODELS = ("sandwich+cikd", "sandwich")   # the models whose lookup tables are searched


def preferences(args, seed, tasks) -> list:
    """The seed's ``--prefs`` preferences, drawn from a flat Dirichlet."""
    rng = np.random.default_rng(seed)
    return [dict(zip(tasks, map(float, p))) for p in rng.dirichlet(np.ones(len(tasks)), args.prefs)]


def ensure_tables(args, seeds, log) -> None:
    """Build the lookup tables the seeds' analyses need, all in one measurement: every width
    configuration is compiled once for all the runs (``runs.build_tables``), instead of once
    per run (a CNN table alone took ~30-60 min here). Tables already saved are kept."""
    from mtl.nn.slimmable import runs

    need, prefs = [], []
    for seed in seeds:
        wds = train_seed(args, seed, log)
        tasks = list(runs.load_run(wds[TABLE_MODELS[0]])[1].task_names)
        ps = preferences(args, seed, tasks)
        missing = [wds[n] for n in TABLE_MODELS if _saved_table(wds[n], ps) is None]
        if missing:
            need += missing
            prefs += [p for p in ps if p not in prefs]
    if need:
        log(f"building {len(need)} lookup tables together: {need}")
        runs.build_tables(need, preferences=prefs, log=_every(32, "[tables]", log))


def one_seed(args, seed, log):
    from mtl.nn.slimmable import WidthConfig, cost, runs
    from mtl.nn.slimmable.search import key_of, search

    wds = train_seed(args, seed, log)
    out = {"front": {}, "control": {}}
    steps, model, cfg, bundle = runs.load_run(wds[f"fixed {max(args.widths)}"])
    tasks = list(model.task_names)
    ref = test_losses(steps, model, bundle, cfg, model.widest)
    for name, wd in wds.items():
        steps, model, cfg, bundle = runs.load_run(wd)
        ws = args.widths if not name.startswith("fixed") else [float(name.split()[1])]
        for w in ws:
            cfg_w = WidthConfig.uniform(w, tasks)
            fl = cost.flops(model, cfg_w, bundle.input_shape)
            out["front"].setdefault(name, []).append(
                {"width": w, "mflops": fl / 1e6, "delta_m": delta_m(test_losses(steps, model, bundle, cfg, cfg_w), ref)})
    prefs = preferences(args, seed, tasks)
    for name in TABLE_MODELS:
        steps, model, cfg, bundle = runs.load_run(wds[name])
        table = _table(wds[name], prefs, log=_every(32, f"[seed {seed}] {name} table:", log))
        full = max(e["flops"] for e in table.entries.values())
        cache = {}
        for frac in args.budgets:
            perf = []
            for p in prefs:
                c = search(table, frac * full, p)
                k = key_of(c.widths)
                if k not in cache:
                    cache[k] = test_losses(steps, model, bundle, cfg, c.widths)
                perf.append([-cache[k][t] for t in tasks])
            perf = np.asarray(perf)
            pm = np.asarray([[p[t] for t in tasks] for p in prefs])
            rho = float(np.mean([spearman(pm[:, i], perf[:, i]) for i in range(len(tasks))]))
            out["control"].setdefault(name, {})[str(frac)] = {"spearman": rho, "distinct_configs": len(
                {key_of(search(table, frac * full, p).widths) for p in prefs})}
    return out


def report(args, results, wall, reused=()):
    cmd = "python experiments/slimmable.py " + " ".join(sys.argv[1:])
    mode = ("QUICK MODE (1 seed, few steps, small data; a smoke-level run, not the result of the full setting)"
            if args.quick else f"{len(results)} of {len(args.seeds)} seeds done")
    took = f"{wall:.0f} s in this call"
    if reused:
        took += (f"; seeds {list(reused)} were computed by earlier calls (trained models, tables and per-seed "
                 "results are reused from --root)")
    lines = ["# Slimmable multi-task networks on DenseFashion", "", f"Command: `{cmd}` ({mode}; {took}).",
             "", f"Encoder {args.encoder}, widths {tuple(args.widths)}, {args.steps} steps, {args.n_train} train / "
             f"{args.n_test} test images, seeds {list(args.seeds)[:len(results)]}. Δm% = mean over tasks of the relative test-loss "
             "improvement over the fixed full-width model (higher is better); MFLOPs per example from XLA cost analysis.",
             "", "## (a) Budget-performance front (uniform widths)", "",
             "| model | width | MFLOPs | Δm% (mean ± sd over seeds) |", "|---|---:|---:|---:|"]
    names = list(results[0]["front"])
    for n in names:
        for i, pt in enumerate(results[0]["front"][n]):
            dm = [r["front"][n][i]["delta_m"] for r in results]
            lines.append(f"| {n} | {pt['width']} | {pt['mflops']:.2f} | {np.mean(dm):+.2f} ± {np.std(dm):.2f} |")
    lines += ["", "## (b) Controllability (Spearman ρ between preference and test performance, mean over tasks)", "",
              f"{args.prefs} Dirichlet(1) preferences per budget; budget = fraction of the widest configuration's FLOPs. "
              "Uniform-width baseline: ρ = 0 by construction (one configuration for every preference).", "",
              "| model | budget fraction | ρ (mean ± sd over seeds) | distinct configurations chosen (seed 0) |",
              "|---|---:|---:|---:|"]
    for n in results[0]["control"]:
        for frac in results[0]["control"][n]:
            rs = [r["control"][n][frac]["spearman"] for r in results]
            lines.append(f"| {n} | {frac} | {np.mean(rs):+.3f} ± {np.std(rs):.3f} | "
                         f"{results[0]['control'][n][frac]['distinct_configs']} |")
    return "\n".join(lines) + "\n"


def plot(results, path: str) -> str:
    """(c) Two panels: the front (test Δm% vs MFLOPs, mean ± sd over seeds, per model) and
    controllability (Spearman ρ per budget, mean ± sd; the uniform-width baseline is 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    front = results[0]["front"]
    fixed = [n for n in front if n.startswith("fixed")]
    series = [(n, [n]) for n in front if not n.startswith("fixed")] + [("fixed widths (one model each)", fixed)]
    for label, names in series:
        pts = [(i, n) for n in names for i in range(len(front[n]))]
        xs = [front[n][i]["mflops"] for i, n in pts]
        dm = np.array([[r["front"][n][i]["delta_m"] for r in results] for i, n in pts])
        order = np.argsort(xs)
        a.errorbar(np.array(xs)[order], dm.mean(1)[order], yerr=dm.std(1)[order], marker="o", capsize=3, label=label)
    a.axhline(0, color="grey", lw=0.5)
    a.set_xlabel("MFLOPs per example (XLA)")
    a.set_ylabel("test Δm% vs fixed full width")
    a.set_title("(a) budget-performance front, uniform widths")
    a.legend(fontsize=8)
    ctrl = results[0]["control"]
    fracs = sorted({f for n in ctrl for f in ctrl[n]}, key=float)
    width = 0.8 / (len(ctrl) + 1)
    for k, n in enumerate(ctrl):
        rs = np.array([[r["control"][n][f]["spearman"] for r in results] for f in fracs])
        b.bar(np.arange(len(fracs)) + k * width, rs.mean(1), width, yerr=rs.std(1), capsize=3, label=n)
    b.bar(np.arange(len(fracs)) + len(ctrl) * width, np.zeros(len(fracs)), width, label="uniform width (ρ = 0)")
    b.set_xticks(np.arange(len(fracs)) + width * len(ctrl) / 2, [f"{float(f):.0%} of widest FLOPs" for f in fracs])
    b.set_ylabel("Spearman ρ (preference vs test performance)")
    b.set_title("(b) controllability")
    b.axhline(0, color="grey", lw=0.5)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 40 steps, 600 train images, mlp encoder, 10 preferences")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--encoder", default="cnn")
    p.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--prefs", type=int, default=20)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--root", default="runs/slimmable_exp")
    p.add_argument("--out", default="experiments/results/slimmable.md")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from --out's .json, train nothing")
    p.add_argument("--train-only", action="store_true",
                   help="train (or reuse) the seeds' models and stop: no tables, no report (e.g. one seed per core)")
    p.add_argument("--tables-only", action="store_true",
                   help="train (or reuse) the seeds' models, build their lookup tables and stop: no report")
    a = p.parse_args(argv)
    png = os.path.splitext(a.out)[0] + ".png"
    if a.plot_only:
        with open(os.path.splitext(a.out)[0] + ".json") as f:
            print("wrote", plot(json.load(f)["results"], png))
        return
    if a.quick:
        a.seeds, a.steps, a.encoder, a.n_train, a.n_test, a.prefs = [0], 40, "mlp", 600, 200, 10
    t0 = time.time()
    results = []
    log = lambda m: print(m, flush=True)  # noqa: E731
    if a.train_only:
        for s in a.seeds:
            train_seed(a, s, log)
        return
    cached = {s: _cached_result(a, s, log) for s in a.seeds}
    todo = [s for s in a.seeds if cached[s] is None]
    if todo:   # train every seed first, then measure all their tables together
        ensure_tables(a, todo, log)
    if a.tables_only:
        return
    for s in a.seeds:
        results.append(cached[s] if cached[s] is not None else seed_result(a, s, log))
        done = a.seeds[:len(results)]
        text = report(a, results, time.time() - t0, [x for x in done if cached[x] is not None])
        # rewritten after every seed: a stopped sweep keeps its seeds
        _write_atomic(a.out, text)
        _write_atomic(os.path.splitext(a.out)[0] + ".json",
                      json.dumps({"args": vars(a), "seeds_done": a.seeds[:len(results)], "results": results}, indent=1))
    print(text)
    print("wrote", plot(results, png))


def _saved_table(wd, prefs):
    """``RUN/slim_table.json`` when it was built on the run's best parameters for every one of
    ``prefs`` (a stopped sweep keeps its tables), else None."""
    from mtl.nn.slimmable.search import TABLE_FILE, SlimTable

    def key(p):
        return tuple(sorted((t, round(float(v), 12)) for t, v in p.items()))
    path = os.path.join(wd, TABLE_FILE)
    if os.path.exists(path):
        table = SlimTable.load(path)
        saved = {key(g["preference"]) for g in table.grid}
        if table.meta.get("which", "best") == "best" and all(key(p) in saved for p in prefs):
            return table
    return None


def _table(wd, prefs, log):
    """The run's lookup table for ``prefs``: the saved one (:func:`_saved_table`), else measured now."""
    from mtl.nn.slimmable import runs

    table = _saved_table(wd, prefs)
    if table is not None:
        log(f"reusing {wd}'s lookup table")
        return table
    return runs.build_table(wd, preferences=prefs, log=log)


def _every(n: int, prefix: str, log):
    """A logger for ``measure``'s per-configuration lines that passes on the first line and
    every ``n``-th configuration (progress of the lookup table without 256 lines)."""
    count = {"i": 0}

    def f(msg, *_):
        msg = str(msg).strip()
        if not re.match(r"\[\d+/\d+\]", msg):   # the header ("measuring N configurations ...")
            log(f"{prefix} {msg}")
            return
        count["i"] += 1
        if count["i"] % n == 0:
            log(f"{prefix} {msg.split(']')[0]}] configurations measured")
    return f


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _write_atomic(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _settings(args) -> dict:
    keys = ("steps", "encoder", "widths", "n_train", "n_test", "prefs", "budgets")
    return json.loads(json.dumps({k: getattr(args, k) for k in keys}))


def _cached_result(args, seed, log):
    """The seed's result computed before with the same settings, or None: from the report's
    JSON (``--out``'s ``.json``, kept in the repo), else ``ROOT/seedN/result.json``."""
    out_json = os.path.splitext(args.out)[0] + ".json"
    if os.path.exists(out_json):
        prev = _read_json(out_json)
        if {k: prev.get("args", {}).get(k) for k in _settings(args)} == _settings(args) \
                and seed in prev.get("seeds_done", []):
            log(f"[seed {seed}] reusing {out_json}")
            return prev["results"][prev["seeds_done"].index(seed)]
    path = os.path.join(args.root, f"seed{seed}", "result.json")
    if os.path.exists(path):
        cached = _read_json(path)
        if cached.get("settings") == _settings(args):
            log(f"[seed {seed}] reusing {path}")
            return cached["result"]
    return None


def seed_result(args, seed, log):
    """``one_seed``'s result, saved in ``ROOT/seedN/result.json`` with the settings it was
    computed with (a rerun reads it back: :func:`_cached_result`)."""
    out = one_seed(args, seed, log)
    _write_atomic(os.path.join(args.root, f"seed{seed}", "result.json"),
                  json.dumps({"settings": _settings(args), "result": out}, indent=1))
    return out


if __name__ == "__main__":
    main()
