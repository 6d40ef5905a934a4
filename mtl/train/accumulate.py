"""Gradient accumulation for every aggregator (``train.accum_steps = K > 1``).

:meth:`TaskGradients.accumulated` takes the batch split into K micro-batches and gives the full-batch step's weights,
update, losses, state and diagnostics (up to float rounding) with one micro-batch's
activation memory. Everything rests on :func:`label_shares`: task losses are masked means,
so ``L_t = Σ_m s_mt L_t^m`` with ``s_mt = n_t^m / n_t`` (micro-batch m's share of task t's
labels), and the same holds for every per-task gradient. Loss-only methods: a forward-only
scan for the full-batch losses (skipped when the weights do not read them), the weights,
then a scan accumulating ∇ Σ_t w_t L_t with w fixed (plain heads via ``scale_grad`` per
micro-batch). ``grad_on="params"``: one scan summing the share-scaled Jacobian rows
(the auxiliary loss's row scaled 1/K: its full-batch value is the micro-batch mean), then
exactly the K = 1 tail (:meth:`TaskGradients._from_jacobian`). ``grad_on="representation"``:
Z of different micro-batches are disjoint rows, so G = Σ_m G_m; a first scan accumulates
G, the losses and the heads' gradients, a second re-runs each micro-batch's encoder and
pulls Σ_t w_t s_mt ∂L_t^m/∂Z_m back (recomputed, not kept). Not exact, so refused by
:meth:`TaskGradients.check_accumulation`: F-MTL, Rep-MTL, ``jacobian="stream"``.

The methods here are mixed into :class:`mtl.train.aggregate.TaskGradients` and use its
K = 1 pieces (``_weights``, ``_pre``, ``_finish``, ``_from_jacobian``, ``_head_z_grads``,
``_scale_heads``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.optim import gramian
from mtl.tasks import losses_from_outputs
from mtl.train.grad_tools import join, label_shares, per_task_pullbacks, scale_grad, split_shared


def scan_grads(objective, params, rest, micro, shares, prepare):
    """Σ over micro-batches of ∇_params ``objective(p, rest_m, mb, share_m)``, one micro-batch's
    activations at a time (``lax.scan``). ``objective`` returns ``(value, (losses [T], aux,
    new_rest))``; ``prepare`` is applied to each micro-batch first and the non-parameter
    state is threaded through in order. Returns (grads, losses [K, T], aux [K], new_rest)."""
    def body(carry, xs):
        acc, rest_m = carry
        mb, c = xs
        mb = prepare(mb)
        (_, (losses, aux, new_rest)), g = jax.value_and_grad(
            lambda p: objective(p, rest_m, mb, c), has_aux=True)(params)
        return (jax.tree.map(jnp.add, acc, g), new_rest), (losses, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, new_rest), (lm, am) = jax.lax.scan(body, (zeros, rest), (micro, shares))
    return grads, lm, am, new_rest


class Accumulation:
    """The K-micro-batch entry points of :class:`~mtl.train.aggregate.TaskGradients`."""

    def check_accumulation(self, accum_steps: int) -> None:
        """ValueError (at ``Steps`` construction, before anything is written) for the settings
        whose K-micro-batch step cannot equal the full-batch step."""
        if accum_steps <= 1:
            return
        why = None
        if self.spec.fmtl_rho > 0:
            why = ("F-MTL (optim.fmtl_rho > 0) takes every task's gradient again at parameters perturbed "
                   "along that task's full-batch gradient: T more passes over the whole batch at T different "
                   "points, which accumulation does not reproduce")
        elif self.spec.rep_mtl > 0:
            why = ("Rep-MTL (optim.rep_mtl > 0) regularises per-sample saliencies with an InfoNCE term that "
                   "contrasts every sample against the whole batch, so it does not split into micro-batches")
        elif (self.spec.grad_on == "params" and self.spec.jacobian == "stream"
              and (self.needs_gram or self.spec.diagnostics_every > 0)):
            why = ("optim.jacobian='stream' never holds J, but the full-batch Gramian of a sum of "
                   "micro-batch Jacobians is not the sum of their Gramians; use optim.jacobian='keep' (J summed "
                   "over the micro-batches, memory of one J) or optim.grad_on='representation'")
        if why:
            raise ValueError(f"train.accum_steps={accum_steps} (gradient accumulation) cannot be exact here: "
                             f"{why}. Use train.accum_steps=1 (with a batch that fits) or change optim.")

    def accumulated(self, params, rest, micro, agg_state, key, step, *, prepare=None,
                    diagnostics: bool = False, sparse_mask=None):
        """:meth:`__call__` for a batch split into micro-batches ``micro`` ([K, B/K, ...]),
        with one micro-batch's activation memory: the same update, weights, losses and
        aggregator state as the full-batch step (up to float rounding). ``prepare(mb)`` is
        applied to every micro-batch inside the scans (sharding constraints, pooled routing
        counts). Passes, per path:

        * loss-only: a forward-only scan for the full-batch losses (skipped when the weights
          do not read them: EW, RLW), the weights, then a scan accumulating the gradient of
          Σ_t w_t L_t with w fixed (heads "plain" through ``scale_grad`` as in the K=1 step);
        * ``grad_on="params"``: one scan summing the micro-batches' Jacobian rows, each row
          scaled by the micro-batch's label share (the carry holds one J, T × parameters);
          then G, w and wᵀJ as in the K=1 step;
        * ``grad_on="representation"``: Z rows of different micro-batches are disjoint, so
          G = Σ_m G_m; a first scan accumulates G, the losses and the heads' gradients, a
          second recomputes each micro-batch's encoder and pulls Σ_t w_t ∂L_t/∂Z back
          through it (no VJP kept across micro-batches).

        Returns (grads, losses, aux_loss, new_rest, w, new_agg_state, extras)."""
        prepare = prepare or (lambda mb: mb)
        shares, present = label_shares(self.tasks, micro)
        if self.spec.fmtl_rho > 0 or self.spec.rep_mtl > 0:
            raise ValueError("F-MTL / Rep-MTL are not accumulated (see check_accumulation)")
        if not (self.always_jacobian or diagnostics):
            return self._acc_loss_only(params, rest, micro, shares, present, agg_state, key, step, prepare)
        if self.spec.grad_on == "representation":
            return self._acc_representation(params, rest, micro, shares, present, agg_state, key, step, prepare,
                                            sparse_mask)
        if self.spec.jacobian == "stream":
            raise ValueError("optim.jacobian='stream' cannot be accumulated (see check_accumulation); "
                             "use optim.jacobian='keep'")
        return self._acc_params(params, rest, micro, shares, present, agg_state, key, step, prepare, sparse_mask)

    def accumulated_losses(self, params, rest, micro, prepare=None):
        """Full-batch per-task losses [T] from a forward-only scan over ``micro``."""
        prepare = prepare or (lambda mb: mb)
        shares, _ = label_shares(self.tasks, micro)

        def body(rest_m, mb):
            losses, _, new_rest = self.losses_fn(params, rest_m, prepare(mb))
            return new_rest, losses

        _, lm = jax.lax.scan(body, rest, micro)
        return jnp.sum(shares * lm, axis=0)

    def accumulated_sum_grad(self, params, rest, micro, prepare=None):
        """∇_θ Σ_t L_t on the whole batch (no auxiliary loss), accumulated over ``micro``."""
        prepare = prepare or (lambda mb: mb)
        shares, _ = label_shares(self.tasks, micro)

        def objective(p, rest_m, mb, c):
            losses, aux, new_rest = self.losses_fn(p, rest_m, mb)
            return jnp.sum(c * losses), (losses, aux, new_rest)

        return scan_grads(objective, params, rest, micro, shares, prepare)[0]

    def _acc_loss_only(self, params, rest, micro, shares, present, agg_state, key, step, prepare):
        k = shares.shape[0]
        plain_heads = self.spec.head_grads == "plain" and self.has_features
        if "losses" in self.agg.needs or self.agg.post_step:
            full = self.accumulated_losses(params, rest, micro, prepare)
            main = self._pre(agg_state, full, present)
            w, new_main = self._weights(main, gram=None, losses=full, key=key, step=step, present=present)
        else:  # EW, RLW: the weights do not read the losses, no extra forward pass
            w, new_main = self._weights(agg_state["main"], gram=None, losses=None, key=key, step=step,
                                        present=present)
        ws = jax.lax.stop_gradient(jnp.where(jnp.isfinite(w), w, 0.0))

        def objective(p, rest_m, mb, c):
            if plain_heads:  # heads: own unweighted loss; encoder: w_t times it
                model = nnx.merge(self.graphdef, p, rest_m)
                z = model.features(mb["inputs"])
                outs = {t.name: model.heads[t.name](scale_grad(z, ws[i])) for i, t in enumerate(self.tasks)}
                losses = losses_from_outputs(self.tasks, outs, mb)
                new_rest = nnx.split(model, nnx.Param, ...)[2]
                return jnp.sum(c * losses), (losses, jnp.zeros((), jnp.float32), new_rest)
            losses, aux, new_rest = self.losses_fn(p, rest_m, mb)
            return jnp.sum(ws * c * losses) + aux / k, (losses, aux, new_rest)

        grads, lm, am, new_rest = scan_grads(objective, params, rest, micro, shares, prepare)
        losses = jnp.sum(shares * lm, axis=0)
        return grads, losses, jnp.mean(am), new_rest, w, {**agg_state, "main": new_main}, {}

    def _acc_params(self, params, rest, micro, shares, present, agg_state, key, step, prepare, sparse_mask):
        k = shares.shape[0]
        shared, heads, keys = split_shared(params)
        rows = len(self.tasks) + int(self.has_aux)

        def body(carry, xs):
            js_acc, jh_acc, rest_m = carry
            mb, c = xs
            mb = prepare(mb)

            def vec(s, h):  # rows scaled so that their sum over micro-batches is the full-batch J
                losses, aux, new_rest = self.losses_fn(join(s, h, keys), rest_m, mb)
                out = jnp.concatenate([c * losses, aux[None] / k]) if self.has_aux else c * losses
                return out, (losses, aux, new_rest)

            js, jh, (losses, aux, new_rest) = per_task_pullbacks(vec, shared, heads)
            return (jax.tree.map(jnp.add, js_acc, js), jax.tree.map(jnp.add, jh_acc, jh), new_rest), (losses, aux)

        zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros((rows,) + a.shape, a.dtype), tree)
        (js, jh, new_rest), (lm, am) = jax.lax.scan(body, (zeros(shared), zeros(heads), rest), (micro, shares))
        losses = jnp.sum(shares * lm, axis=0)
        grads, w, new_state, extras = self._from_jacobian(js, jh, keys, losses, agg_state, key, step, present,
                                                          sparse_mask)
        return grads, losses, jnp.mean(am), new_rest, w, new_state, extras

    def _acc_representation(self, params, rest, micro, shares, present, agg_state, key, step, prepare,
                            sparse_mask):
        t = len(self.tasks)
        shared, heads, keys = split_shared(params)

        def first(carry, xs):  # G, losses and head gradients; no VJP of the encoder kept
            gram, gh_acc, rest_m = carry
            mb, c = xs
            mb = prepare(mb)
            model = nnx.merge(self.graphdef, params, rest_m)
            z = model.features(mb["inputs"])
            rest1 = nnx.split(model, nnx.Param, ...)[2]
            zs = jnp.broadcast_to(z, (t,) + z.shape)
            losses, jz, gh, new_rest = self._head_z_grads(shared, heads, keys, rest1, mb, zs)
            jz = jz * c.astype(jz.dtype).reshape((t,) + (1,) * (jz.ndim - 1))
            gh = self._scale_heads(gh, c)
            return (gram + gramian(jz), jax.tree.map(jnp.add, gh_acc, gh), new_rest), (losses, rest_m)

        init = (jnp.zeros((t, t), jnp.float32), jax.tree.map(jnp.zeros_like, heads), rest)
        (gram, gh, new_rest), (lm, rests) = jax.lax.scan(first, init, (micro, shares))
        losses = jnp.sum(shares * lm, axis=0)
        w, new_state, extras = self._finish(agg_state, losses, gram, key, step, present, gram)
        ws = jnp.where(jnp.isfinite(w), w, 0.0)

        def second(acc, xs):  # the encoder again, pulling back Σ_t w_t ∂L_t/∂Z_m
            mb, c, rest_m = xs
            mb = prepare(mb)

            def objective(s):
                model = nnx.merge(self.graphdef, join(s, heads, keys), rest_m)
                z = model.features(mb["inputs"])
                outs = {tk.name: model.heads[tk.name](z) for tk in self.tasks}
                return jnp.sum(ws * c * losses_from_outputs(self.tasks, outs, mb))

            return jax.tree.map(jnp.add, acc, jax.grad(objective)(shared)), None

        g_shared, _ = jax.lax.scan(second, jax.tree.map(jnp.zeros_like, shared), (micro, shares, rests))
        if sparse_mask is not None:
            g_shared = jax.tree.map(lambda a, m: a * m.astype(a.dtype), g_shared, sparse_mask)
        g_heads = self._scale_heads(gh, ws) if self.weighted_heads else gh
        aux = jnp.zeros((), jnp.float32)
        return join(g_shared, g_heads, keys), losses, aux, new_rest, w, new_state, extras
