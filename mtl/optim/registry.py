"""Aggregators by name: ``get_aggregator("cagrad", c=0.5)``."""
from __future__ import annotations

import inspect

from mtl.optim import gradient, weighting
from mtl.optim.base import Aggregator

AGGREGATORS = {
    "ew": weighting.ew,
    "rlw": weighting.rlw,
    "uw": weighting.uw,
    "dwa": weighting.dwa,
    "gradnorm": weighting.gradnorm,
    "famo": weighting.famo,
    "mgda": gradient.mgda,
    "pcgrad": gradient.pcgrad,
    "cagrad": gradient.cagrad,
    "imtl_g": gradient.imtl_g,
    "nash_mtl": gradient.nash_mtl,
    "aligned_mtl": gradient.aligned_mtl,
    "upgrad": gradient.upgrad,
    "dualproj": gradient.dualproj,
}


def get_aggregator(name: str, **hparams) -> Aggregator:
    """Build an aggregator by name ('-' and '_' are interchangeable, case is
    ignored). Unknown name: ValueError listing the valid ones; unknown
    hyper-parameter: TypeError naming it and the valid ones."""
    key = str(name).lower().replace("-", "_")
    if key not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; valid names: {', '.join(sorted(AGGREGATORS))}")
    factory = AGGREGATORS[key]
    params = inspect.signature(factory).parameters
    bad = sorted(set(hparams) - set(params))
    if bad:
        valid = ", ".join(f"{p}={v.default!r}" for p, v in params.items()) or "none"
        raise TypeError(f"aggregator {key!r} got unknown hyper-parameter(s) {', '.join(bad)}; "
                        f"valid: {valid}")
    return factory(**hparams)
