"""AdaMerging: coefficients learned by entropy minimisation on unlabelled test inputs (layer-wise by default).

Order of commands (artifacts from the eight-task benchmark, mtl/merging/benchmark.py):

    python experiments/merging.py        # writes runs/merging/pretrained.mtl and runs/merging/ft_<task>.mtl
    mtl merge --config configs/merge_adamerging.py --workdir runs/merge/adamerging
    mtl merge --config configs/merge_adamerging.py:ARTIFACT_DIR --workdir DIR --config.adaptive.granularity=task  (or reuse: --config.coeffs_from=runs/merge/adamerging/coeffs.json)

Writes DIR/merged.mtl, DIR/results.md, DIR/results.json (+ coeffs.json for adaptive methods).
"""
from mtl.merging.config import benchmark_merge_config


def get_config(arg=None):
    c = benchmark_merge_config(arg, "adamerging")
    return c
