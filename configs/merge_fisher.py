"""Fisher merging with diagonal Fishers estimated on each task's training inputs (sampled labels).

Order of commands (artifacts from the eight-task benchmark, mtl/merging/benchmark.py):

    python experiments/merging.py        # writes runs/merging/pretrained.mtl and runs/merging/ft_<task>.mtl
    mtl merge --config configs/merge_fisher.py --workdir runs/merge/fisher
    mtl merge --config configs/merge_fisher.py:ARTIFACT_DIR --workdir DIR --config.fisher.num_examples=512

Writes DIR/merged.mtl, DIR/results.md, DIR/results.json (+ coeffs.json for adaptive methods).
"""
from mtl.merging.config import benchmark_merge_config


def get_config(arg=None):
    c = benchmark_merge_config(arg, "fisher")
    return c
