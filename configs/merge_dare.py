"""DARE (drop p, rescale 1/(1-p)) then task arithmetic; DARE-TIES with kwargs.then=ties.

Order of commands (artifacts from the eight-task benchmark, mtl/merging/benchmark.py):

    python experiments/merging.py        # writes runs/merging/pretrained.mtl and runs/merging/ft_<task>.mtl
    mtl merge --config configs/merge_dare.py --workdir runs/merge/dare
    mtl merge --config configs/merge_dare.py:ARTIFACT_DIR --workdir DIR --config.kwargs.then=ties --config.kwargs.k=20.0 --config.kwargs.lam=1.0

Writes DIR/merged.mtl, DIR/results.md, DIR/results.json (+ coeffs.json for adaptive methods).
"""
from mtl.merging.config import benchmark_merge_config


def get_config(arg=None):
    c = benchmark_merge_config(arg, "dare", p=0.5, then="task_arithmetic", lam=0.3)
    return c
