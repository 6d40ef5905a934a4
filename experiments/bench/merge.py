"""Merging at ViT-B/32 shapes: each static merge in memory and streamed, before/after, next to the bandwidth bound.

    python experiments/bench/merge.py [--width 384 --depth 8] [--ref a2834ab] [--tmp /tmp/mtl_bench_merge] [--ada]

1. Builds the parameter shapes of a ViT-B/32-style encoder (224x224x3 input, patch 32;
   ``--width 768 --depth 12`` is ViT-B/32 itself, ~88M parameters; the default
   ``--width 384 --depth 8`` is ~15M) with 8 linear task heads (abstractly; random
   weights), and writes the pretrained model and K = 8 "fine-tunes" (pretrained + small
   noise) to disk, one ``.npy`` per tensor, float32.
2. For each method (averaging, task arithmetic, TIES, DARE, DARE+TIES, Fisher) and each
   implementation (this checkout, and ``--ref``: an earlier commit exported with ``git
   archive``, default the last commit before the fused kernels), a fresh subprocess
   times, warm (best of ``--reps`` after one cold run that compiles):
   - *in memory*: ``MERGERS[method](θ0, task_vectors)`` on device arrays (heads excluded);
   - *streamed*: ``merge_stream`` from the ``.npy`` files (page cache warm: nothing here
     can drop it), with the peak RSS above the RSS before the merge.
   Next to each: the memory-bandwidth bound, i.e. the bytes a single pass must move
   (read θ0 and the K models, plus the K Fisher estimates for Fisher, and write the
   result) over the read bandwidth measured in the same subprocess (best BLAS dot of two
   256 MiB vectors), and the fraction of that bound achieved (bound / wall).
3. ``--ada``: the AdaMerging (layer-wise) step on the same model (slow; off by default).

Prints one table, the before/after ratios, and writes experiments/results/merging_bench.{json,txt}
(``--out`` elsewhere for partial or comparison runs).
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


def model_shapes(width: int, depth: int):
    import jax
    import ml_collections
    from flax import nnx

    from mtl.nn.build import model_factory
    from mtl.nn.heads import Classification
    from mtl.tasks import Task

    enc = {"patch": 32, "dim": width, "depth": depth, "num_heads": max(1, width // 64), "mlp_ratio": 4.0}
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
    """A merge source reading one ``.npy`` per tensor (memory-mapped on demand, nothing cached)."""

    def __init__(self, root):
        self.root = root
        with open(os.path.join(root, "index.json")) as f:
            self.index = json.load(f)
        self._layout = {}

    def paths(self):
        return list(self.index)

    def _file(self, path):
        return os.path.join(self.root, path.replace("/", "__") + ".npy")

    def load(self, path):
        """The tensor memory-mapped from its file (read lazily from the page cache; the header is parsed once)."""
        f = self._file(path)
        if path not in self._layout:
            m = np.load(f, mmap_mode="r")
            self._layout[path] = (m.dtype, m.shape, m.offset, m.flags.f_contiguous and m.ndim > 1)
        dtype, shape, offset, fortran = self._layout[path]
        return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")

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
    """Throughput of reading one whole model from its memory-mapped files (page cache -> fresh arrays)."""
    t, n = time.perf_counter(), 0
    for p in src.paths():
        n += np.array(src.load(p)).nbytes
    return n / (time.perf_counter() - t) / 1e9


METHODS = {
    "average": ("average", {}),
    "task_arithmetic": ("task_arithmetic", {"lam": 0.3}),
    "ties": ("ties", {"k": 20.0, "lam": 1.0, "mode": "mean"}),
    "dare": ("dare", {"p": 0.5, "then": "task_arithmetic", "lam": 0.3}),
    "dare_ties": ("dare", {"p": 0.5, "then": "ties", "k": 100.0, "lam": 1.0, "mode": "mean"}),
    "fisher": ("fisher", {}),
}


def _best(fn, reps):
    """``(cold, best warm)`` wall seconds of ``fn()`` (which must block until its result is ready)."""
    t = time.perf_counter()
    fn()
    cold = time.perf_counter() - t
    warm = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        warm = min(warm, time.perf_counter() - t)
    return cold, warm


def worker_merge(root, method, reps):
    import jax
    import jax.numpy as jnp

    import mtl.merging as mm

    name, hp = METHODS[method]
    pre_src = NpySource(os.path.join(root, "pre"))
    ft_srcs = [NpySource(os.path.join(root, f"ft{k}")) for k in range(K)]
    merged_paths = [p for p in pre_src.paths() if not p.startswith("heads/")]
    n_merged = sum(math.prod(pre_src.index[p][0]) for p in merged_paths)
    n_all = sum(math.prod(s) for s, _ in pre_src.index.values())
    pre = {p: jnp.asarray(pre_src.load(p)) for p in pre_src.paths()}
    fts = [{p: jnp.asarray(s.load(p)) for p in s.paths()} for s in ft_srcs]
    tvs = mm.task_vectors(fts, pre, exclude=["heads/*"])
    del fts
    models_read = K + 1
    if name == "fisher":
        rng = np.random.default_rng(1)
        fishers = [{p: jnp.asarray(rng.random(np.shape(v), dtype=np.float32)) for p, v in pre.items()}
                   for _ in range(K)]
        hp = dict(hp, fishers=fishers)
        models_read = 2 * K + 1
    jax.block_until_ready((pre, tvs))

    def in_memory():
        jax.block_until_ready(mm.MERGERS[name](pre, tvs, **hp))

    def streamed():
        jax.block_until_ready(list(mm.merge_stream(name, pre_src, ft_srcs, exclude=["heads/*"], **hp).values()))

    mem_cold, mem_warm = _best(in_memory, reps)
    streamed()  # cold: compiles
    base = rss_mb()
    reset_peak()
    str_cold, str_warm = _best(streamed, reps)
    peak = peak_mb()
    bw, load_bw = read_bandwidth_gbs(), load_bandwidth_gbs(pre_src)
    bytes_moved = models_read * n_merged * 4 + n_all * 4
    bound = bytes_moved / (bw * 1e9)
    return {"method": method, "params": n_all, "merged_params": n_merged, "reps": reps,
            "in_memory_s": mem_warm, "in_memory_cold_s": mem_cold, "streamed_s": str_warm,
            "streamed_cold_s": str_cold, "read_bw_gbs": bw, "np_load_gbs": load_bw,
            "bytes_moved_gb": bytes_moved / 1e9, "bandwidth_bound_s": bound,
            "in_memory_fraction_of_bound": bound / mem_warm, "streamed_fraction_of_bound": bound / str_warm,
            "np_load_bound_s": models_read * n_merged * 4 / (load_bw * 1e9),
            "streamed_peak_above_before_mb": peak - base, "result_mb": n_all * 4 / 2**20}


def worker_ada(root, width, depth, steps, batch):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mtl.merging.adaptive import AdaptiveMerge, apply_from_graphdef
    from mtl.merging.tree import unflatten

    factory, shapes = model_shapes(width, depth)
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


def export_ref(rev: str, dest: str) -> str:
    """``mtl/`` of commit ``rev`` of this repository, exported under ``dest`` (for the "before" timings)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    full = subprocess.run(["git", "-C", repo, "rev-parse", rev], capture_output=True, text=True, check=True).stdout.strip()
    out = os.path.join(dest, f"ref_{full[:12]}")
    if not os.path.exists(os.path.join(out, "mtl", "merging", "stream.py")):
        os.makedirs(out, exist_ok=True)
        archive = subprocess.run(["git", "-C", repo, "archive", full, "mtl"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    return out


def run_worker(args, worker, pythonpath):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--tmp", args.tmp, "--width", str(args.width),
           "--depth", str(args.depth), "--reps", str(args.reps), "--ada-steps", str(args.ada_steps),
           "--batch", str(args.batch)]
    env = dict(os.environ, PYTHONPATH=pythonpath, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user would run it
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        print(f"{worker} failed ({pythonpath}):\n{p.stderr[-3000:]}", flush=True)
        return None
    return json.loads(line[0][7:])


def fmt_row(label, r):
    return (f"{label:22s} {r['in_memory_s']:8.3f} s {100 * r['in_memory_fraction_of_bound']:5.1f}% |"
            f" {r['streamed_s']:8.3f} s {100 * r['streamed_fraction_of_bound']:5.1f}% | bound {r['bandwidth_bound_s']:.3f} s"
            f" ({r['bytes_moved_gb']:.2f} GB at {r['read_bw_gbs']:.1f} GB/s) | streamed peak +{r['streamed_peak_above_before_mb']:.0f} MiB")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--ref", default="a2834ab", help="the commit timed as 'before' ('' to skip)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="", help="write OUT.json and OUT.txt (default experiments/results/merging_bench: "
                    "the README's table; use another name for partial reruns)")
    ap.add_argument("--tmp", default="/tmp/mtl_bench_merge")
    ap.add_argument("--ada", action="store_true", help="also time the AdaMerging layer-wise step (slow)")
    ap.add_argument("--ada-steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--worker", default="")
    args = ap.parse_args(argv)
    root = f"{args.tmp}_w{args.width}_d{args.depth}"
    if args.worker:
        res = (worker_ada(root, args.width, args.depth, args.ada_steps, args.batch) if args.worker == "ada"
               else worker_merge(root, args.worker, args.reps))
        print("RESULT " + json.dumps(res))
        return 0
    _, shapes = model_shapes(args.width, args.depth)
    n = sum(math.prod(s) for s, _ in shapes.values())
    lines = [f"model: ViT-B/32-shaped encoder (width {args.width}, depth {args.depth}) + {K} heads, {n:,} parameters"
             f" ({n * 4 / 2**20:.0f} MiB float32); K = {K} fine-tunes; warm wall time, best of {args.reps};"
             f" streamed = merge_stream from per-tensor .npy files (page cache warm)"]
    print(lines[0], flush=True)
    t = time.perf_counter()
    write_models(root, shapes)
    print(f"models on disk under {root} ({time.perf_counter() - t:.0f} s)", flush=True)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    impls = [("after", here)]
    if args.ref:
        impls.append((f"before ({args.ref})", export_ref(args.ref, args.tmp)))
    results = []
    header = (f"{'method [impl]':22s} {'in memory':>10s} {'of bound':>6s} | {'streamed':>10s} {'of bound':>6s} |"
              " single-pass bandwidth bound (read θ0 + K models [+ K Fishers], write 1)")
    print(header, flush=True)
    lines.append(header)
    for method in args.methods.split(","):
        for label, path in impls:
            r = run_worker(args, method, path)
            if r is None:
                continue
            r["impl"] = label
            results.append(r)
            lines.append(fmt_row(f"{method} [{label.split()[0]}]", r))
            print(lines[-1], flush=True)
    by = {(r["method"], r["impl"].split()[0]): r for r in results}
    for method in args.methods.split(","):
        a, b = by.get((method, "after")), by.get((method, "before"))
        if a and b:
            lines.append(f"{method:16s} before/after: in memory {b['in_memory_s'] / a['in_memory_s']:5.1f}x faster,"
                         f" streamed {b['streamed_s'] / a['streamed_s']:5.1f}x faster")
            print(lines[-1], flush=True)
    if args.ada:
        r = run_worker(args, "ada", here)
        if r is not None:
            results.append(r)
            lines.append(f"adamerging layer-wise step, {K} tasks x batch {args.batch}: first step (compile) "
                         f"{r['first_step_s (incl. compile)']:.1f} s, then {', '.join(f'{s:.2f}' for s in r['step_s'])} s;"
                         f" peak RSS {r['peak_rss_mb']:.0f} MiB")
            print(lines[-1], flush=True)
    out = args.out or os.path.join(here, "experiments", "results", "merging_bench")
    with open(out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(out + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}.json and {out}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
