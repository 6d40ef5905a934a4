"""Watch one aggregator train: weights, losses, gradient and update norms over time.

    python experiments/mtl_optim_diagnose.py                         # EW, MGDA, FAMO on MultiTab ρ=0.4
    python experiments/mtl_optim_diagnose.py --methods mgda mgda:normalize=l2 --dataset multitab0 --seed 1

Each method is ``name`` or ``name:key=value,...`` (aggregator hyper-parameters), trained
with the same config as ``experiments/mtl_optim.py`` (``configs/mtl_optim.py``). Every
``--every`` steps it prints the weights, the per-task training losses, the norm of the
parameter update of the shared encoder and of the heads, and the per-task gradient
norms on the shared parameters (FAMO: also its logits ξ; plain MGDA: the largest
difference between its weights and an independent SLSQP solve of the step's Gramian). At the end: each task's test
MSE and its change relative to the single-task baseline of ``experiments/mtl_optim.py``
(if that sweep has run; last step, MSE only — not the table's Δm, which also averages
MAE and selects the step on validation).

Diagnostic variants (not library methods):
  ``ew_over_t``       EW with w = 1/T (does the sum of the weights matter?)
  ``mgda_times_t``    MGDA weights × T

FAMO: ``famo`` updates its logits from the same batch re-evaluated after the step (the
library default, as the authors' code), ``famo:update_on=next_batch`` from the next batch.

This is how the MGDA/FAMO collapse on MultiTab in ``results/mtl_optim.md`` was traced.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mtl.config import load_config_file, with_defaults  # noqa: E402
from mtl.data.pipeline import TrainBatches, eval_batches  # noqa: E402
from mtl.optim import gradient, registry, weighting  # noqa: E402
from mtl.train.loop import build, load_data  # noqa: E402


def _scaled(factory, factor, name):
    def make(**hp):
        base = factory(**hp)

        def weights(state, **kw):
            w, st = base.weights(state, **kw)
            return w * factor(w.shape[0]), st

        return dataclasses.replace(base, name=name, weights=weights)
    return make


VARIANTS = {
    "ew_over_t": _scaled(weighting.ew, lambda t: 1.0 / t, "ew_over_t"),
    "mgda_times_t": _scaled(gradient.mgda, float, "mgda_times_t"),
}


def parse(spec):
    name, _, rest = spec.partition(":")
    hp = {}
    for kv in filter(None, rest.split(",")):
        k, v = kv.split("=", 1)
        try:
            v = int(v)
        except ValueError:
            try:
                v = float(v)
            except ValueError:
                pass
        hp[k] = v
    return name, hp


def norm(tree, heads: bool):
    sq = [jnp.sum(x * x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if ("heads" in jax.tree_util.keystr(p)) == heads]
    return float(jnp.sqrt(sum(sq))) if sq else 0.0


def slsqp_min_norm(gram):
    """argmin_{w ∈ simplex} wᵀ G w by scipy's SLSQP: an independent check of MGDA's weights."""
    from scipy.optimize import minimize
    t = gram.shape[0]
    res = minimize(lambda w: w @ gram @ w, np.full(t, 1.0 / t), jac=lambda w: 2 * gram @ w, method="SLSQP",
                   bounds=[(0, 1)] * t, constraints=({"type": "eq", "fun": lambda w: np.sum(w) - 1},),
                   options={"ftol": 1e-12, "maxiter": 500})
    return res.x


def run_one(spec, dataset, seed, steps_n, every, runs_root):
    name, hp = parse(spec)
    registry.AGGREGATORS.update({k: v for k, v in VARIANTS.items() if k not in registry.AGGREGATORS})
    cfg = load_config_file(os.path.join(ROOT, "configs", "mtl_optim.py") + ":" + dataset)
    cfg.seed = cfg.data.seed = seed
    cfg.optim.aggregator, cfg.optim.hparams = name, hp
    cfg.train.steps = steps_n
    cfg = with_defaults(cfg)
    bundle, infos, train, _ = load_data(cfg)
    steps = build(cfg, bundle, infos)
    names = [i.name for i in infos]
    state = steps.init()
    batches = TrainBatches(train, cfg.train.batch_size, cfg.data.seed, steps.batch_sharding)
    cols = " ".join(f"{n:>7}" for n in names)
    print(f"\n=== {spec} on {dataset}, seed {seed}")
    print(f"{'step':>5} | weights {cols} | train loss {cols} | ‖Δθ‖ enc    heads | ‖g_t‖ shared {cols}")
    for k in range(steps_n):
        before = jax.tree.map(jnp.copy, state.params)
        diag = k == 0 or (k + 1) % every == 0
        batch = batches[k]
        state, m = steps.step(state, batch, diagnostics=diag)
        if not diag:
            continue
        delta = jax.tree.map(jnp.subtract, state.params, before)
        m = jax.device_get(m)
        f = lambda v: " ".join(f"{x:7.4f}" for x in np.asarray(v))  # noqa: E731
        gn = m.get("grad_norms", np.full(len(names), np.nan))
        extra = ""
        if name.startswith("famo"):
            extra = " | ξ " + " ".join(f"{x:+.2f}" for x in np.asarray(state.agg_state["main"][0]))
        if name == "mgda" and hp.get("normalize", "none") == "none" and "cosines" in m:
            # the logged Gramian (norms and cosines of the step) solved independently
            n = np.asarray(gn, np.float64)
            w_ref = slsqp_min_norm(np.asarray(m["cosines"], np.float64) * np.outer(n, n))
            extra += f" | max |w - w_SLSQP| {np.max(np.abs(np.asarray(m['weights']) - w_ref)):.1e}"
        print(f"{k + 1:>5} | {f(m['weights'])} | {f(m['losses'])} | {norm(delta, False):8.2e} "
              f"{norm(delta, True):8.2e} | {f(gn)}{extra}", flush=True)
    test = steps.evaluate(state, eval_batches(bundle.test, 500, steps.batch_sharding))
    parts, rel = [], []
    for n in names:
        part = f"{n} {test[n]['mse']:.4f}"
        path = os.path.join(runs_root, dataset, f"seed{seed}", "baselines", n, "results.json")
        if os.path.exists(path):
            stl = json.load(open(path))["test"][n]["mse"]
            rel.append(-(test[n]["mse"] - stl) / stl * 100)
            part += f" (single-task {stl:.4f}: {rel[-1]:+.0f}%)"
        parts.append(part)
    summary = f" | mean {np.mean(rel):+.1f}%" if len(rel) == len(names) else ""
    print("test MSE: " + ", ".join(parts) + summary)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["ew", "mgda", "famo"])
    ap.add_argument("--dataset", default="multitab0.4", help="an argument of configs/mtl_optim.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="default: the config's train.steps")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "mtl_optim"),
                    help="experiments/mtl_optim.py's --root, for the single-task baselines")
    a = ap.parse_args(argv)
    steps_n = a.steps or int(load_config_file(os.path.join(ROOT, "configs", "mtl_optim.py") + ":"
                                              + a.dataset).train.steps)
    for spec in a.methods:
        run_one(spec, a.dataset, a.seed, steps_n, a.every, a.runs)


if __name__ == "__main__":
    main()
