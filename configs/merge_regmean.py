"""RegMean on every Linear layer of the encoder (Grams of its inputs on each task's training inputs).

Order of commands (artifacts from the eight-task benchmark, mtl/merging/benchmark.py):

    python experiments/merging.py        # writes runs/merging/pretrained.mtl and runs/merging/ft_<task>.mtl
    mtl merge --config configs/merge_regmean.py --workdir runs/merge/regmean
    mtl merge --config configs/merge_regmean.py:ARTIFACT_DIR --workdir DIR --config.kwargs.alpha=0.5

Writes DIR/merged.mtl, DIR/results.md, DIR/results.json (+ coeffs.json for adaptive methods).
"""
from mtl.merging.config import benchmark_merge_config


def get_config(arg=None):
    c = benchmark_merge_config(arg, "regmean", alpha=0.9)
    return c
