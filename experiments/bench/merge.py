"""Merging at ViT-B/32 scale: wall time and peak memory of streaming merges, AdaMerging step time.

    python experiments/bench/merge.py [--quick] [--tmp /tmp/mtl_bench_merge] [--ada-steps 3]

1. Builds the parameter shapes of a ViT-B/32 (224x224x3 input, patch 32, width 768,
   12 layers, MLP 3072, 12 heads: ~88M parameters) with 8 linear task heads
   (abstractly; random weights), and writes the pretrained model and K = 8
   "fine-tunes" (pretrained + small noise) to disk, one ``.npy`` per tensor.
2. For task arithmetic, TIES and DARE: a fresh subprocess streams the 9 models from
   disk tensor by tensor (``mtl.merging.merge_stream``, heads excluded) and keeps the
   merged model in memory; it reports wall time and peak RSS (``getrusage``) above
   its RSS before the merge, next to the memory-bandwidth bound: bytes the method
   must move / read bandwidth measured in the same subprocess (BLAS dot of two
   256 MiB vectors), and the bound from ``np.load`` throughput (page cache -> fresh
   arrays), which is what streaming from files really pays.  Each merge runs twice:
   cold (one jit compile per tensor shape) and warm.
3. AdaMerging (layer-wise) step on the same model: task vectors stacked [K, ...] per
   tensor, batch 16 per task (128 images), forward + gradient w.r.t. the coefficients
   in one jitted step; reports compile and per-step time and peak RSS.

``--quick``: a small ViT (width 256, 4 layers) for a fast check.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np

K = 8


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    """Peak RSS since start or the last :func:`reset_peak` (VmHWM; getrusage as a fallback)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``/proc/self/clear_refs``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def model_shapes(quick: bool):
    import jax
    import ml_collections
    from flax import nnx

    from mtl.nn.build import model_factory
    from mtl.nn.heads import Classification
    from mtl.tasks import Task

    enc = ({"patch": 32, "dim": 256, "depth": 4, "num_heads": 4} if quick else
           {"patch": 32, "dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0})
    model_cfg = ml_collections.ConfigDict({"arch": "shared", "encoder": "vit", "encoder_kwargs": enc})
    tasks = [Task(f"task{k}", Classification(10)) for k in range(K)]
    factory = model_factory(model_cfg, tasks, (224, 224, 3))
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    from mtl.merging.tree import flatten

    shapes = {p: (tuple(v.shape), str(v.dtype)) for p, v in flatten(nnx.to_pure_dict(params)).items()}
    return factory, shapes


class NpySource:
    """A merge source reading one ``.npy`` per tensor (loaded on demand, nothing cached)."""

    def __init__(self, root):
        self.root = root
        with open(os.path.join(root, "index.json")) as f:
            self.index = json.load(f)

    def paths(self):
        return list(self.index)

    def _file(self, path):
        return os.path.join(self.root, path.replace("/", "__") + ".npy")

    def load(self, path):
        return np.load(self._file(path))

    def spec(self, path):
        import jax

        shape, dtype = self.index[path]
        return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))


def write_models(root, shapes):
    if os.path.exists(os.path.join(root, f"ft{K - 1}", "index.json")):
        return
    rng = np.random.default_rng(0)
    for name in ["pre"] + [f"ft{k}" for k in range(K)]:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    for p, (shape, dtype) in shapes.items():
        base = rng.standard_normal(shape, dtype=np.float32) * 0.02
        np.save(os.path.join(root, "pre", p.replace("/", "__") + ".npy"), base)
        for k in range(K):
            ft = base + rng.standard_normal(shape, dtype=np.float32) * 1e-3
            np.save(os.path.join(root, f"ft{k}", p.replace("/", "__") + ".npy"), ft)
    for name in ["pre"] + [f"ft{k}" for k in range(K)]:
        with open(os.path.join(root, name, "index.json"), "w") as f:
            json.dump({p: [list(s), d] for p, (s, d) in shapes.items()}, f)


