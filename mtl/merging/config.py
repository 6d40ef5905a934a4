"""The ``mtl merge`` config schema: ``base_merge_config()`` holds every key the merge driver reads.

A merge config file (``configs/merge_NAME.py``) defines ``get_config(arg=None)``
starting from :func:`base_merge_config`; ``--config.key=value`` overrides work
as for ``mtl train`` (``kwargs`` is free-form: ``--config.kwargs.k=20``).
"""
from __future__ import annotations

import ml_collections

#: methods the driver runs (static ones are :data:`mtl.merging.MERGERS`)
METHODS = ("pretrained", "individual", "average", "task_arithmetic", "ties", "dare", "fisher", "regmean",
           "adamerging", "atlas", "twin")


def base_merge_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = ""
    c.seed = 0
    c.pretrained = ""              # artifact (mtl export / mtl.checkpoint.export_artifact) of the base model
    c.finetuned = {}               # task -> artifact of the model fine-tuned on that task
    c.tasks = ()                   # merge order; () = the keys of `finetuned`
    c.method = "task_arithmetic"   # one of METHODS
    c.kwargs = {}                  # the method's hyper-parameters (free-form), e.g. {"lam": 0.3}
    c.include = ()                 # path patterns merged (() = all); see mtl.merging.path_filter
    c.exclude = ("heads/*",)       # not merged: copied from the pretrained model
    c.head_path = "heads/{task}"   # the task's own head, taken from its fine-tune
    c.data = ml_collections.ConfigDict({
        "name": "merge8",          # mtl.merging.run.DATASETS
        "kwargs": {},
    })
    c.eval = ml_collections.ConfigDict({"split": "test", "batch_size": 1000})
    c.adaptive = ml_collections.ConfigDict({
        "granularity": "layer",    # AdaMerging: task | layer
        "ties_k": 0.0,             # > 0: AdaMerging++ (TIES-masked vectors, this top-k %)
        "steps": 500, "lr": 1e-3, "init": 0.3, "batch_size": 16,
        "clamp": True,             # clamp AdaMerging coefficients to [0, 1]
        "num_parts": 1,            # aTLAS random partitions per tensor
        "objective": "entropy",    # aTLAS: entropy (unlabelled test inputs) | xent (few-shot train labels)
        "shots": 64,               # aTLAS xent: labelled training examples per task
        "l1": 0.0, "l2": 0.0,
        "log_every": 100,
    })
    c.fisher = ml_collections.ConfigDict({"num_examples": 256, "labels": "sample"})
    c.regmean = ml_collections.ConfigDict({"num_examples": 512})
    c.twin = ml_collections.ConfigDict({"lam": 0.3, "rank_frac": 0.1, "keep_vectors": True, "router_steps": 300,
                                        "router_lr": 1e-2, "router_batch": 32, "mode": "soft"})
    c.coeffs_from = ""             # reuse learned coefficients (coeffs.json of an earlier merge) instead of adapting
    c.export = True                # write the merged artifact to WORKDIR/merged.mtl
    return c


def benchmark_merge_config(artifacts: str | None, method: str, **kwargs) -> ml_collections.ConfigDict:
    """A merge config over the artifacts ``experiments/merging.py`` writes to ``artifacts``.

    ``artifacts`` holds ``pretrained.mtl`` and ``ft_<task>.mtl`` for the eight
    tasks of :mod:`mtl.merging.benchmark` (default ``runs/merging``).
    """
    import os

    from mtl.merging.benchmark import TASKS

    artifacts = artifacts or "runs/merging"
    c = base_merge_config()
    c.name = method
    c.method = method
    c.pretrained = os.path.join(artifacts, "pretrained.mtl")
    c.finetuned = {t: os.path.join(artifacts, f"ft_{t}.mtl") for t in TASKS}
    c.tasks = TASKS
    c.kwargs = dict(kwargs)
    return c
