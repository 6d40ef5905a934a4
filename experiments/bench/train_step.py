"""Train-step speed of the MLP, CNN and ViT encoders against this machine's matmul peak.

    python experiments/bench/train_step.py [--steps 20] [--quick]

Measures, in one run: the f32 matmul throughput (2048x2048, the reference peak), then
for each encoder the jitted multi-task train step's time, its FLOPs from XLA's cost
analysis, and the achieved FLOP/s as a fraction of that peak. Step times are medians.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtl import sharding as shd
from mtl.flops import compiled_flops
from mtl.nn import heads
from mtl.nn.build import model_factory
from mtl.tasks import Task
from mtl.train.optimizer import make_optimizer
from mtl.train.step import Steps


def timeit(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    return 2 * n ** 3 / timeit(lambda: f(a), repeats)


CASES = {
    "mlp": dict(input_shape=(28, 28, 1), batch=256, kwargs=dict(hidden=(256, 256))),
    "cnn": dict(input_shape=(32, 32, 3), batch=128, kwargs=dict(widths=(32, 64, 128))),
    "vit": dict(input_shape=(32, 32, 3), batch=128, kwargs=dict(patch=4, dim=128, depth=4, num_heads=4)),
}


def bench_encoder(name: str, spec: dict, steps: int) -> dict:
    tasks = [Task("a", heads.Classification(10)), Task("b", heads.Classification(10))]
    import ml_collections
    mcfg = ml_collections.ConfigDict({"arch": "shared", "encoder": name, "encoder_kwargs": spec["kwargs"]})
    factory = model_factory(mcfg, tasks, spec["input_shape"])
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    st = Steps(factory, tasks, make_optimizer("adamw", 1e-3, 1000), mesh)
    state = st.init()
    rng = np.random.default_rng(0)
    b = spec["batch"]
    batch = st.put_batch({"inputs": rng.normal(size=(b,) + spec["input_shape"]).astype(np.float32),
                          "labels": {"a": rng.integers(0, 10, b).astype(np.int32),
                                     "b": rng.integers(0, 10, b).astype(np.int32)},
                          "masks": {"a": np.ones(b, bool), "b": np.ones(b, bool)}})
    with st.activate():
        flops = compiled_flops(st.train_step, state, batch)
    holder = {"s": state}

    def one():
        holder["s"], m = st.step(holder["s"], batch)
        return m["loss"]

    for _ in range(3):
        one()
    t = timeit(one, steps)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    return {"encoder": name, "params": n_params, "batch": b, "step_ms": t * 1e3, "gflop": flops / 1e9,
            "gflops": flops / t / 1e9}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    p.add_argument("--encoders", default="mlp,cnn,vit")
    a = p.parse_args(argv)
    steps = 3 if a.quick else a.steps
    peak = matmul_peak(repeats=3 if a.quick else 10)
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}; "
          f"f32 matmul 2048^2 peak: {peak / 1e9:.1f} GFLOP/s")
    print("| encoder | params | batch | step (ms) | GFLOP/step (XLA) | GFLOP/s | fraction of matmul peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in a.encoders.split(","):
        r = bench_encoder(name, CASES[name], steps)
        print(f"| {name} | {r['params']:,} | {r['batch']} | {r['step_ms']:.2f} | {r['gflop']:.3f} | "
              f"{r['gflops']:.1f} | {r['gflops'] * 1e9 / peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
