"""The ``mtl merge`` driver: artifacts in, merged artifact + coefficients + per-task results out.

    mtl merge --config configs/merge_ties.py --workdir runs/merge/ties [--config.kwargs.k=20]

1. Loads the pretrained artifact (its model definition) and one fine-tuned
   artifact per task (same parameter tree; a mismatch names the first path
   and both shapes).
2. ``θ0`` = pretrained parameters with each task's head (``head_path``) taken
   from that task's fine-tune; task vectors ``τ_t = θ_t − θ0`` on the paths
   not excluded (``exclude=("heads/*",)`` by default).
3. Runs ``method`` (see :data:`mtl.merging.config.METHODS`), evaluates every
   task's head on its test split.
4. Writes ``WORKDIR/merged.mtl`` (artifact; for Twin-Merging the shared expert
   θ*, plus ``twin.npz`` with the compressed exclusive vectors and the router),
   ``coeffs.json`` for adaptive methods (reuse: ``--config.coeffs_from=...``),
   ``results.json``, ``results.md`` and ``config.json``.
"""
from __future__ import annotations

import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl.merging import adaptive as ad
from mtl.merging.config import METHODS
from mtl.merging.tree import flatten, task_vectors, unflatten

DATASETS = {"merge8": "mtl.merging.benchmark:load_tasks", "npz": "mtl.merging.run:load_npz_tasks"}


def load_npz_tasks(path: str) -> dict:
    """Per-task data from one ``.npz`` with arrays ``<task>/<split>/x`` and ``<task>/<split>/y``."""
    out: dict = {}
    with np.load(path) as z:
        for key in z.files:
            parts = key.split("/")
            if len(parts) != 3 or parts[2] not in ("x", "y"):
                raise ValueError(f"{path}: array {key!r} is not named <task>/<split>/x or <task>/<split>/y")
            out.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = z[key]
    return {t: {s: (v["x"], v["y"]) for s, v in splits.items()} for t, splits in out.items()}


def log(msg):
    print(msg, flush=True)


def load_dataset(cfg):
    import importlib

    name = cfg.data.name
    if name not in DATASETS:
        raise ValueError(f"unknown merge dataset {name!r}; valid: {', '.join(DATASETS)}")
    mod, fn = DATASETS[name].split(":")
    return getattr(importlib.import_module(mod), fn)(**dict(cfg.data.kwargs))


def load_models(cfg):
    """``(graphdef, rest, pretrained_params, {task: finetuned_params}, tasks, meta)`` (pure dicts)."""
    from mtl import checkpoint as ckpt
    from mtl.artifact import load_model

    if not cfg.pretrained:
        raise ValueError("config.pretrained is empty: give the pretrained model's artifact")
    model, meta = load_model(cfg.pretrained)
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    pre = jax.device_get(nnx.to_pure_dict(params))
    tasks = list(cfg.tasks) or list(cfg.finetuned.keys())
    if not tasks:
        raise ValueError("config.finetuned is empty: map each task to its fine-tuned artifact")
    fts = {}
    for t in tasks:
        if t not in cfg.finetuned:
            raise ValueError(f"task {t!r} has no fine-tuned artifact in config.finetuned")
        fts[t], _ = ckpt.load_artifact_params(cfg.finetuned[t], expected=pre)
    return graphdef, rest, pre, fts, tasks, meta


def with_heads(pre, fts, tasks, head_path):
    flat = dict(flatten(pre))
    for t in tasks:
        prefix = head_path.format(task=t)
        ft = flatten(fts[t])
        hits = [p for p in flat if p == prefix or p.startswith(prefix + "/")]
        if not hits:
            raise ValueError(f"no parameter under {prefix!r} (head_path) for task {t!r}")
        for p in hits:
            flat[p] = ft[p]
    return unflatten(flat, like=pre)


