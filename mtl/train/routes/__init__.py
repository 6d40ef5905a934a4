"""Gradient routes: how the train step gets what the aggregator needs, and the update.

============================  =============================================================
route                         when (``config.optim``)
============================  =============================================================
:class:`FixedWeights`         plain EW (no diagnostics this step): one backward of Σ w_t L_t
:class:`LossOnly`             weights from losses only (RLW, UW, DWA, FAMO, EW + sparse)
:class:`ParamJacobian`        Gramian methods / diagnostics, ``grad_on="params"``
:class:`StreamedJacobian`     same, ``jacobian="stream"`` (G without keeping J)
:class:`BatchGramian`         same, ``jacobian="gram"`` (G from layer inputs and cotangents)
:class:`Representation`       ``grad_on="representation"`` (G on the shared representation)
============================  =============================================================

Every route is ``route(inp: StepInputs, weigh) -> RouteOut`` (:mod:`.base`);
:func:`make_route` picks one, :class:`mtl.train.accumulate.Accumulated` wraps any of them.
"""
from __future__ import annotations

from mtl.train.routes.base import RouteOut, StepInputs, masked
from mtl.train.routes.batch_gram import BatchGramian
from mtl.train.routes.jacobian import ParamJacobian, StreamedJacobian
from mtl.train.routes.loss_only import FixedWeights, LossOnly
from mtl.train.routes.representation import Representation, rep_mtl_penalty

__all__ = ["BatchGramian", "FixedWeights", "LossOnly", "ParamJacobian", "Representation", "RouteOut", "StepInputs",
           "StreamedJacobian", "builds_gram", "make_route", "masked", "rep_mtl_penalty"]


def builds_gram(spec, weigh) -> bool:
    """The ordinary step takes per-task gradients (and so returns diagnostics) every step."""
    return weigh.needs_gram or weigh.combines or spec.fmtl_rho > 0 or spec.rep_mtl > 0


def make_route(spec, weigh, forward, *, diagnostics: bool = False, loss_weights=None):
    """The route for ``spec`` (an :class:`~mtl.train.spec.OptimSpec`) on ``forward``'s model.

    ``diagnostics=True``: the route of a diagnostics step, which must build G even for a
    loss-only method (then it applies the same update as the ordinary step)."""
    if not (diagnostics or builds_gram(spec, weigh)):
        if spec.is_plain_ew:
            return FixedWeights(forward, weigh.loss_weights if loss_weights is None else loss_weights)
        return LossOnly(forward, plain_heads=spec.head_grads == "plain")
    if spec.grad_on == "representation":
        return Representation(forward, rep_mtl=spec.rep_mtl)
    if spec.jacobian == "stream":
        return StreamedJacobian(forward)
    if spec.jacobian == "gram":
        return BatchGramian(forward)
    return ParamJacobian(forward, fmtl_rho=spec.fmtl_rho)
