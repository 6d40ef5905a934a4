"""AdaMerging++: layer-wise AdaMerging on TIES-masked task vectors (top 20 %).

Order of commands (artifacts from the eight-task benchmark, mtl/merging/benchmark.py):

    python experiments/merging.py        # writes runs/merging/pretrained.mtl and runs/merging/ft_<task>.mtl
    mtl merge --config configs/merge_adamerging_pp.py --workdir runs/merge/adamerging_pp
    mtl merge --config configs/merge_adamerging_pp.py:ARTIFACT_DIR --workdir DIR --config.adaptive.ties_k=10.0

Writes DIR/merged.mtl, DIR/results.md, DIR/results.json (+ coeffs.json for adaptive methods).
"""
from mtl.merging.config import benchmark_merge_config


def get_config(arg=None):
    c = benchmark_merge_config(arg, "adamerging")
    c.adaptive.ties_k = 20.0
    return c