def evaluate(apply_fn, params, data, tasks, batch_size=1000, split="test"):
    f = jax.jit(apply_fn)
    acc = {}
    for t in tasks:
        x, y = data[t][split]
        correct = 0
        for i in range(0, len(x), batch_size):
            correct += int(np.sum(np.argmax(np.asarray(f(params, x[i:i + batch_size])[t]), -1) == y[i:i + batch_size]))
        acc[t] = correct / len(x)
    return acc


def evaluate_tasks(apply_fn, params, data, tasks, batch_size=1000, split="test") -> dict:
    """``{task: {"loss": mean, metric: mean, ...}}`` with each task's own loss and metrics
    (``mtl.tasks.Task``: accuracy for classification heads, mse/mae for regression), as
    ``mtl train`` reports them. ``tasks``: Task objects (from the artifact's metadata)."""
    f = jax.jit(apply_fn)
    out = {}
    for task in tasks:
        x, y = data[task.name][split]
        fns = {"loss": task.loss, **dict(task.metrics)}
        sums = dict.fromkeys(fns, 0.0)
        for i in range(0, len(x), batch_size):
            pred = f(params, x[i:i + batch_size])[task.name]
            label = jnp.asarray(y[i:i + batch_size])
            for k, fn in fns.items():
                sums[k] += float(np.sum(np.asarray(fn(pred, label), np.float64)))
        out[task.name] = {k: v / len(x) for k, v in sums.items()}
    return out


def linear_input_grams(graphdef, params, rest, x, prefix="encoder/"):
    """``{kernel path: XᵀX}`` of the inputs of every ``nnx.Linear`` under ``prefix`` on inputs ``x``."""
    from mtl.merging.regmean import gram

    model = nnx.merge(graphdef, params, *rest)
    names = {id(m): "/".join(str(k) for k in path) for path, m in model.iter_modules()}
    grams, orig = {}, nnx.Linear.__call__

    def patched(self, inp):
        name = names.get(id(self), "")
        if (name + "/").startswith(prefix):
            g = gram(inp)
            key = f"{name}/kernel"
            grams[key] = g if key not in grams else grams[key] + g
        return orig(self, inp)

    nnx.Linear.__call__ = patched
    try:
        for i in range(0, len(x), 256):
            model(jnp.asarray(x[i:i + 256]))
    finally:
        nnx.Linear.__call__ = orig
    return grams


def _batches(data, tasks, n, seed, split, labelled=False):
    rng = np.random.default_rng(seed)

    def get(i):
        out = {}
        for t in tasks:
            x, y = data[t][split]
            idx = rng.integers(0, len(x), size=n)
            out[t] = (x[idx], y[idx]) if labelled else x[idx]
        return out

    return get


