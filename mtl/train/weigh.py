"""The aggregator stage of the train step: (losses, G) -> task weights w.

:class:`Weigh` wraps one :mod:`mtl.optim` aggregator with what the step adds around it:
the aggregator state layout (``{"main": ..., "flat": ...}``, the second copy for F-MTL's
h-gradients), FAMO's pre- and post-step updates, fixed EW loss weights
(``train.loss_weights``) and the gradient diagnostics read off G. Routes call it once they
have what it needs; it never sees parameters or gradients.

FAMO's post-step update needs losses after the step. With ``update_on="same_batch"`` (its
default, as the authors' code) the step re-evaluates its own batch with the updated
parameters (one extra forward pass) and calls :meth:`Weigh.post_update`; with
``update_on="next_batch"`` step k first calls ``agg.update(state, losses=L_k)`` on its
own batch's losses (:meth:`Weigh.__call__`) and then ``agg.weights`` — no extra forward
pass, noisier.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl.optim import gramian
from mtl.optim.diagnostics import gradient_stats
from mtl.train.spec import OptimSpec


class Weigh:
    def __init__(self, spec: OptimSpec, num_tasks: int, loss_weights=None):
        self.spec, self.num_tasks = spec, int(num_tasks)
        self.agg = spec.make_aggregator()
        # fixed EW weights (train.loss_weights; plain EW only): they scale EW's weights, so the
        # Jacobian route (diagnostics steps) applies the same weighted update as the plain one
        self.loss_weights = None if loss_weights is None else jnp.asarray(loss_weights, jnp.float32)

    # ---------------------------------------------------------------- what the routes ask
    @property
    def needs_gram(self) -> bool:
        return "gram" in self.agg.needs

    @property
    def combines(self) -> bool:
        """The method combines J itself (:class:`~mtl.optim.base.JacAggregator`: GradDrop,
        Trimmed mean, MoCo, DB-MTL, ExcessMTL) instead of weighting the tasks."""
        return "jac" in self.agg.needs

    @property
    def needs_losses(self) -> bool:
        """The weights read this step's losses (or the state is updated from them)."""
        return "losses" in self.agg.needs or self.agg.post_step

    @property
    def weighted_heads(self) -> bool:
        """Heads get w_t ∇L_t: ``head_grads="weighted"``, or fixed EW loss weights (plain EW
        weights its heads too, and the Jacobian route must apply the same update)."""
        return self.spec.head_grads == "weighted" or self.loss_weights is not None

    @property
    def same_batch_update(self) -> bool:
        """The aggregator's post-step update wants the losses of this step's batch after
        the update (FAMO's default): the step calls :meth:`post_update`."""
        return self.agg.post_step and dict(self.agg.hparams or {}).get("update_on") == "same_batch"

    def init_state(self, like=None):
        """``like``: the shared parameters (J-methods whose state holds per-task gradients)."""
        main = self.agg.init(self.num_tasks, like=like) if self.combines else self.agg.init(self.num_tasks)
        flat = self.agg.init(self.num_tasks) if (self.spec.fmtl_rho > 0 and self.needs_gram) else ()
        return {"main": main, "flat": flat}

    # ---------------------------------------------------------------- the stage itself
    def __call__(self, inp, losses, gram=None):
        """(w [T], new aggregator state, extras) for this step. ``inp`` is the step's
        :class:`~mtl.train.routes.StepInputs`; ``gram`` the Gramian of the per-task gradients
        (None on loss-only routes). With a Gramian the extras hold the diagnostics (per-task
        gradient norms, pairwise cosines, conflict fraction)."""
        main = inp.agg_state["main"]
        if self.agg.post_step and not self.same_batch_update:
            # FAMO, next-batch variant: the previous step's update, on this step's losses
            main = self.agg.update(main, losses=jax.lax.stop_gradient(losses), present=inp.present)
        w, main, info = self._weights(main, gram, losses, inp, with_info=True)
        extras = {}
        if gram is not None:
            st = gradient_stats(gram, inp.present)
            extras = {"cosines": st["cosines"], "conflict_fraction": st["conflict_fraction"],
                      "grad_norms": st["norms"]}
            # the solver's certificate of the returned weights (KKT residual / duality gap /
            # Newton decrement, mtl.optim.solvers), logged with the diagnostics
            if "certificate" in info:
                extras["solver_certificate"] = info["certificate"]
                extras["solver_iterations"] = info["iterations"]
        return w, {**inp.agg_state, "main": main}, extras

    def combine(self, inp, losses, jac, activation=None):
        """A J-method's direction from the rows ``jac`` (leading axis T) — the shared update
        (or the representation's cotangent) itself. Returns (direction, w, new aggregator
        state, extras): these methods define no task weights, so ``w`` is 1 for each present
        task (what the logs show, and what weights the plain heads), NaN everywhere when the
        direction is not finite (the step is then skipped)."""
        d, main = self.agg.combine(inp.agg_state["main"], jac=jac, losses=jax.lax.stop_gradient(losses),
                                   key=inp.key, step=inp.step, present=inp.present, activation=activation)
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(d)]))
        w = jnp.where(ok, inp.present.astype(jnp.float32), jnp.nan)
        st = gradient_stats(gramian(jac), inp.present)
        extras = {"cosines": st["cosines"], "conflict_fraction": st["conflict_fraction"], "grad_norms": st["norms"]}
        return d, w, {**inp.agg_state, "main": main}, extras

    def head_weights(self, w, losses, present):
        """Weights of the heads' own gradients for a J-method: 1 per present task, except
        DB-MTL, whose heads follow Σ_t log(L_t + 1e-8) as in LibMTL (1 / (L_t + 1e-8))."""
        if self.agg.name == "db_mtl":
            return jnp.where(present, 1.0 / (jax.lax.stop_gradient(losses) + 1e-8), 0.0) * finite(w)
        return finite(w)

    def flat(self, inp, agg_state, losses, gram_h):
        """F-MTL's h-weights from the second aggregator copy on G_h (Gramian methods; the
        loss-only ones reuse w). Returns (wh, new aggregator state)."""
        wh, flat = self._weights(agg_state["flat"], gram_h, losses, inp)
        return wh, {**agg_state, "flat": flat}

    def post_update(self, agg_state, losses_after, present):
        """The post-step update on the step's own batch re-evaluated after the update."""
        main = self.agg.update(agg_state["main"], losses=jax.lax.stop_gradient(losses_after), present=present)
        return {**agg_state, "main": main}

    def _weights(self, st, gram, losses, inp, with_info: bool = False):
        kw = dict(gram=gram, losses=None if losses is None else jax.lax.stop_gradient(losses),
                  key=inp.key, step=inp.step, present=inp.present)
        info = {}
        if getattr(self.agg, "weights_info", None) is not None:
            w, st, info = self.agg.weights_info(st, **kw)
        else:
            w, st = self.agg.weights(st, **kw)
        if self.loss_weights is not None and self.spec.is_plain_ew:
            w = self.loss_weights.astype(w.dtype) * w
        return (w, st, info) if with_info else (w, st)


def finite(w):
    """w with non-finite entries replaced by 0 (a non-finite w still marks the step bad)."""
    return jnp.where(jnp.isfinite(w), w, 0.0)
