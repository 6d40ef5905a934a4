"""Task arithmetic: θ0 + lam Σ τ_k (lam = 0.3 for 8 tasks).

Order of commands (artifacts from the eight-task benchmark, mtl/merging/benchmark.py):

    python experiments/merging.py        # writes runs/merging/pretrained.mtl and runs/merging/ft_<task>.mtl
    mtl merge --config configs/merge_task_arithmetic.py --workdir runs/merge/task_arithmetic
    mtl merge --config configs/merge_task_arithmetic.py:ARTIFACT_DIR --workdir DIR --config.kwargs.lam=0.4

Writes DIR/merged.mtl, DIR/results.md, DIR/results.json (+ coeffs.json for adaptive methods).
"""
from mtl.merging.config import benchmark_merge_config


def get_config(arg=None):
    c = benchmark_merge_config(arg, "task_arithmetic", lam=0.3)
    return c
