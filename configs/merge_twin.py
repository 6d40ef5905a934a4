"""Twin-Merging: TA shared expert + rank-10% SVD exclusive vectors + linear router, merged per input.

Order of commands (artifacts from the eight-task benchmark, mtl/merging/benchmark.py):

    python experiments/merging.py        # writes runs/merging/pretrained.mtl and runs/merging/ft_<task>.mtl
    mtl merge --config configs/merge_twin.py --workdir runs/merge/twin
    mtl merge --config configs/merge_twin.py:ARTIFACT_DIR --workdir DIR --config.twin.rank_frac=0.25 --config.twin.mode=top1

Writes DIR/merged.mtl, DIR/results.md, DIR/results.json (+ coeffs.json for adaptive methods).
"""
from mtl.merging.config import benchmark_merge_config


def get_config(arg=None):
    c = benchmark_merge_config(arg, "twin")
    return c