def merge(cfg, graphdef, rest, pre, fts, tasks, data, workdir=None):
    """Run ``cfg.method``; returns ``(apply_fn_for_eval, params, extras)``."""
    apply_fn = ad.apply_from_graphdef(graphdef, *rest)
    theta0 = with_heads(pre, fts, tasks, cfg.head_path)
    method, kw = cfg.method, dict(cfg.kwargs)
    extras = {}
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    if method == "pretrained":
        return apply_fn, theta0, extras
    if method == "individual":
        return None, None, extras
    include, exclude = list(cfg.include) or None, list(cfg.exclude)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        tvs = task_vectors([fts[t] for t in tasks], theta0, include, exclude, names=tasks)
    if method in ("average", "task_arithmetic", "ties", "dare"):
        from mtl.merging.registry import get_merger

        return apply_fn, get_merger(method, **kw)(theta0, tvs), extras
    if method == "fisher":
        from mtl.merging.fisher import estimate_fisher, fisher

        fishers = []
        for t in tasks:
            x = data[t]["train"][0][:cfg.fisher.num_examples]
            fishers.append(estimate_fisher(lambda p, xb, t=t: apply_fn(p, xb)[t], fts[t], x,
                                           labels=cfg.fisher.labels, seed=cfg.seed))
        return apply_fn, fisher(theta0, tvs, fishers=fishers, **kw), extras
    if method == "regmean":
        from mtl.merging.regmean import regmean

        grams = [linear_input_grams(graphdef, fts[t], rest, data[t]["train"][0][:cfg.regmean.num_examples])
                 for t in tasks]
        return apply_fn, regmean(theta0, tvs, grams=grams, **kw), extras
    a = cfg.adaptive
    if method in ("adamerging", "atlas"):
        if method == "adamerging" and a.ties_k:
            tvs = ad.ties_masked_vectors(tvs, a.ties_k)
        sup = method == "atlas" and a.objective == "xent"
        ada = ad.AdaptiveMerge(
            apply_fn, theta0, tvs, tasks,
            granularity=a.granularity if method == "adamerging" else "block",
            init_value=a.init, lr=a.lr, clamp=(0.0, 1.0) if (a.clamp and method == "adamerging") else None,
            objective="xent" if sup else "entropy", num_parts=a.num_parts if method == "atlas" else 1,
            seed=cfg.seed, l1=a.l1, l2=a.l2)
        if cfg.coeffs_from:
            coeffs, meta = ad.load_coeffs(cfg.coeffs_from)
            log(f"coefficients from {cfg.coeffs_from} ({meta.get('method')}); no adaptation")
        else:
            if sup:  # few-shot: a fixed labelled subset of the training split
                rng = np.random.default_rng(cfg.seed)
                shots = {}
                for t in tasks:
                    x, y = data[t]["train"]
                    idx = rng.choice(len(x), min(a.shots, len(x)), replace=False)
                    shots[t] = {"train": (x[idx], y[idx])}
                batches = _batches(shots, tasks, a.batch_size, cfg.seed, "train", labelled=True)
            else:  # AdaMerging: unlabelled test inputs
                batches = _batches(data, tasks, a.batch_size, cfg.seed, cfg.eval.split)
            t0 = time.time()
            coeffs, hist = ada.fit(batches, a.steps, log_every=a.log_every, log=log)
            extras["adapt_seconds"] = time.time() - t0
            extras["objective_first_last"] = [hist[0], hist[-1]]
        extras["coeffs"] = coeffs
        extras["coeffs_meta"] = {"method": method, "granularity": ada.granularity, "tasks": tasks,
                                 "num_parts": ada.num_parts, "seed": cfg.seed, "ties_k": a.ties_k}
        return apply_fn, ada.merged(coeffs), extras
    if method == "twin":
        from mtl.merging.twin import TwinMerge, train_router

        tc = cfg.twin
        twin = TwinMerge.build(theta0, tvs, tasks, lam=tc.lam, rank_frac=tc.rank_frac, keep_vectors=tc.keep_vectors)

        def features_fn(params, x):
            return nnx.merge(graphdef, params, *rest).features(x)

        rng = np.random.default_rng(cfg.seed)

        def router_batches(i):
            return [data[t]["train"][0][rng.integers(0, len(data[t]["train"][0]), tc.router_batch)] for t in tasks]

        twin = twin.with_router(train_router(features_fn, twin.shared, router_batches, len(tasks),
                                             steps=tc.router_steps, lr=tc.router_lr, seed=cfg.seed))
        f = twin.make_apply(apply_fn, features_fn, mode=tc.mode)
        stored, dense = twin.num_stored()
        extras.update(twin=twin, twin_stored=stored, twin_dense=dense)

        def twin_apply(params, x):  # params unused: θ(x) is built per input
            return f(x)

        return twin_apply, twin.shared, extras
    raise AssertionError(method)


def metrics_markdown(name: str, metrics: dict, tasks) -> str:
    """Per-task metrics of one merge as a markdown table (each task's own metrics)."""
    lines = ["| method | task | metric | value |", "|---|---|---|---:|"]
    for t in tasks:
        for k, v in metrics[t].items():
            lines.append(f"| {name} | {t} | {k} | {v:.4f} |")
    return "\n".join(lines) + "\n"


