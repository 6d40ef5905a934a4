"""TIES-merging: trim to top-k %, elect sign, disjoint mean (modes mean | sum | max).

Order of commands (artifacts from the eight-task benchmark, mtl/merging/benchmark.py):

    python experiments/merging.py        # writes runs/merging/pretrained.mtl and runs/merging/ft_<task>.mtl
    mtl merge --config configs/merge_ties.py --workdir runs/merge/ties
    mtl merge --config configs/merge_ties.py:ARTIFACT_DIR --workdir DIR --config.kwargs.mode=sum --config.kwargs.lam=0.3

Writes DIR/merged.mtl, DIR/results.md, DIR/results.json (+ coeffs.json for adaptive methods).
"""
from mtl.merging.config import benchmark_merge_config


def get_config(arg=None):
    c = benchmark_merge_config(arg, "ties", k=20.0, lam=1.0, mode="mean")
    return c
