"""Sweep: every multi-task optimisation method on MultiFashion and MultiTab (ρ = 0, 0.4, 0.8).

    python experiments/mtl_optim.py            # full sweep (3 seeds), ~30 min on 2 CPU cores
    python experiments/mtl_optim.py --quick    # smoke run: 1 seed, 2 datasets, 3 methods, 60 steps

For each dataset and seed, single-task baselines are trained once (EW, same config, one
task) and reused by every method (``baselines.from_dir``). Each method is one ordinary
``mtl.train`` run from ``configs/mtl_optim.py`` with ``optim.*`` set; its conflict rate is
the mean, over the run's diagnostics steps (every 50 steps), of the fraction of task pairs
whose gradients on the shared parameters have negative cosine. Finished runs are skipped,
so an interrupted sweep resumes. Writes ``experiments/results/mtl_optim.md`` (table,
Δm% mean ± std over seeds, definition beside it) and ``mtl_optim.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from mtl.config import load_config_file, with_defaults  # noqa: E402
from mtl.train import DELTA_M_DEFINITION  # noqa: E402
from mtl.train.baselines import baseline_config, run_experiment  # noqa: E402
from mtl.train.loop import load_data, run  # noqa: E402

DATASETS = ["multifashion", "multitab0", "multitab0.4", "multitab0.8"]
# name -> optim settings (aggregator, hparams and extras); defaults are the papers'
METHODS = {
    "EW": dict(aggregator="ew"),
    "RLW": dict(aggregator="rlw"),
    "UW": dict(aggregator="uw"),
    "DWA": dict(aggregator="dwa"),
    "GradNorm": dict(aggregator="gradnorm"),
    "MGDA": dict(aggregator="mgda"),
    "MGDA (l2)": dict(aggregator="mgda", hparams=dict(normalize="l2")),
    "MGDA (loss+)": dict(aggregator="mgda", hparams=dict(normalize="loss+")),
    "PCGrad": dict(aggregator="pcgrad"),
    "CAGrad": dict(aggregator="cagrad", hparams=dict(c=0.4)),
    "IMTL-G": dict(aggregator="imtl_g"),
    "Nash-MTL": dict(aggregator="nash_mtl"),
    "Aligned-MTL": dict(aggregator="aligned_mtl"),
    "UPGrad": dict(aggregator="upgrad"),
    "FAMO": dict(aggregator="famo"),
    "FAMO (next batch)": dict(aggregator="famo", hparams=dict(update_on="next_batch")),
    "EW + F-MTL": dict(aggregator="ew", fmtl_rho=0.05),
    "EW + sparse 50%": dict(aggregator="ew", sparse_fraction=0.5),
    "EW + sparse 50% (saliency)": dict(aggregator="ew", sparse_fraction=0.5, sparse_criterion="saliency"),
    "MGDA (repr.)": dict(aggregator="mgda", grad_on="representation"),
    "MGDA (l2, repr.)": dict(aggregator="mgda", hparams=dict(normalize="l2"), grad_on="representation"),
}
# issue 15: the second-generation methods (LibMTL's and TorchJD's that we lacked) and Rep-MTL,
# each at its registry defaults (the papers'); written to mtl_optim_new.md (table of their own:
# the rows above were run with older code and their run directories are not kept)
NEW_METHODS = {
    "GLS": dict(aggregator="gls"),
    "STCH": dict(aggregator="stch"),
    "Constant": dict(aggregator="constant"),
    "GradVac": dict(aggregator="gradvac"),
    "ConFIG": dict(aggregator="config"),
    "FairGrad": dict(aggregator="fairgrad"),
    "Krum": dict(aggregator="krum"),
    "MoDo": dict(aggregator="modo"),
    "SDMGrad": dict(aggregator="sdmgrad"),
    "GradDrop": dict(aggregator="graddrop"),
    "Trimmed mean": dict(aggregator="trimmed_mean"),
    "MoCo": dict(aggregator="moco"),
    "DB-MTL": dict(aggregator="db_mtl"),
    "ExcessMTL": dict(aggregator="excess_mtl"),
    "Rep-MTL": dict(aggregator="ew", grad_on="representation", rep_mtl=0.1),
}
# appended to the full table (why MGDA and FAMO collapse on MultiTab; what the extra rows are)
NOTES = """\
**MGDA and FAMO on MultiTab** (traced with `experiments/mtl_optim_diagnose.py`; not bugs,
properties of the methods). MultiTab has two linear and two quadratic regression tasks. At
initialisation the quadratic tasks' losses are ~3× and their shared-parameter gradients ~2×
those of the linear tasks (ρ = 0.4, seed 0). Under MGDA and FAMO the gap feeds itself: starved
tasks keep large losses and gradients (after ~50 steps: gradients 8–40×, training losses
40–200×; the linear tasks' training losses fall below the noise variance).
- *MGDA* (paper algorithm, no gradient normalisation) picks the min-norm point of the
  gradients' convex hull: for nearly orthogonal gradients w_t ∝ 1/‖g_t‖². Each quadratic task
  gets < 2% of the weight from step ~50 on, the encoder never learns its features, and its test
  MSE ends ~6× the single-task one. The solver is right: the logged weights equal an
  independent SLSQP solve of the logged Gramians. Normalising the gradients before solving,
  the optional step of the authors' code and LibMTL (`optim.hparams.normalize='l2'` or
  `'loss+'`, the solution applied to the normalised gradients as in LibMTL), removes the bias:
  rows *MGDA (l2)*, *MGDA (loss+)*, *MGDA (l2, repr.)*.
