"""Where TIES' time goes, in memory: each phase of the exact threshold and the merge pass, timed alone.

    python experiments/bench/ties_phases.py [--width 384 --depth 8] [--k 20] [--reps 5]

On K = 8 random task vectors of the ViT-B/32-shaped encoder of ``experiments/bench/merge.py``
(heads excluded), times (best of ``--reps`` after a warm-up):

1. ``sample``: the strided slice of every tensor and the two order statistics per task
   (:func:`mtl.merging.topk.sample_brackets`);
2. ``label``: the pass coding every entry above / inside / below its bracket (device);
3. ``count`` and ``locate``: the host's counts of the entries above and positions inside;
4. ``gather``: the in-bracket magnitudes (host gather of the device buffers);
5. ``threshold``: steps 1-4 together (:func:`mtl.merging.topk.ties_thresholds_of`);
6. ``merge``: the fused TIES kernel over every tensor with the thresholds known;
7. ``ties``: the whole merge (``mtl.merging.ties``).

Next to them, the single-pass bandwidth bound (read θ0 and the K task vectors, write the
result, at the read bandwidth of a BLAS dot measured here) and what 25% of it allows.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

K = 8


def best(fn, reps):
    import jax

    jax.block_until_ready(fn())
    out = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out = min(out, time.perf_counter() - t)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--k", type=float, default=20.0)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import mtl.merging as mm
    from merge import model_shapes, read_bandwidth_gbs
    from mtl.merging import static, topk
    from mtl.merging.sources import MergeInputs

    _, shapes = model_shapes(args.width, args.depth)
    rng = np.random.default_rng(0)
    pre = {p: jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.02)
           for p, (s, _) in shapes.items() if not p.startswith("heads/")}
    tvs = [{p: jnp.asarray(rng.standard_normal(v.shape, dtype=np.float32) * 1e-3) for p, v in pre.items()}
           for _ in range(K)]
    paths = list(pre)
    ops = lambda p: [t[p] for t in tvs]  # noqa: E731
    inp = MergeInputs(paths=tuple(paths), num_tasks=K, theta0=pre.__getitem__, operands=ops)
    sizes = topk.entry_sizes(inp)
    n = sum(sizes.values())
    n_keep = topk.num_keep(args.k, n)
    r = args.reps
    rows = {}
    rows["sample"] = best(lambda: topk.sample_brackets(inp, sizes, n_keep), r)
    lo, hi = topk.sample_brackets(inp, sizes, n_keep)
    label = lambda: [topk._label(pre[p], ops(p), None, lo, hi, relative=False) for p in paths]  # noqa: E731
    rows["label"] = best(label, r)
    codes = [[np.asarray(c) for c in cs] for cs in label()]
    rows["count"] = best(lambda: [topk._count_bits(c) for cs in codes for c in cs], r)
    rows["locate"] = best(lambda: [topk._where_bits(c) for cs in codes for c in cs], r)
    where = [[w for c in cs for w in topk._where_bits(c)][:K] for cs in codes]
    rows["gather"] = best(lambda: [topk._bits_at(pre[p], ops(p), None, w, relative=False)
                                   for p, w in zip(paths, where)], r)
    rows["threshold"] = best(lambda: topk.ties_thresholds_of(inp, args.k), r)
    thr = topk.ties_thresholds_of(inp, args.k)
    rows["merge"] = best(lambda: [static.ties_kernel(pre[p], ops(p), None, thr, 1.0, relative=False, mode="mean")
                                  for p in paths], r)
    rows["ties"] = best(lambda: mm.ties(pre, tvs, k=args.k), r)
    inside = sum(w.size for ws in where for w in ws) / (K * n)
    bw = read_bandwidth_gbs()
    bound = (K + 2) * n * 4 / (bw * 1e9)
    print(f"TIES phases: width {args.width}, depth {args.depth}, {n:,} merged entries x K = {K}, k = {args.k}%, "
          f"best of {r}; {100 * inside:.2f}% of entries inside their task's bracket")
    for name, t in rows.items():
        print(f"  {name:10s} {1e3 * t:8.1f} ms")
    print(f"  bound      {1e3 * bound:8.1f} ms (read θ0 + K, write 1 at {bw:.1f} GB/s); 25% of it allows "
          f"{4e3 * bound:.1f} ms; label + merge alone take {1e3 * (rows['label'] + rows['merge']):.1f} ms")


if __name__ == "__main__":
    main()
