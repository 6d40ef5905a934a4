"""Routes whose weights need no per-task gradient: one forward, one backward.

* :class:`FixedWeights` — plain EW (``train.loss_weights`` or 1): the gradient of
  ``Σ_t w_t L_t + aux`` with w constant; the trainer's original single-backward path.
* :class:`LossOnly` — RLW, UW, DWA, FAMO (and EW with sparse training): w is computed
  inside the forward from the (stop-gradient) losses. Heads ``"plain"`` (default) get
  their own unweighted loss's gradient: the cotangent flowing from head t into Z is scaled
  by w_t (:func:`~mtl.train.grad_tools.scale_grad`); a model without
  ``features``/``heads_from_features`` gets weighted heads.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl.tasks import losses_from_outputs
from mtl.train.grad_tools import scale_grad
from mtl.train.routes.base import RouteOut, StepInputs
from mtl.train.weigh import finite


class FixedWeights:
    cannot_accumulate = None

    def __init__(self, forward, weights):
        self.forward, self.weights = forward, jnp.asarray(weights, jnp.float32)

    def __call__(self, inp: StepInputs, weigh) -> RouteOut:
        w = self.weights

        def objective(params):
            losses, aux_loss, new_rest = self.forward.losses(params, inp.rest, inp.batch)
            return jnp.sum(w * losses) + aux_loss, (losses, aux_loss, new_rest)

        (_, (losses, aux_loss, new_rest)), grads = jax.value_and_grad(objective, has_aux=True)(inp.params)
        return RouteOut(grads, losses, aux_loss, new_rest, w, inp.agg_state, {})

    def accumulate(self, inp: StepInputs, micro, weigh) -> RouteOut:
        """(label-share-weighted) Σ_t w_t L_t + aux/K summed over the micro-batches."""
        w, k = self.weights, micro.k

        def objective(p, rest_m, mb, c):
            losses, aux_loss, new_rest = self.forward.losses(p, rest_m, mb)
            return jnp.sum(w * c * losses) + aux_loss / k, (losses, aux_loss, new_rest)

        grads, lm, am, new_rest = micro.scan_grads(objective, inp.params, inp.rest)
        return RouteOut(grads, micro.full(lm), jnp.mean(am), new_rest, w, inp.agg_state, {})


class LossOnly:
    cannot_accumulate = None

    def __init__(self, forward, plain_heads: bool):
        self.forward = forward
        self.plain_heads = plain_heads and forward.has_features

    def _plain_head_losses(self, params, rest, batch, ws_of):
        """Losses with heads that see their own unweighted loss while the encoder sees w_t
        times it; ``ws_of(losses0)`` gives the (stop-gradient) weights from the losses."""
        fw = self.forward
        model = fw.model(params, rest)
        z = model.features(batch["inputs"])
        losses0 = losses_from_outputs(fw.tasks, model.heads_from_features(z), batch)
        ws, carry = ws_of(losses0)
        outs = {t.name: model.heads[t.name](scale_grad(z, ws[i])) for i, t in enumerate(fw.tasks)}
        losses = losses_from_outputs(fw.tasks, outs, batch)
        return losses, fw.rest_of(model), carry

    def __call__(self, inp: StepInputs, weigh) -> RouteOut:
        def weights_of(losses):
            w, agg_state, _ = weigh(inp, losses)
            return jax.lax.stop_gradient(finite(w)), (w, agg_state)

        def objective(p):
            if self.plain_heads:
                losses, new_rest, (w, agg_state) = self._plain_head_losses(p, inp.rest, inp.batch, weights_of)
                return jnp.sum(losses), (losses, jnp.zeros((), jnp.float32), new_rest, w, agg_state)
            losses, aux, new_rest = self.forward.losses(p, inp.rest, inp.batch)
            ws, (w, agg_state) = weights_of(losses)
            return jnp.sum(ws * losses) + aux, (losses, aux, new_rest, w, agg_state)

        (_, (losses, aux, new_rest, w, agg_state)), grads = jax.value_and_grad(objective, has_aux=True)(inp.params)
        return RouteOut(grads, losses, aux, new_rest, w, agg_state, {})

    def accumulate(self, inp: StepInputs, micro, weigh) -> RouteOut:
        """A forward-only scan for the full-batch losses (skipped when the weights do not
        read them: EW, RLW), the weights, then a scan accumulating the gradient of
        Σ_t w_t L_t with w fixed (plain heads through ``scale_grad`` as at K = 1)."""
        full = micro.losses(inp.params, inp.rest) if weigh.needs_losses else None
        w, agg_state, _ = weigh(inp, full)
        ws = jax.lax.stop_gradient(finite(w))
        k = micro.k

        def objective(p, rest_m, mb, c):
            if self.plain_heads:
                losses, new_rest, _ = self._plain_head_losses(p, rest_m, mb, lambda _: (ws, None))
                return jnp.sum(c * losses), (losses, jnp.zeros((), jnp.float32), new_rest)
            losses, aux, new_rest = self.forward.losses(p, rest_m, mb)
            return jnp.sum(ws * c * losses) + aux / k, (losses, aux, new_rest)

        grads, lm, am, new_rest = micro.scan_grads(objective, inp.params, inp.rest)
        return RouteOut(grads, micro.full(lm), jnp.mean(am), new_rest, w, agg_state, {})