- *FAMO* descends Σ z_t log L_t, so w_t ∝ z_t/L_t: the linear tasks' small losses earn them
  most of the weight. Its logits would have to spread by log 100 ≈ 4.6 to compensate. Row
  *FAMO* (the default, `update_on='same_batch'`, as the authors' code) updates the logits from
  the same batch re-evaluated after the step; row *FAMO (next batch)* uses the next batch's
  losses (no extra forward pass, what `mtl.train` did before 2026-11-21): its logits spread
  ≤ 0.45 in 400 steps, since the batch-to-batch noise swamps the one-step change. The
  same-batch update halves the damage but does not remove it.
- Not the cause: MGDA's and FAMO's weights summing to 1 instead of T. With AdamW a common
  factor cancels: EW with w = 1/T and MGDA with w × T train to the same test MSE (4 digits).

Every row was (re-)run on 2026-12-06 with the code of commit 21101fc; each run's cell is recorded in
mtl_optim_runs.jsonl, so `--report` rebuilds the table without the run directories. The MultiTab
means equal those of the table's earlier runs (2026-11-21, run directories not kept) to the digit
but for six cells of MGDA (l2), MGDA (loss+) and CAGrad, which moved by ≤ 0.15; the MultiFashion
means moved by ≤ 0.11.
"""
ALL_METHODS = {**METHODS, **NEW_METHODS}
NEW_NOTES = """\
Same setting as mtl_optim.md (configs/mtl_optim.py, 400 steps, 3 seeds, single-task baselines
trained per dataset and seed), each method at its registry defaults; Rep-MTL is EW with
`optim.rep_mtl=0.1`, `optim.grad_on=representation`. Every cell's runs are recorded in
mtl_optim_new_runs.jsonl (one line per run: dataset, seed, method, Δm, conflict rate, commit),
so `--report` rebuilds this table without the run directories. Rerun everything with
`python experiments/mtl_optim.py --new` (~10 s a run on one core, 180 runs).

Checks that hold in the table: *Constant* (uniform weights by default) equals EW of
mtl_optim.md to the digit. *Krum* with one selected gradient follows a single task per step,
hence its large loss on the others.
"""
LABELS = {"multifashion": "MultiFashion", "multitab0": "MultiTab ρ=0", "multitab0.4": "MultiTab ρ=0.4",
          "multitab0.8": "MultiTab ρ=0.8"}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def make_cfg(dataset, seed, steps=None):
    cfg = load_config_file(os.path.join(ROOT, "configs", "mtl_optim.py") + ":" + dataset)
    cfg.seed = seed
    cfg.data.seed = seed
    if steps:
        cfg.train.steps = steps
        cfg.train.eval_every = cfg.train.log_every = cfg.train.checkpoint_every = max(steps // 2, 1)
        cfg.optim.diagnostics_every = max(steps // 4, 1)
    return with_defaults(cfg)


def done(path):
    return os.path.exists(os.path.join(path, "results.json"))


# Each finished run's cell values are also appended to a committed JSON-lines file next to the
# table (``mtl_optim<tag>_runs.jsonl``): run directories live under runs/ and are not kept, so a
# sweep split over sessions or processes still reports every cell measured so far. One line per
# run (or per method that cannot run on a dataset), appended with O_APPEND; the last line of a
# (dataset, seed, method) wins, and a finished run directory wins over the file.
def store_path(results_dir, tag):
    return os.path.join(results_dir, f"mtl_optim{tag}_runs.jsonl")


def record(store, **fields):
    if store is None:
        return
    os.makedirs(os.path.dirname(store), exist_ok=True)
    line = json.dumps(fields, sort_keys=True) + "\n"
    fd = os.open(store, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:  # one write() of one short line: lines of two processes do not interleave
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_store(store):
    """{(dataset, seed, method): record}, the last line of each key winning."""
    out = {}
    if store and os.path.exists(store):
        with open(store) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    out[(r["dataset"], int(r["seed"]), r["method"])] = r
                except (ValueError, KeyError) as e:
                    raise ValueError(f"{store}:{n}: not a run record ({e}); fix or delete that line") from None
    return out


def not_applicable(cfg, num_tasks):
    """The reason the method cannot run with ``num_tasks`` tasks, or None
    (:func:`mtl.optim.too_few_tasks`)."""
    from mtl.optim import too_few_tasks
    from mtl.train.spec import OptimSpec
    return too_few_tasks(OptimSpec.from_config(cfg.optim).make_aggregator(), num_tasks) or None


def commit_id():
    import subprocess
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def conflict_rate(workdir):
    vals = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("split") == "diagnostics":
                vals.append(r["conflict_fraction"])
    return float(np.mean(vals)) if vals else float("nan")


def sweep(root, datasets, methods, seeds, steps, quiet, store=None):
    total = len(datasets) * len(seeds) * len(methods)
    k, t0 = 0, time.time()
    out = {}
    stored = read_store(store)
    rev = commit_id()
    for seed in seeds:  # seed-major: an early stop leaves whole seeds finished
        for ds in datasets:
            base = make_cfg(ds, seed, steps)
            bdir = os.path.join(root, ds, f"seed{seed}", "baselines")
            _, infos, _, _ = load_data(base)
            for info in infos:
                d = os.path.join(bdir, info.name)
                if not done(d):
                    print(f"[sweep] {ds} seed {seed}: single-task baseline {info.name}", flush=True)
                    run(baseline_config(base, info.name), d, overwrite=True)
            for m in methods:
                k += 1
                wd = os.path.join(root, ds, f"seed{seed}", slug(m))
                res_path = os.path.join(wd, "results.json")
                res = json.load(open(res_path)) if done(wd) else None
                cfg = make_cfg(ds, seed, steps)
                for key, v in ALL_METHODS[m].items():
                    cfg.optim[key] = v
                why = not_applicable(cfg, len(infos))
                if why is not None:
                    print(f"[sweep {k}/{total}] {ds} seed {seed} {m:<16} not applicable: {why}", flush=True)
                    if stored.get((ds, seed, m), {}).get("not_applicable") != why:
                        record(store, dataset=ds, seed=seed, method=m, not_applicable=why, commit=rev)
                    continue
                if res is None or "delta_m_test" not in res:
                    cfg.name = f"{ds}/{m}/seed{seed}"
                    cfg.baselines.from_dir = bdir
                    t1 = time.time()
                    res = run_experiment(cfg, wd, overwrite=True)
                    took = time.time() - t1
                else:
                    took = 0.0
                dm, cr = res["delta_m_test"]["delta_m"], conflict_rate(wd)
                old = stored.get((ds, seed, m), {})
                if took or (old.get("delta_m"), old.get("conflict")) != (dm, cr):
                    record(store, dataset=ds, seed=seed, method=m, delta_m=dm, conflict=cr, commit=rev,
                           date=time.strftime("%Y-%m-%d"))
                out.setdefault(ds, {}).setdefault(m, []).append((dm, cr))
                el = time.time() - t0
                print(f"[sweep {k}/{total}] {ds} seed {seed} {m:<16} Δm {dm:+7.2f}%  conflict {cr:.2f}  "
                      f"({'cached' if not took else f'{took:.0f}s'}; elapsed {el / 60:.1f} min)", flush=True)
    return out


def write_outputs(out, datasets, methods, seeds, results_dir, tag):
    os.makedirs(results_dir, exist_ok=True)
    lines = [f"# Multi-task optimisation methods ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})", "",
             DELTA_M_DEFINITION + " Test split, model selected on validation (carved from train). "
             "Cells: Δm% mean ± std over seeds / conflict rate = mean fraction of task pairs with "
             "cos(g_s, g_t) < 0 on the shared parameters (representation for 'repr.'), "
             "sampled every 50 steps during training.", "",
             "| method | " + " | ".join(LABELS[d] for d in datasets) + " |",
             "|---|" + "---|" * len(datasets)]
    notes = {}  # reason a method cannot run -> where
    for m in methods:
        cells = []
        for d in datasets:
            v = out.get(d, {}).get(m, [])
            if isinstance(v, str):
                cells.append("n/a")
                notes.setdefault(v, []).append(f"{m} on {LABELS[d]}")
                continue
            v = np.array(v)
            if not len(v):
                cells.append("not yet run")
                continue
            n = f" (n={len(v)})" if len(v) != len(seeds) else ""
            cells.append(f"{v[:, 0].mean():+.2f} ± {v[:, 0].std():.2f} / {np.nanmean(v[:, 1]):.2f}{n}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for why, where in notes.items():
        lines += ["", f"n/a ({', '.join(where)}): {why[len('n/a: '):]}"]
    if tag == "":
        lines += ["", NOTES.rstrip()]
    elif tag == "_new":
        lines += ["", NEW_NOTES.rstrip()]
    md = os.path.join(results_dir, f"mtl_optim{tag}.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 0.32 * len(methods) + 1.5),
                             sharey=True)
    axes = np.atleast_1d(axes)
    for ax, d in zip(axes, datasets):
        runs = [[] if isinstance(out.get(d, {}).get(m), str) else [x[0] for x in out.get(d, {}).get(m, [])]
                for m in methods]  # [] = not yet run or n/a
        mean = [np.mean(r) if r else 0.0 for r in runs]
        std = [np.std(r) if r else 0.0 for r in runs]
        y = np.arange(len(methods))
        ax.barh(y, mean, xerr=std, color=["C0" if v >= 0 else "C3" for v in mean])
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y, methods)
        ax.set_title(LABELS[d])
        ax.set_xlabel("Δm% (test)")
    axes[0].invert_yaxis()  # the y axis is shared: invert it once (table order, top to bottom)
    fig.tight_layout()
    png = os.path.join(results_dir, f"mtl_optim{tag}.png")
    fig.savefig(png, dpi=110)
    print(f"wrote {md} and {png}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.join(ROOT, "runs", "mtl_optim"))
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS,
                    help="run only these (e.g. to split the sweep over processes)")
    ap.add_argument("--report", action="store_true", help="only write the table/plot from finished runs")
    ap.add_argument("--methods", nargs="+", default=None, choices=list(ALL_METHODS),
                    help="default: the table's methods (METHODS; with --new, NEW_METHODS)")
    ap.add_argument("--new", action="store_true",
                    help="the second-generation methods and Rep-MTL (NEW_METHODS) -> mtl_optim_new.md; "
                         "cells of runs not yet finished are marked 'not yet run'")
    a = ap.parse_args(argv)
    if a.quick:
        datasets, methods, seeds, steps, tag = ["multitab0.4", "multifashion"], ["EW", "MGDA", "FAMO"], [0], 60, "_quick"
        root = a.root + "_quick"
    else:
        default = list(NEW_METHODS) if a.new else list(METHODS)
        datasets, methods, seeds, steps, root = DATASETS, a.methods or default, list(range(a.seeds)), None, a.root
        tag = "_new" if a.new else ""
    store = None if a.quick else store_path(a.results, tag)
    if a.report:
        out = collect(root, datasets, methods, seeds, partial=a.new, store=store)
    else:
        out = sweep(root, [d for d in datasets if d in a.datasets], methods, seeds, steps, quiet=True,
                    store=store)
        if a.new:  # the table of every finished run so far; the rest is marked as not yet run
            out = collect(root, datasets, methods, seeds, partial=True, store=store)
        elif set(a.datasets) != set(datasets):
            return
    write_outputs(out, datasets, methods, seeds, a.results, tag)


def collect(root, datasets, methods, seeds, partial=False, store=None):
    """Finished runs' (Δm, conflict rate) by dataset and method, from the run directories and,
    for runs whose directory is gone, the committed run records (``store``). Methods that cannot
    run on a dataset come back as ``out[d][m] = "n/a: <reason>"``. ``partial``: skip runs not
    yet finished (their cells read 'not yet run') instead of refusing."""
    out = {}
    stored = read_store(store)
    for d in datasets:
        for m in methods:
            for seed in seeds:
                wd = os.path.join(root, d, f"seed{seed}", slug(m))
                rec = stored.get((d, seed, m), {})
                if done(wd):
                    res = json.load(open(os.path.join(wd, "results.json")))
                    cell = (res["delta_m_test"]["delta_m"], conflict_rate(wd))
                elif "not_applicable" in rec:
                    out.setdefault(d, {})[m] = "n/a: " + rec["not_applicable"]
                    continue
                elif "delta_m" in rec:
                    cell = (rec["delta_m"], rec["conflict"])
                elif partial:
                    continue
                else:
                    raise FileNotFoundError(f"{wd} has not finished and {store} has no record of it; "
                                            "run the sweep first")
                out.setdefault(d, {}).setdefault(m, []).append(cell)
    return out


if __name__ == "__main__":
    main()