def read_bandwidth_gbs(nbytes=1 << 28, reps=5) -> float:
    """Memory read bandwidth: best of ``reps`` BLAS dot products of two ``nbytes`` float32 vectors."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.ones(nbytes // 4, np.float32)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * nbytes / best / 1e9


def load_bandwidth_gbs(src) -> float:
    """Throughput of ``np.load`` over one whole model (page cache -> fresh arrays)."""
    t, n = time.perf_counter(), 0
    for p in src.paths():
        n += src.load(p).nbytes
    return n / (time.perf_counter() - t) / 1e9


METHODS = {
    "task_arithmetic": {"lam": 0.3},
    "ties": {"k": 20.0, "lam": 1.0, "mode": "mean"},
    "dare": {"p": 0.5, "then": "task_arithmetic", "lam": 0.3},
}


def worker_merge(root, method):
    import jax

    from mtl.merging import merge_stream

    pre = NpySource(os.path.join(root, "pre"))
    fts = [NpySource(os.path.join(root, f"ft{k}")) for k in range(K)]
    n_merged = sum(math.prod(s) for p, (s, _) in pre.index.items() if not p.startswith("heads/"))
    n_all = sum(math.prod(s) for s, _ in pre.index.values())
    biggest = max(math.prod(s) for s, _ in pre.index.values()) * 4
    jax.block_until_ready(jax.numpy.ones(1) + 1)  # backend up before the baseline
    base = rss_mb()
    walls, peaks = [], []
    for i in range(2):  # cold (compiles one kernel per tensor shape), then warm
        if i == 1:
            base = rss_mb()
            reset_peak()
        t = time.perf_counter()
        out = merge_stream(method, pre, fts, exclude=["heads/*"], **METHODS[method])
        jax.block_until_ready(list(out.values()))
        walls.append(time.perf_counter() - t)
        peaks.append(peak_mb())
        del out
    peak = peaks[1]  # the warm run's peak, before the bandwidth probes allocate their buffers
    bw, load_bw = read_bandwidth_gbs(), load_bandwidth_gbs(pre)
    reads = 3 if method == "ties" else 1  # TIES: two threshold passes + the merge pass
    model_bytes = (K + 1) * n_merged * 4
    bytes_moved = reads * model_bytes + n_all * 4  # read the models once per pass, write the result
    return {"method": method, "params": n_all, "wall_cold_s": walls[0], "wall_s": walls[1], "rss_before_mb": base,
            "peak_rss_mb": peak, "peak_above_before_mb": peak - base, "cold_peak_rss_mb": peaks[0], "result_mb": n_all * 4 / 2**20,
            "k_tensors_mb": K * biggest / 2**20, "read_bw_gbs": bw, "np_load_gbs": load_bw,
            "bytes_moved_gb": bytes_moved / 1e9, "bandwidth_bound_s": bytes_moved / (bw * 1e9),
            "np_load_bound_s": reads * model_bytes / (load_bw * 1e9)}


def worker_ada(root, quick, steps, batch):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mtl.merging.adaptive import AdaptiveMerge, apply_from_graphdef
    from mtl.merging.tree import unflatten

    factory, shapes = model_shapes(quick)
    pre = NpySource(os.path.join(root, "pre"))
    fts = [NpySource(os.path.join(root, f"ft{k}")) for k in range(K)]
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    template = nnx.to_pure_dict(params)
    theta0 = {p: pre.load(p) for p in pre.paths()}
    stacked = {}
    for p in pre.paths():
        if not p.startswith("heads/"):
            x0 = theta0[p]
            stacked[p] = jnp.asarray(np.stack([f.load(p) - x0 for f in fts]))
    base = rss_mb()
    tasks = [f"task{k}" for k in range(K)]
    ada = AdaptiveMerge(apply_from_graphdef(graphdef), unflatten(theta0, like=template), None, tasks,
                        granularity="layer", stacked=stacked)
    rng = np.random.default_rng(0)
    batch_x = {t: jnp.asarray(rng.random((batch, 224, 224, 3), dtype=np.float32)) for t in tasks}
    coeffs, opt = ada.init()
    times = []
    for i in range(steps):
        t = time.perf_counter()
        coeffs, opt, loss = ada.step(coeffs, opt, batch_x)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    n = sum(math.prod(s) for s, _ in shapes.values())
    return {"method": "adamerging_layer_step", "params": n, "batch_per_task": batch, "tasks": K,
            "first_step_s (incl. compile)": times[0], "step_s": times[1:], "loss": float(loss),
            "rss_before_mb": base, "peak_rss_mb": peak_mb(), "stacked_task_vectors_mb": K * n * 4 / 2**20}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tmp", default="/tmp/mtl_bench_merge")
    ap.add_argument("--ada-steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--skip-ada", action="store_true")
    ap.add_argument("--worker", default="")
    args = ap.parse_args(argv)
    root = args.tmp + ("_quick" if args.quick else "")
    if args.worker:
        res = (worker_ada(root, args.quick, args.ada_steps, args.batch) if args.worker == "ada"
               else worker_merge(root, args.worker))
        print("RESULT " + json.dumps(res))
        return 0
    _, shapes = model_shapes(args.quick)
    n = sum(math.prod(s) for s, _ in shapes.values())
    print(f"model: {'quick ViT' if args.quick else 'ViT-B/32'} + {K} heads, {n:,} parameters "
          f"({n * 4 / 2**20:.0f} MiB); K = {K} fine-tunes -> {root}", flush=True)
    t = time.perf_counter()
    write_models(root, shapes)
    print(f"models on disk ({time.perf_counter() - t:.0f} s)", flush=True)
    results = []
    workers = list(METHODS) + ([] if args.skip_ada else ["ada"])
    for w in workers:
        cmd = [sys.executable, __file__, "--worker", w, "--tmp", args.tmp, "--ada-steps", str(args.ada_steps),
               "--batch", str(args.batch)] + (["--quick"] if args.quick else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{w} failed:\n{p.stderr[-3000:]}")
            continue
        r = json.loads(line[0][7:])
        results.append(r)
        if w == "ada":
            print(f"adamerging layer-wise step, {K} tasks x batch {args.batch}: first step (compile) "
                  f"{r['first_step_s (incl. compile)']:.1f} s, then {', '.join(f'{s:.2f}' for s in r['step_s'])} s;"
                  f" peak RSS {r['peak_rss_mb']:.0f} MiB (stacked task vectors {r['stacked_task_vectors_mb']:.0f} MiB)",
                  flush=True)
        else:
            print(f"{w:16s} wall {r['wall_s']:6.2f} s (cold {r['wall_cold_s']:.2f}) | memory-bandwidth bound "
                  f"{r['bandwidth_bound_s']:5.2f} s ({r['bytes_moved_gb']:.1f} GB at {r['read_bw_gbs']:.1f} GB/s);"
                  f" np.load bound {r['np_load_bound_s']:.2f} s ({r['np_load_gbs']:.1f} GB/s) | peak RSS {r['peak_rss_mb']:6.0f} MiB,"
                  f" +{r['peak_above_before_mb']:.0f} MiB during the merge (result {r['result_mb']:.0f} MiB,"
                  f" K x largest tensor {r['k_tensors_mb']:.0f} MiB)", flush=True)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results",
                       "merging_bench" + ("_quick" if args.quick else "") + ".json")
    if args.skip_ada and os.path.exists(out):  # keep an earlier AdaMerging measurement
        with open(out) as f:
            results += [r for r in json.load(f) if r.get("method") == "adamerging_layer_step"]
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
