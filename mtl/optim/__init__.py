"""Per-task gradient aggregation and loss weighting, as pure functions.

See :mod:`mtl.optim.base` for the protocol a trainer follows."""
from mtl.optim.base import Aggregator, JacAggregator, aggregate, gramian
from mtl.optim.conflict import (alpha_fair_point, config, config_weights, fairgrad, gradvac,
                                gradvac_weights, krum, krum_weights)
from mtl.optim.diagnostics import gradient_stats
from mtl.optim.flat import fmtl_perturbation
from mtl.optim.gradient import (aligned_mtl, aligned_mtl_matrix, cagrad, dual_cone_weights,
                                dualproj, imtl_g, imtl_g_weights, mgda, mgda_two_tasks, nash_mtl,
                                pcgrad, pcgrad_order, pcgrad_weights, upgrad)
from mtl.optim.jacobian import db_mtl, excess_mtl, graddrop, moco, trimmed_mean
from mtl.optim.registry import AGGREGATORS, JAC_AGGREGATORS, get_aggregator, too_few_tasks
from mtl.optim.scalarize import constant, gls, stch
from mtl.optim.sparse import apply_mask, topk_mask
from mtl.optim.stochastic import modo, sdmgrad
from mtl.optim.weighting import dwa, ew, famo, gradnorm, gradnorm_grad, rlw, uw, uw_objective

__all__ = [
    "AGGREGATORS", "Aggregator", "JAC_AGGREGATORS", "JacAggregator", "aggregate",
    "aligned_mtl", "aligned_mtl_matrix", "alpha_fair_point", "apply_mask", "cagrad", "config",
    "config_weights", "constant", "db_mtl", "dual_cone_weights", "dualproj", "dwa", "ew",
    "excess_mtl", "fairgrad", "famo", "fmtl_perturbation", "get_aggregator", "gls",
    "gradient_stats", "graddrop", "gradnorm", "gradnorm_grad", "gradvac", "gradvac_weights",
    "gramian", "imtl_g", "imtl_g_weights", "krum", "krum_weights", "mgda", "mgda_two_tasks",
    "moco", "modo", "nash_mtl", "pcgrad", "pcgrad_order", "pcgrad_weights", "rlw", "sdmgrad",
    "stch", "too_few_tasks", "topk_mask", "trimmed_mean", "upgrad", "uw", "uw_objective",
]
