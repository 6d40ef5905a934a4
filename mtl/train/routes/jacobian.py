"""Routes on the parameter Jacobian (``optim.grad_on="params"``).

* :class:`ParamJacobian` (``optim.jacobian="keep"``): J of the loss vector over *all*
  parameters (1 forward + T backward passes, :func:`per_task_pullbacks`; a model with one
  shared representation backpropagates through the heads once and T times through the
  encoder only, so head work does not grow as T²); G = J_s J_sᵀ over
  the *shared* parameters J_s (every parameter outside ``heads``); the shared update is
  wᵀJ_s, read off the Jacobian that is already there. F-MTL (``fmtl_rho > 0``): each
  task's shared parameters are perturbed by ρ g_t/‖g_t‖, h_t = ∇L_t(θ + ε_t) − g_t (T more
  forward+backward passes), and the shared update is Agg({g_t}) + Agg({h_t}); for Gramian
  methods the h-weights come from a second copy of the aggregator state on G_h = H Hᵀ,
  loss-only methods reuse w.
* :class:`StreamedJacobian` (``optim.jacobian="stream"``): G without keeping J. The T
  backward passes run batched (``vmap`` of the pullback), and every shared parameter's
  Jacobian block is reduced to its T × T share of G as soon as it is produced; the update
  is one more backward pass, of Σ_t w_t L_t: 1 forward + T + 1 backward.

Heads: ``"plain"`` gives each head the gradient of its own unweighted loss (weight 1 for
a present task), ``"weighted"`` w_t ∇L_t. The model's auxiliary loss (if any) is one more
row of J, added to the update unweighted. A sparse-training mask multiplies J_s before G.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl.optim import aggregate, fmtl_perturbation, gramian
from mtl.train.grad_tools import join, per_task_pullbacks, pullback_rows, split_shared
from mtl.train.routes.base import RouteOut, StepInputs, masked
from mtl.train.weigh import finite


def _loss_vector(forward, layout, rest, batch, scale=None, k=1):
    """``vec(shared, heads) -> (losses [T] (+ aux), (losses, aux, new_rest))`` for the
    Jacobian; with ``scale`` (label shares) the rows are scaled so that their sum over
    micro-batches is the full-batch J (the aux row by 1/K)."""
    def vec(s, h):
        losses, aux, new_rest = forward.losses(join(s, h, layout), rest, batch)
        rows = losses if scale is None else scale * losses
        out = jnp.concatenate([rows, (aux / k)[None]]) if forward.has_aux else rows
        return out, (losses, aux, new_rest)
    return vec


class ParamJacobian:
    def __init__(self, forward, fmtl_rho: float = 0.0):
        self.forward, self.fmtl_rho = forward, float(fmtl_rho)
        self.cannot_accumulate = (
            "F-MTL (optim.fmtl_rho > 0) takes every task's gradient again at parameters perturbed along that "
            "task's full-batch gradient: T more passes over the whole batch at T different points, which "
            "accumulation does not reproduce") if self.fmtl_rho > 0 else None

    def _rows(self, inp, shared, heads, layout, rest, batch, scale=None, k=1):
        """Jacobian rows over the shared parameters and the heads, and (losses, aux, new_rest).
        A model with one shared representation backpropagates through the heads once (every
        ∂L_t/∂Z and each head's own gradient from one pass), then T passes through the
        encoder only; otherwise T (+1 for an auxiliary loss) passes through the whole model.
        ``scale`` (label shares) scales the rows so that they sum over micro-batches."""
        fw = self.forward
        if not fw.single_representation(inp.params, rest, batch):
            vec = _loss_vector(fw, layout, rest, batch, scale=scale, k=k)
            return per_task_pullbacks(vec, shared, heads)
        t = len(fw.tasks)
        z, enc_pull, rest1 = fw.encoder_vjp(shared, heads, layout, rest, batch["inputs"])
        losses, jz, gh, new_rest = fw.head_z_grads(shared, heads, layout, rest1, batch,
                                                   jnp.broadcast_to(z, (t,) + z.shape))
        if scale is not None:
            jz = jz * scale.astype(jz.dtype).reshape((t,) + (1,) * (jz.ndim - 1))
            gh = fw.scale_heads(gh, scale)
        (js,) = pullback_rows(enc_pull, jz)
        eye = jnp.eye(t, dtype=jnp.float32)
        jh = jax.tree.map(lambda *xs: jnp.stack(xs), *[fw.scale_heads(gh, eye[i]) for i in range(t)])
        return js, jh, (losses, jnp.zeros((), jnp.float32), new_rest)

    def __call__(self, inp: StepInputs, weigh) -> RouteOut:
        shared, heads, layout = split_shared(inp.params)
        js, jh, (losses, aux, new_rest) = self._rows(inp, shared, heads, layout, inp.rest, inp.batch)
        flat = lambda js_: self._flat(shared, heads, layout, inp, js_)  # noqa: E731
        grads, w, agg_state, extras = self._from_jacobian(inp, weigh, js, jh, layout, losses, flat)
        return RouteOut(grads, losses, aux, new_rest, w, agg_state, extras)

    def accumulate(self, inp: StepInputs, micro, weigh) -> RouteOut:
        """One scan summing the micro-batches' label-share-scaled Jacobian rows (the carry
        holds one J, T × parameters); then G, w and wᵀJ as at K = 1."""
        shared, heads, layout = split_shared(inp.params)
        rows = len(self.forward.tasks) + int(self.forward.has_aux)

        def body(carry, xs):
            js_acc, jh_acc, rest_m = carry
            mb, c = xs
            js, jh, (losses, aux, new_rest) = self._rows(inp, shared, heads, layout, rest_m, micro.prepare(mb),
                                                         scale=c, k=micro.k)
            return (jax.tree.map(jnp.add, js_acc, js), jax.tree.map(jnp.add, jh_acc, jh), new_rest), (losses, aux)

        zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros((rows,) + a.shape, a.dtype), tree)  # noqa: E731
        (js, jh, new_rest), (lm, am) = jax.lax.scan(body, (zeros(shared), zeros(heads), inp.rest),
                                                    (micro.data, micro.shares))
        losses = micro.full(lm)
        grads, w, agg_state, extras = self._from_jacobian(inp, weigh, js, jh, layout, losses)
        return RouteOut(grads, losses, jnp.mean(am), new_rest, w, agg_state, extras)

    def _from_jacobian(self, inp, weigh, js, jh, layout, losses, flat=None):
        """From the Jacobian rows (T tasks, + the auxiliary loss's row) over the shared
        parameters ``js`` and the heads ``jh``: G, the weights, the update.
        Returns (grads, w, new aggregator state, extras)."""
        t = len(self.forward.tasks)
        if self.forward.has_aux:
            aux_s, aux_h = (jax.tree.map(lambda a: a[t], j) for j in (js, jh))
            js, jh = (jax.tree.map(lambda a: a[:t], j) for j in (js, jh))
        js = masked(js, inp.sparse_mask)
        if weigh.combines:  # a method that combines J itself: its direction is the shared update
            g_shared, w, agg_state, extras = weigh.combine(inp, losses, js)
            g_heads = aggregate(weigh.head_weights(w, losses, inp.present), jh)
            if self.forward.has_aux:
                g_shared = jax.tree.map(jnp.add, g_shared, aux_s)
                g_heads = jax.tree.map(jnp.add, g_heads, aux_h)
            return join(g_shared, g_heads, layout), w, agg_state, extras
        w, agg_state, extras = weigh(inp, losses, gramian(js))
        ws = finite(w)
        g_shared = aggregate(ws, js)
        if self.fmtl_rho > 0:
            h = flat(js)
            if weigh.needs_gram:
                wh, agg_state = weigh.flat(inp, agg_state, losses, gramian(h))
                w = jnp.where(jnp.isfinite(wh), w, wh)  # a NaN in either marks the step bad
            else:
                wh = w
            g_shared = jax.tree.map(jnp.add, g_shared, aggregate(finite(wh), h))
        hw = ws if weigh.weighted_heads else inp.present.astype(ws.dtype)
        g_heads = aggregate(hw, jh)
        if self.forward.has_aux:
            g_shared = jax.tree.map(jnp.add, g_shared, aux_s)
            g_heads = jax.tree.map(jnp.add, g_heads, aux_h)
        return join(g_shared, g_heads, layout), w, agg_state, extras

    def _flat(self, shared, heads, layout, inp, js):
        """h_t = ∇_θ L_t(θ + ε_t) − g_t on the shared parameters (F-MTL)."""
        t = len(self.forward.tasks)
        eps = fmtl_perturbation(js, self.fmtl_rho)

        def one(onehot, e):
            def f(s):
                s2 = jax.tree.map(jnp.add, s, e)
                losses, _, _ = self.forward.losses(join(s2, heads, layout), inp.rest, inp.batch)
                return jnp.sum(onehot * losses)
            return jax.grad(f)(shared)

        gt = jax.vmap(one)(jnp.eye(t, dtype=jnp.float32), eps)
        return masked(jax.tree.map(jnp.subtract, gt, js), inp.sparse_mask)


class StreamedJacobian:
    cannot_accumulate = (
        "optim.jacobian='stream' never holds J, but the full-batch Gramian of a sum of micro-batch Jacobians "
        "is not the sum of their Gramians; use optim.jacobian='keep' (J summed over the micro-batches, memory "
        "of one J) or optim.grad_on='representation'")

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, inp: StepInputs, weigh) -> RouteOut:
        """1 forward + T batched backward passes (each shared block folded into G as it is
        produced; the heads' Jacobian, only non-zero on its own head, is kept) + one
        backward of Σ_t w_t L_t (+ aux)."""
        t = len(self.forward.tasks)
        shared, heads, layout = split_shared(inp.params)
        vec = _loss_vector(self.forward, layout, inp.rest, inp.batch)
        out, pullback, (losses, aux, new_rest) = jax.vjp(vec, shared, heads, has_aux=True)
        r = out.shape[0]
        eye = jnp.eye(r, dtype=out.dtype)
        js, jh = jax.vmap(pullback)(eye[:t])
        js = masked(js, inp.sparse_mask)
        w, agg_state, extras = weigh(inp, losses, gramian(js))
        ws = finite(w)
        cot = jnp.concatenate([ws, jnp.ones((r - t,), ws.dtype)]).astype(out.dtype)
        g_shared = masked(pullback(cot)[0], inp.sparse_mask)
        hw = ws if weigh.weighted_heads else inp.present.astype(ws.dtype)
        g_heads = aggregate(hw, jh)
        if self.forward.has_aux:
            g_heads = jax.tree.map(jnp.add, g_heads, pullback(eye[t])[1])
        return RouteOut(join(g_shared, g_heads, layout), losses, aux, new_rest, w, agg_state, extras)
