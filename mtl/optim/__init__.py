"""Per-task gradient aggregation and loss weighting, as pure functions.

See :mod:`mtl.optim.base` for the protocol a trainer follows."""
from mtl.optim.base import Aggregator, aggregate, gramian
from mtl.optim.diagnostics import gradient_stats
from mtl.optim.flat import fmtl_perturbation
from mtl.optim.gradient import (aligned_mtl, aligned_mtl_matrix, cagrad, dual_cone_weights,
                                dualproj, imtl_g, imtl_g_weights, mgda, mgda_two_tasks, nash_mtl,
                                pcgrad, pcgrad_order, pcgrad_weights, upgrad)
from mtl.optim.registry import AGGREGATORS, get_aggregator
from mtl.optim.sparse import apply_mask, topk_mask
from mtl.optim.weighting import dwa, ew, famo, gradnorm, gradnorm_grad, rlw, uw, uw_objective

__all__ = [
    "AGGREGATORS", "Aggregator", "aggregate", "aligned_mtl", "aligned_mtl_matrix", "apply_mask",
    "cagrad", "dual_cone_weights", "dualproj", "dwa", "ew", "famo", "fmtl_perturbation",
    "get_aggregator", "gradient_stats", "gradnorm", "gradnorm_grad", "gramian", "imtl_g",
    "imtl_g_weights", "mgda", "mgda_two_tasks", "nash_mtl", "pcgrad", "pcgrad_order",
    "pcgrad_weights", "rlw", "topk_mask", "upgrad", "uw", "uw_objective",
]
