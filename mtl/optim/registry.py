"""Aggregators by name: ``get_aggregator("cagrad", c=0.5)``.

``AGGREGATORS``: methods of the weights protocol (:class:`~mtl.optim.base.Aggregator`);
``JAC_AGGREGATORS``: methods that need J itself (:class:`~mtl.optim.base.JacAggregator`,
``"jac" in agg.needs``). ``get_aggregator`` resolves both."""
from __future__ import annotations

import inspect

from mtl.optim import conflict, gradient, jacobian, scalarize, stochastic, weighting
from mtl.optim.base import Aggregator, JacAggregator

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
    "gls": scalarize.gls,
    "stch": scalarize.stch,
    "constant": scalarize.constant,
    "gradvac": conflict.gradvac,
    "config": conflict.config,
    "fairgrad": conflict.fairgrad,
    "krum": conflict.krum,
    "modo": stochastic.modo,
    "sdmgrad": stochastic.sdmgrad,
}

JAC_AGGREGATORS = {
    "graddrop": jacobian.graddrop,
    "trimmed_mean": jacobian.trimmed_mean,
    "moco": jacobian.moco,
    "db_mtl": jacobian.db_mtl,
    "excess_mtl": jacobian.excess_mtl,
}


def get_aggregator(name: str, **hparams) -> Aggregator | JacAggregator:
    """Build an aggregator by name ('-' and '_' are interchangeable, case is
    ignored). Unknown name: ValueError listing the valid ones; unknown
    hyper-parameter: TypeError naming it and the valid ones."""
    key = str(name).lower().replace("-", "_")
    every = {**AGGREGATORS, **JAC_AGGREGATORS}
    if key not in every:
        raise ValueError(f"unknown aggregator {name!r}; valid names: {', '.join(sorted(every))}")
    factory = every[key]
    params = inspect.signature(factory).parameters
    bad = sorted(set(hparams) - set(params))
    if bad:
        valid = ", ".join(f"{p}={v.default!r}" for p, v in params.items()) or "none"
        raise TypeError(f"aggregator {key!r} got unknown hyper-parameter(s) {', '.join(bad)}; "
                        f"valid: {valid}")
    return factory(**hparams)


def too_few_tasks(agg, num_tasks: int) -> str:
    """Why ``agg`` cannot run with ``num_tasks`` tasks, or ''. A reason is returned only when
    its ``init`` refuses that T but accepts a larger one (Krum and trimmed mean need T >= 3);
    an ``init`` that fails at every T (e.g. it needs the parameters' shapes) is not a
    task-count refusal, so it gives ''."""
    def refusal(t):
        try:
            agg.init(t)
        except Exception as e:  # noqa: BLE001 - any refusal; compared across T below
            return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        return ""

    why = refusal(num_tasks)
    return why if why and not refusal(max(64, 2 * num_tasks)) else ""
