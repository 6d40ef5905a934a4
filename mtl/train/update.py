"""The last stage of the train step: the optimizer update, guarded against non-finite steps.

A step whose losses, auxiliary loss, weights or gradient are not finite applies no update:
the state stays the last good one, and ``nonfinite_count`` / ``first_nonfinite`` record what
happened so the loop can stop (naming step and task) or carry on, as configured. With
sparse training only the masked shared entries (and the heads) move.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtl.optim.sparse import apply_mask
from mtl.train.grad_tools import join, split_shared
from mtl.train.routes.base import RouteOut
from mtl.train.weigh import finite


def objective_value(out: RouteOut):
    """Σ_t w_t L_t + aux (non-finite weights counted as 0), the step's reported loss."""
    return jnp.sum(finite(out.w) * out.losses) + out.aux_loss


def apply_update(tx, state, out: RouteOut, *, sparse: bool = False, post=None):
    """(new TrainState, metrics) from the route's output ``out``. ``post(params, rest,
    agg_state) -> agg_state`` is the aggregator's post-step update, given the updated
    parameters (FAMO's same-batch update)."""
    agg_state = out.agg_state
    updates, opt_state = tx.update(out.grads, state.opt_state, state.params)
    if sparse:
        shared_u, heads_u, keys = split_shared(updates)
        updates = join(apply_mask(shared_u, state.sparse_mask), heads_u, keys)
    params = optax.apply_updates(state.params, updates)
    if post is not None:
        agg_state = post(params, out.rest, agg_state)
    gnorm = optax.tree.norm(out.grads)
    finite_losses = jnp.isfinite(out.losses)
    ok = (jnp.all(finite_losses) & jnp.isfinite(gnorm) & jnp.isfinite(out.aux_loss)
          & jnp.all(jnp.isfinite(out.w)))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    bad_task = jnp.where(jnp.all(finite_losses), -1, jnp.argmin(finite_losses)).astype(jnp.int32)
    first = jnp.where((state.first_nonfinite[0] < 0) & ~ok,
                      jnp.stack([state.step, bad_task]), state.first_nonfinite)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              rest=keep(out.rest, state.rest), opt_state=keep(opt_state, state.opt_state),
                              nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
                              first_nonfinite=first, agg_state=keep(agg_state, state.agg_state))
    metrics = {"loss": objective_value(out), "losses": out.losses, "aux_loss": out.aux_loss, "grad_norm": gnorm,
               "ok": ok, "weights": jnp.broadcast_to(out.w, out.losses.shape), **out.extras}
    return new_state, metrics
