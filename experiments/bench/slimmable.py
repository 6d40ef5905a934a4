"""FLOPs and latency of each width configuration of the slimmable dense model, vs the widest.

    python experiments/bench/slimmable.py [--encoders cnn vit mlp] [--batch 32] [--repeats 20]
                                          [--out experiments/results/slimmable_bench.md]

The model is ``configs/slimmable_dense.py``'s (DenseFashion shapes: 32x32x1 input, tasks
seg/depth/edges), with random weights (cost does not depend on their values). For each
uniform width (encoder and every decoder at ``w``) and one mixed configuration it prints
the FLOPs per example from XLA's cost analysis of the compiled forward, the latency of one
batch (minimum over ``--repeats`` interleaved rounds, after a warm-up round), both as ratios to the widest configuration, and "latency/FLOPs" (the ratio
of the two ratios: 1 = latency follows FLOPs exactly). Last, the number of compilations
when switching between the warmed-up configurations (must be 0). All figures of one
encoder come from one run of this script; the CPU is shared, so compare ratios.

``--train`` adds the sandwich rule's train-step cost: one jitted step of the config's
sandwich rule (n configurations: widest, narrowest, n-2 random, with in-place distillation
and CIKD) against n separate steps, each training one uniform configuration alone
(``sandwich.only``: the widths 1, 0.25 and n-2 between), at the same batch; the ratio
t(sandwich) / sum t(separate) is the overhead of fusing (goal <= 1.0).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from mtl.nn import slimmable as S  # noqa: E402
from mtl.nn.build import model_factory  # noqa: E402
from mtl.nn.heads import DenseRegression, Edges, Segmentation  # noqa: E402
from mtl.tasks import Task  # noqa: E402

SHAPE = (32, 32, 1)
TASKS = [Task("seg", Segmentation(11)), Task("depth", DenseRegression(1)), Task("edges", Edges())]


def _model(encoder: str):
    from mtl.config import load_config_file

    cfg = load_config_file(os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                        f"slimmable_dense.py:{encoder}"))
    factory = model_factory(cfg.model, TASKS, SHAPE)
    with nnx.use_eager_sharding(False):
        graph, state = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda s: jax.random.key(0) if jnp.issubdtype(s.dtype, jax.dtypes.prng_key)
                         else 0.1 * jax.random.normal(next(keys), s.shape, s.dtype) if jnp.issubdtype(s.dtype, jnp.floating)
                         else jnp.zeros(s.shape, s.dtype), state)  # counters, raw key data
    return nnx.merge(graph, state)


def bench(encoder: str, batch: int, repeats: int) -> list[str]:
    m = _model(encoder)
    configs = [(f"uniform {w}", S.WidthConfig.uniform(w, m.task_names)) for w in reversed(m.widths)]
    configs.append(("enc 0.5, seg 1.0, depth/edges 0.25", S.WidthConfig(0.5, {"seg": 1.0, "depth": 0.25, "edges": 0.25})))
    graph, state = nnx.split(m)
    x = jnp.zeros((batch,) + SHAPE)
    fls = [S.flops(m, cfg, SHAPE, batch=batch) / batch for _, cfg in configs]
    lats = [float("inf")] * len(configs)
    for _ in range(repeats):          # interleaved rounds: load changes hit every configuration alike
        for i, (_, cfg) in enumerate(configs):
            t0 = time.perf_counter()
            jax.block_until_ready(S.forward(graph, state, x, cfg))
            lats[i] = min(lats[i], time.perf_counter() - t0)
    rows, base = [], (fls[0], lats[0])
    for (name, cfg), fl, lat in zip(configs, fls, lats):
        rows.append(f"| {encoder} | {name} | {fl / 1e6:.2f} | {fl / base[0]:.3f} | {lat * 1e3:.2f} | "
                    f"{lat / base[1]:.3f} | {(lat / base[1]) / (fl / base[0]):.2f} |")
    before = S.forward._cache_size()
    for _ in range(2):
        for _, cfg in configs:
            jax.block_until_ready(S.forward(graph, state, x, cfg))
    rows.append(f"| {encoder} | compilations when switching widths after warm-up | {S.forward._cache_size() - before} | | | | |")
    return rows


def _steps(encoder: str, sandwich: dict):
    from mtl.config import load_config_file
    from mtl import sharding as shd
    from mtl.train.optimizer import make_optimizer
    from mtl.train.step import Steps

    cfg = load_config_file(os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                        f"slimmable_dense.py:{encoder}"))
    ak = dict(cfg.model.arch_kwargs)
    ak["sandwich"] = dict(ak["sandwich"], **sandwich)
    cfg.model.arch_kwargs = ak
    factory = model_factory(cfg.model, TASKS, SHAPE)
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    return Steps(factory, TASKS, make_optimizer("adam", 1e-3, 10, schedule="constant"), mesh), ak


def _batch(n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return {"inputs": rng.uniform(size=(n,) + SHAPE).astype(np.float32),
            "labels": {"seg": rng.integers(0, 11, (n, 32, 32)).astype(np.int32),
                       "depth": rng.uniform(size=(n, 32, 32, 1)).astype(np.float32),
                       "edges": (rng.uniform(size=(n, 32, 32, 1)) < 0.1).astype(np.float32)},
            "masks": {t: np.ones(n, bool) for t in ("seg", "depth", "edges")}}


def _step_time(steps, batch, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one step, each the minimum over ``repeats`` steps of every
    train variant (the sandwich groups, all compiled first). CPU time (all of this
    process's threads) is the steadier measure of the work on a loaded machine."""
    state = steps.init()
    b = steps.put_batch(batch)
    # one step number per train variant (the sandwich rule's groups), each compiled first
    G = steps.forward.variants
    at = [next(s for s in range(1000) if steps.variant_of(s) == v) for v in range(G)]
    for s in at:
        state, m = steps.step(state, b, step=s)
        jax.block_until_ready(m)
    wall = cpu = float("inf")
    for i in range(repeats * G):
        t0, c0 = time.perf_counter(), time.process_time()
        state, m = steps.step(state, b, step=at[i % G])
        jax.block_until_ready(m)
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


