"""aTLAS: block-wise coefficients (4 random partitions per tensor), init 0.3, few-shot supervised objective.

Order of commands (artifacts from the eight-task benchmark, mtl/merging/benchmark.py):

    python experiments/merging.py        # writes runs/merging/pretrained.mtl and runs/merging/ft_<task>.mtl
    mtl merge --config configs/merge_atlas.py --workdir runs/merge/atlas
    mtl merge --config configs/merge_atlas.py:ARTIFACT_DIR --workdir DIR --config.adaptive.objective=entropy

Writes DIR/merged.mtl, DIR/results.md, DIR/results.json (+ coeffs.json for adaptive methods).
"""
from mtl.merging.config import benchmark_merge_config


def get_config(arg=None):
    c = benchmark_merge_config(arg, "atlas")
    c.adaptive.num_parts = 4
    c.adaptive.lr = 1e-2
    c.adaptive.init = 0.3
    c.adaptive.objective = "xent"
    c.adaptive.shots = 64
    return c