def results_markdown(rows: dict, tasks) -> str:
    head = "| method | avg | " + " | ".join(tasks) + " |\n|---|---|" + "---|" * len(tasks) + "\n"
    lines = [f"| {m} | {100 * np.mean(list(a.values())):.1f} | " + " | ".join(f"{100 * a[t]:.1f}" for t in tasks)
             + " |" for m, a in rows.items()]
    return head + "\n".join(lines) + "\n"


def run_merge(cfg, workdir: str, *, overwrite: bool = False, data=None) -> dict:
    from mtl import checkpoint as ckpt

    os.makedirs(workdir, exist_ok=True)
    res_path = os.path.join(workdir, "results.json")
    if os.path.exists(res_path) and not overwrite:
        raise FileExistsError(f"{workdir} already holds merge results; pass --overwrite to replace them")
    t0 = time.time()
    graphdef, rest, pre, fts, tasks, meta = load_models(cfg)
    data = load_dataset(cfg) if data is None else data
    log(f"merge {cfg.method} of {len(tasks)} tasks: {', '.join(tasks)}")
    apply_fn, params, extras = merge(cfg, graphdef, rest, pre, fts, tasks, data, workdir)
    from mtl.artifact import tasks_from_json

    task_objs = {tk.name: tk for tk in tasks_from_json(meta["tasks"])}
    missing = [t for t in tasks if t not in task_objs]
    if missing:
        raise ValueError(f"the pretrained artifact has no task {missing[0]!r} (its tasks: {', '.join(task_objs)})")
    if cfg.method == "individual":
        base = ad.apply_from_graphdef(graphdef, *rest)
        metrics = {t: evaluate_tasks(base, fts[t], data, [task_objs[t]], cfg.eval.batch_size, cfg.eval.split)[t]
                   for t in tasks}
    else:
        metrics = evaluate_tasks(apply_fn, params, data, [task_objs[t] for t in tasks], cfg.eval.batch_size,
                                 cfg.eval.split)
    acc = {t: metrics[t]["accuracy"] for t in tasks if "accuracy" in metrics[t]}
    out = {"method": cfg.method, "name": cfg.name or cfg.method, "tasks": tasks, "metrics": metrics,
           "accuracy": acc, "avg_accuracy": float(np.mean(list(acc.values()))) if acc else None,
           "seconds": time.time() - t0}
    for k in ("adapt_seconds", "objective_first_last", "twin_stored", "twin_dense"):
        if k in extras:
            out[k] = extras[k]
    if "coeffs" in extras:
        out["coeffs"] = ad.save_coeffs(os.path.join(workdir, "coeffs.json"), extras["coeffs"], extras["coeffs_meta"])
    if "twin" in extras:
        tw = extras["twin"]
        arrays = {"router/w": np.asarray(tw.router["w"]), "router/b": np.asarray(tw.router["b"])}
        for k, ex in enumerate(tw.exclusive):
            for p, c in ex.items():
                if c is not None:
                    for n, v in c.items():
                        if n not in ("shape", "dtype"):
                            arrays[f"{tasks[k]}/{p}/{n}"] = np.asarray(v)
        np.savez(os.path.join(workdir, "twin.npz"), **arrays)
    if cfg.export and params is not None:
        out["artifact"] = ckpt.export_artifact(
            os.path.join(workdir, "merged.mtl"), jax.device_get(params),
            {**{k: v for k, v in meta.items() if k not in ("params", "format")},
             "merge": {"method": cfg.method, "kwargs": dict(cfg.kwargs), "tasks": tasks,
                       "finetuned": dict(cfg.finetuned), "pretrained": cfg.pretrained}},
            overwrite=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, default=str)
    with open(res_path, "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(results_markdown({out["name"]: acc}, tasks) if len(acc) == len(tasks)
                else metrics_markdown(out["name"], metrics, tasks))
    log(f"{out['name']}: " + ", ".join(f"{t}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics[t].items())
                                       for t in tasks)
        + (f" | average accuracy {100 * out['avg_accuracy']:.1f}%" if acc else ""))
    return out