def bench_train(encoder: str, batch: int, repeats: int) -> list[str]:
    """Sandwich step (n configurations) vs n separate single-configuration steps."""
    fused, ak = _steps(encoder, {})
    n, widths = int(ak["sandwich"]["n"]), sorted(ak["widths"])
    # n separate steps: the widest, the narrowest and n-2 widths between (uniform configurations)
    between = [w for w in widths if w not in (min(widths), max(widths))]
    singles = [max(widths), min(widths)] + [between[i % len(between)] for i in range(n - 2)] if between else \
        [max(widths), min(widths)][:n]
    data = _batch(batch)
    t_fused = _step_time(fused, data, repeats)
    t_single = {}
    for w in singles:
        if w not in t_single:
            st, _ = _steps(encoder, {"only": float(w), "n": 1})
            t_single[w] = _step_time(st, data, repeats)
    total = [sum(t_single[w][i] for w in singles) for i in (0, 1)]
    rows = [f"| {encoder} | {n} | {t_fused[0] * 1e3:.1f} / {t_fused[1] * 1e3:.1f} | "
            + ", ".join(f"{w}: {t_single[w][0] * 1e3:.1f} / {t_single[w][1] * 1e3:.1f}" for w in singles)
            + f" | {total[0] * 1e3:.1f} / {total[1] * 1e3:.1f} | {t_fused[0] / total[0]:.2f} / {t_fused[1] / total[1]:.2f} |"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", nargs="+", default=["cnn", "vit", "mlp"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="")
    p.add_argument("--train", action="store_true", help="also time the sandwich train step vs n separate steps")
    p.add_argument("--train-batch", type=int, default=32)
    a = p.parse_args(argv)
    lines = [f"Load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", "",
             f"Slimmable dense model (configs/slimmable_dense.py), forward of batch {a.batch}, {jax.devices()[0].platform}",
             "", "| encoder | configuration | MFLOPs / example | FLOPs ratio | latency ms / batch | latency ratio | latency/FLOPs |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for enc in a.encoders:
        lines += bench(enc, a.batch, a.repeats)
        print("\n".join(lines), flush=True)
    if a.train:
        lines += ["", f"Train step (Adam, batch {a.train_batch}; minimum over {a.repeats} steps after compilation): "
                  "the sandwich rule's n configurations in one step vs n separate steps of one uniform "
                  "configuration each.", "",
                  "| encoder | n | sandwich step ms (wall / CPU) | separate steps ms (width: wall / CPU) | sum ms (wall / CPU) | ratio wall / CPU (goal <= 1.0) |",
                  "|---|---:|---:|---|---:|---:|"]
        for enc in a.encoders:
            lines += bench_train(enc, a.train_batch, a.repeats)
            print(lines[-1], flush=True)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
