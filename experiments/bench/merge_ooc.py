"""Out-of-core merging: peak resident memory of `merge_files` on safetensors models larger than memory allows.

    python experiments/bench/merge_ooc.py [--k 8] [--model-gb 1.4] [--tensor-mb 64] [--method task_arithmetic]
                                          [--dir /tmp/mtl_bench_ooc] [--cold] [--sequential]
                                          [--keep] [--reuse] [--json] [--chunk auto|none|256MB]

1. Writes a base model and K "fine-tunes" (base + noise) of ``--model-gb`` each
   as safetensors files, tensor by tensor (f32 tensors of ``--tensor-mb``),
   in this process.
2. A fresh subprocess merges them with :func:`mtl.merging.files.merge_files`
   (read-ahead and write-behind threads on, unless ``--sequential``) into a
   sharded safetensors directory (tensors whose K + 1 copies exceed ``--chunk``
   merged in row chunks; default ``auto``, 1 GiB) and reports its peak
   resident memory (``VmHWM`` from ``/proc/self/status``), its RSS after the
   imports (the baseline), the wall time and the read throughput.  With
   ``--cold`` the inputs are dropped from the page cache first
   (``posix_fadvise(DONTNEED)``); otherwise the cache is as writing left it.
3. Prints the peak above baseline next to the budget the issue sets: the
   K + 1 input copies (what an in-memory merge must hold) and one model.

The merged result is then checked against a numpy re-derivation on a few
tensors (task arithmetic and averaging), so the figure is for a correct merge.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # this checkout's mtl, not an installed one


def status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tensor_shape(tensor_mb: float) -> tuple[int, int]:
    cols = max(1, int(tensor_mb * 2**20 / 4 / 1024))
    return (1024, cols)


def write_models(d: str, k: int, n_tensors: int, shape, seed: int = 0) -> list[str]:
    from mtl.io import SafetensorsWriter, TensorSpec

    specs = {f"layers.{i}.weight": TensorSpec(tuple(shape), np.dtype(np.float32)) for i in range(n_tensors)}
    paths = [os.path.join(d, "base.safetensors")] + [os.path.join(d, f"ft{j}.safetensors") for j in range(k)]
    writers = [SafetensorsWriter(p, specs, overwrite=True) for p in paths]
    rng = np.random.default_rng(seed)
    for name in specs:  # fine-tune j = base + (j + 1) * 0.01 * noise: two random draws per tensor, not K + 1
        base = rng.standard_normal(shape, dtype=np.float32)
        noise = rng.standard_normal(shape, dtype=np.float32)
        writers[0](name, base)
        for j, w in enumerate(writers[1:]):
            w(name, base + np.float32(0.01 * (j + 1)) * noise)
        del base, noise
    for w in writers:
        w.close()
    return paths


def _has_layout(path, n_tensors, shape) -> bool:
    from mtl.io import SafetensorsSource

    try:
        src = SafetensorsSource(path)
    except (OSError, ValueError):
        return False
    return len(src.paths()) == n_tensors and all(tuple(src.spec(p).shape) == tuple(shape) for p in src.paths())


def drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(args) -> None:
    """Runs in the subprocess: one merge, then its memory and time as JSON on stdout."""
    import jax  # noqa: F401  (imports count in the baseline, not in the merge)

    from mtl.merging.files import merge_files
    from mtl.merging import stream  # noqa: F401

    base, *fts = args.paths
    baseline = status_mb("VmRSS")
    t0 = time.perf_counter()
    kw = {"lam": 0.3} if args.method == "task_arithmetic" else ({"k": 20} if args.method == "ties" else {})
    merge_files(args.method, base, fts, args.out, max_shard_bytes="2GB", overwrite=True,
                prefetch=not args.sequential, write_behind=not args.sequential,
                chunk_bytes=None if args.chunk.lower() == "none" else args.chunk, **kw)
    seconds = time.perf_counter() - t0
    print(json.dumps({"baseline_rss_mb": baseline, "peak_rss_mb": status_mb("VmHWM"), "seconds": seconds,
                      "kw": kw}))


def check(paths, out, method, kw, names) -> float:
    """Largest |difference| between the merge and a float64 numpy re-derivation on ``names``."""
    from mtl.io import SafetensorsSource

    srcs = [SafetensorsSource(p) for p in paths]
    got = SafetensorsSource(out)
    err = 0.0
    for n in names:
        x0 = srcs[0].load(n).astype(np.float64)
        taus = [s.load(n).astype(np.float64) - x0 for s in srcs[1:]]
        if method == "task_arithmetic":
            ref = x0 + kw["lam"] * sum(taus)
        elif method == "average":
            ref = x0 + sum(taus) / len(taus)
        else:
            return float("nan")
        err = max(err, float(np.max(np.abs(got.load(n) - ref))))
    return err


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--model-gb", type=float, default=1.4)
    ap.add_argument("--tensor-mb", type=float, default=64)
    ap.add_argument("--method", default="task_arithmetic")
    ap.add_argument("--dir", default="/tmp/mtl_bench_ooc")
    ap.add_argument("--cold", action="store_true", help="drop the inputs from the page cache before merging")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--reuse", action="store_true", help="reuse files of the same layout left by --keep")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--sequential", action="store_true", help="no read-ahead or write-behind threads")
    ap.add_argument("--chunk", default="auto", help="merge_files' chunk_bytes: auto (1 GiB), none, or a size")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--paths", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return {}
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    shape = tensor_shape(args.tensor_mb)
    tensor_bytes = shape[0] * shape[1] * 4
    n_tensors = max(1, round(args.model_gb * 1e9 / tensor_bytes))
    model_bytes = n_tensors * tensor_bytes
    os.makedirs(args.dir, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if (args.k + 2) * model_bytes > 0.9 * free:
        raise SystemExit(f"{args.dir}: {(args.k + 2) * model_bytes / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    t0 = time.perf_counter()
    say(f"writing K+1 = {args.k + 1} models of {model_bytes / 1e9:.2f} GB ({n_tensors} tensors {shape} f32)")
    paths = [os.path.join(args.dir, "base.safetensors")] + [os.path.join(args.dir, f"ft{j}.safetensors")
                                                             for j in range(args.k)]
    if not (args.reuse and all(_has_layout(p, n_tensors, shape) for p in paths)):
        paths = write_models(args.dir, args.k, n_tensors, shape)
        say(f"  written in {time.perf_counter() - t0:.0f} s")
    else:
        say("  reusing the files already there (--reuse)")
    if args.cold:
        drop_cache(paths)
    out = os.path.join(args.dir, "merged")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--method", args.method, "--out", out,
           *(["--sequential"] if args.sequential else []), "--chunk", args.chunk, "--paths", *paths]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"merge subprocess failed:\n{res.stderr[-4000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    names = [f"layers.{i}.weight" for i in sorted({0, n_tensors // 2, n_tensors - 1})]
    err = check(paths, out, args.method, r["kw"], names)
    mem = {"MemTotal": None}
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem["MemTotal"] = int(line.split()[1]) / 2**20
    delta = r["peak_rss_mb"] - r["baseline_rss_mb"]
    result = {
        "method": args.method, "k": args.k, "overlap": not args.sequential, "chunk": args.chunk, "model_gb": model_bytes / 1e9, "tensor_mb": tensor_bytes / 2**20,
        "inputs_gb": (args.k + 1) * model_bytes / 1e9, "machine_mem_gib": mem["MemTotal"],
        "cache": "cold (fadvise DONTNEED)" if args.cold else "as written (warm where it fit)",
        "seconds": r["seconds"], "read_gb_per_s": (args.k + 1) * model_bytes / 1e9 / r["seconds"],
        "baseline_rss_mb": r["baseline_rss_mb"], "peak_rss_mb": r["peak_rss_mb"], "peak_above_baseline_mb": delta,
        "peak_over_one_model": r["peak_rss_mb"] * 2**20 / model_bytes,
        "peak_above_baseline_in_tensors": delta * 2**20 / tensor_bytes,
        "max_abs_err_vs_numpy": err,
    }
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        say(f"merged {args.k} + 1 models ({result['inputs_gb']:.1f} GB of inputs, machine {mem['MemTotal']:.0f} GiB)"
            f" with {args.method}{'' if not args.sequential else ' (sequential)'}, chunk {args.chunk}, in {r['seconds']:.1f} s ({result['read_gb_per_s']:.2f} GB/s read, {result['cache']})")
        say(f"  peak RSS {r['peak_rss_mb']:.0f} MB = baseline {r['baseline_rss_mb']:.0f} MB (imports)"
            f" + {delta:.0f} MB ({result['peak_above_baseline_in_tensors']:.1f} tensors of {tensor_bytes / 2**20:.0f} MB);"
            f" {result['peak_over_one_model']:.2f} x one model, K+1 copies would be {result['inputs_gb']:.1f} GB")
        say(f"  max |merge - float64 numpy| on {len(names)} tensors: {err:.2e}")
    return result


if __name__ == "__main__":
    main()
