"""Model merging: task vectors and merge methods as pure functions on parameter pytrees.

``τ_k = task_vector(θ_k, θ0, exclude=[...])``, then ``MERGERS[name](θ0, [τ_1..τ_K],
**hparams)``; :func:`merge_stream` runs the same methods tensor by tensor from
lazy sources.  Excluded (``None``) task-vector entries keep the pretrained value.
"""
from mtl.merging.fisher import estimate_fisher, fisher
from mtl.merging.registry import CORES, MERGERS, get_core, get_merger
from mtl.merging.regmean import gram, regmean
from mtl.merging.sources import DictSource, MergeInputs, Source, as_source
from mtl.merging.static import (average, average_models, combine, dare, dare_merge, layerwise_coeffs,
                                task_arithmetic, ties, ties_thresholds)
from mtl.merging.stream import merge_stream
from mtl.merging.tree import (check_compatible, flatten, path_filter, task_vector, task_vectors,
                              unflatten)

__all__ = [
    "flatten", "unflatten", "path_filter", "check_compatible", "task_vector", "task_vectors",
    "average", "average_models", "task_arithmetic", "combine", "layerwise_coeffs",
    "ties", "ties_thresholds", "dare", "dare_merge", "fisher", "estimate_fisher", "regmean", "gram",
    "MERGERS", "CORES", "get_merger", "get_core",
    "merge_stream", "Source", "DictSource", "as_source", "MergeInputs",
]
