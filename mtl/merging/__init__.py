"""Model merging: task vectors and merge methods as pure functions on parameter pytrees.

    tvs = task_vectors([θ_1, ..., θ_K], θ0, exclude=["heads/*"])
    merged = get_merger("ties", k=20)(θ0, tvs)          # or MERGERS["ties"](θ0, tvs, k=20)
    flat = merge_stream("ties", θ0_source, [θ_k sources], exclude=["heads/*"], k=20)

From the command line: ``mtl merge --config configs/merge_NAME.py --workdir DIR``
(:mod:`mtl.merging.run`, schema in :mod:`mtl.merging.config`; the eight-task
offline benchmark data is :mod:`mtl.merging.benchmark`).

Documented choices (details in each module):

- Exclusions: excluded task-vector entries are ``None``; every merge copies
  them from ``θ0``; they are not counted anywhere (TIES' top-k).  Parameters
  only in the fine-tuned models (task heads) must be excluded and are the
  caller's business.  Non-floating leaves are never merged.
- TIES: keep ``|τ| >= t`` with ``t`` the ``round(k N / 100)``-th largest
  float32 magnitude over all included entries of that task; all entries tied
  at ``t`` are kept.  Zero-sum sign election elects no sign: the entry stays
  at ``θ0``.  Modes ``mean`` / ``sum`` / ``max``; default ``lam = 1``.
- DARE: task ``k``'s tensor at ``path`` draws its mask with
  ``fold_in(fold_in(key, k), crc32(path))``; survivors are multiplied by
  ``1/(1-p)``; default ``p = 0.5``, then task arithmetic (``then="ties"``
  etc. also work).
- Fisher: weights ``c_k (F_k + eps)``, ``eps = 1e-8``;
  :func:`estimate_fisher` defaults to labels *sampled* from the model
  (``"argmax"`` and exact ``"expected"`` are options).
- RegMean: off-diagonal shrinkage ``α = 0.9``; params without a Gram are
  averaged; dead input features take the plain average.
- Adaptive (:mod:`mtl.merging.adaptive`): AdaMerging task-/layer-wise and
  ++ (TIES-masked vectors), aTLAS (block-wise, random partitions); one jitted
  step differentiates the objective w.r.t. the coefficients only, with the
  task vectors stacked ``[K, ...]`` per tensor and passed once.
- Twin-Merging (:mod:`mtl.merging.twin`): TA shared expert + SVD-compressed
  exclusive vectors + a linear router, merged per input.
- Results have the pretrained dtype (compute in >= float32); streaming and
  sharded runs give the same numbers as the in-memory, single-device ones.
"""
from mtl.merging.adaptive import (AdaptiveMerge, adamerging, apply_from_graphdef, atlas, load_coeffs,
                                  save_coeffs, stack_task_vectors, ties_masked_vectors)
from mtl.merging.fisher import estimate_fisher, fisher
from mtl.merging.registry import CORES, MERGERS, dare_merge, get_core, get_merger
from mtl.merging.regmean import gram, regmean
from mtl.merging.sources import DictSource, MergeInputs, Source, as_source
from mtl.merging.static import (average, average_models, combine, dare, layerwise_coeffs,
                                task_arithmetic, ties, ties_thresholds)
from mtl.merging.stream import merge_stream
from mtl.merging.twin import TwinMerge, train_router
from mtl.merging.tree import (check_compatible, flatten, path_filter, task_vector, task_vectors,
                              unflatten)

__all__ = [
    "flatten", "unflatten", "path_filter", "check_compatible", "task_vector", "task_vectors",
    "average", "average_models", "task_arithmetic", "combine", "layerwise_coeffs",
    "ties", "ties_thresholds", "dare", "dare_merge", "fisher", "estimate_fisher", "regmean", "gram",
    "MERGERS", "CORES", "get_merger", "get_core",
    "AdaptiveMerge", "adamerging", "atlas", "apply_from_graphdef", "stack_task_vectors", "ties_masked_vectors",
    "save_coeffs", "load_coeffs", "TwinMerge", "train_router",
    "merge_stream", "Source", "DictSource", "as_source", "MergeInputs",
]
