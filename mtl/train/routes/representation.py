"""The representation route (``optim.grad_on="representation"``, the cheap variant).

One forward of the encoder to the shared representation Z (kept with its VJP); Z is
broadcast to T copies, head t reads copy t, so ONE backward pass of ``Σ_t L_t`` through the
heads gives every ∂L_t/∂Z (row t) and every head's own gradient
(:meth:`~mtl.train.forward.Forward.head_z_grads`); G from those, then one backward of
``Σ_t w_t ∂L_t/∂Z`` through the encoder: about the cost of one ordinary step, for any T.
Needs a model with ``features`` / ``heads_from_features`` / ``heads`` (``arch="shared"``).
Heads ``"plain"`` keep their own gradient (an absent task's masked loss is 0);
``"weighted"`` scales head t by w_t.

Rep-MTL (``rep_mtl > 0``): :func:`rep_mtl_penalty` on the per-sample saliencies, its
gradient w.r.t. Z added to the encoder's cotangent.

Accumulation: Z rows of different micro-batches are disjoint, so G = Σ_m G_m; a first scan
accumulates G, the losses and the heads' gradients, a second re-runs each micro-batch's
encoder and pulls Σ_t w_t s_mt ∂L_t^m/∂Z_m back (recomputed, not kept).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl.optim import gramian
from mtl.tasks import losses_from_outputs
from mtl.train.grad_tools import join, split_shared
from mtl.train.routes.base import RouteOut, StepInputs, masked
from mtl.train.weigh import finite


def rep_mtl_penalty(sal, present, eps=1e-8):
    """Rep-MTL regulariser on saliencies ``sal`` (T, B, D) = ∂(B·L_t)/∂Z (per-sample).

    Normalisation (our choice, documented): per task, |S_t| is divided by its mean over
    the batch and features, so tasks with large losses do not dominate. Then
    (a) entropy term: for every element (b, d) p_t = |S_t| / Σ_s |S_s| over present tasks;
        penalty += mean_(b,d) Σ_t p_t log p_t  (negative entropy: minimising it spreads each
        element's saliency over tasks, preserving task-specific signal instead of letting one
        task own it — Rep-MTL's "task-specific saliency" term, sign as its paper);
    (b) alignment term: the same sample's saliency vectors of two tasks should agree:
        penalty += InfoNCE over samples of cos(S_s[b], S_t[b']) with positives b = b',
        averaged over present task pairs, temperature 0.1.
    Returns a scalar (0 with fewer than two present tasks)."""
    t, b = sal.shape[0], sal.shape[1]
    pm = present.astype(sal.dtype)
    a = jnp.abs(sal).reshape(t, b, -1)
    a = a / (jnp.mean(a, axis=(1, 2), keepdims=True) + eps)
    a = a * pm[:, None, None]
    p = a / (jnp.sum(a, axis=0, keepdims=True) + eps)
    neg_ent = jnp.mean(jnp.sum(p * jnp.log(p + eps), axis=0))
    v = sal.reshape(t, b, -1)
    v = v * jax.lax.rsqrt(jnp.sum(v * v, axis=-1, keepdims=True) + eps ** 2)  # NaN-free at 0
    total, pairs = 0.0, 0.0
    for i in range(t):
        for j in range(i + 1, t):
            logits = v[i] @ v[j].T / 0.1
            nce = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
            on = pm[i] * pm[j]
            total, pairs = total + on * nce, pairs + on
    align = jnp.where(pairs > 0, total / jnp.maximum(pairs, 1.0), 0.0)
    enough = jnp.sum(pm) >= 2
    return jnp.where(enough, neg_ent + align, 0.0)


class Representation:
    def __init__(self, forward, rep_mtl: float = 0.0):
        if not forward.has_features:
            raise ValueError("optim.grad_on='representation' needs a model with features(x) and "
                             "heads_from_features(z) (model.arch='shared'); use grad_on='params'")
        self.forward, self.rep_mtl = forward, float(rep_mtl)
        self.cannot_accumulate = (
            "Rep-MTL (optim.rep_mtl > 0) regularises per-sample saliencies with an InfoNCE term that contrasts "
            "every sample against the whole batch, so it does not split into micro-batches"
        ) if self.rep_mtl > 0 else None

    def _encode(self, heads, layout, rest, inputs):
        def encode(s):
            model = self.forward.model(join(s, heads, layout), rest)
            return model.features(inputs), self.forward.rest_of(model)
        return encode

    def __call__(self, inp: StepInputs, weigh) -> RouteOut:
        fw, t = self.forward, len(self.forward.tasks)
        shared, heads, layout = split_shared(inp.params)
        z, enc_vjp, rest1 = jax.vjp(self._encode(heads, layout, inp.rest, inp.batch["inputs"]), shared,
                                    has_aux=True)
        zs = jnp.broadcast_to(z, (t,) + z.shape)
        losses, jz, gh, new_rest = fw.head_z_grads(shared, heads, layout, rest1, inp.batch, zs)
        if weigh.combines:  # GradDrop: the representation's cotangent itself
            dz, w, agg_state, extras = weigh.combine(inp, losses, jz, activation=z)
            ws = finite(w)
        else:
            w, agg_state, extras = weigh(inp, losses, gramian(jz))
            ws = finite(w)
            dz = jnp.tensordot(ws.astype(jz.dtype), jz, axes=1)
        if self.rep_mtl > 0:
            dz = dz + self.rep_mtl * self._rep_mtl_grad(shared, heads, layout, z, rest1, inp)
        g_shared = masked(enc_vjp(dz)[0], inp.sparse_mask)
        g_heads = fw.scale_heads(gh, ws) if weigh.weighted_heads else gh
        return RouteOut(join(g_shared, g_heads, layout), losses, jnp.zeros((), jnp.float32), new_rest, w,
                        agg_state, extras)

    def _rep_mtl_grad(self, shared, heads, layout, z, rest1, inp):
        """∂ penalty/∂Z, where the penalty is computed on per-sample saliencies ∂L_t/∂Z.

        The regulariser shapes the representation (it flows into the encoder); the heads
        are not regularised (our simplification)."""
        b, t = z.shape[0], len(self.forward.tasks)

        def penalty(zz):
            zs = jnp.broadcast_to(zz, (t,) + zz.shape)
            _, jz, _, _ = self.forward.head_z_grads(shared, heads, layout, rest1, inp.batch, zs)
            return rep_mtl_penalty(b * jz, inp.present)

        return jax.grad(penalty)(z)

    def accumulate(self, inp: StepInputs, micro, weigh) -> RouteOut:
        fw, t = self.forward, len(self.forward.tasks)
        shared, heads, layout = split_shared(inp.params)

        def first(carry, xs):  # G, losses and head gradients; no VJP of the encoder kept
            gram, gh_acc, rest_m = carry
            mb, c = xs
            mb = micro.prepare(mb)
            z, rest1 = self._encode(heads, layout, rest_m, mb["inputs"])(shared)
            zs = jnp.broadcast_to(z, (t,) + z.shape)
            losses, jz, gh, new_rest = fw.head_z_grads(shared, heads, layout, rest1, mb, zs)
            jz = jz * c.astype(jz.dtype).reshape((t,) + (1,) * (jz.ndim - 1))
            gh = fw.scale_heads(gh, c)
            return (gram + gramian(jz), jax.tree.map(jnp.add, gh_acc, gh), new_rest), (losses, rest_m)

        init = (jnp.zeros((t, t), jnp.float32), jax.tree.map(jnp.zeros_like, heads), inp.rest)
        (gram, gh, new_rest), (lm, rests) = jax.lax.scan(first, init, (micro.data, micro.shares))
        losses = micro.full(lm)
        w, agg_state, extras = weigh(inp, losses, gram)
        ws = finite(w)

        def second(acc, xs):  # the encoder again, pulling back Σ_t w_t ∂L_t/∂Z_m
            mb, c, rest_m = xs
            mb = micro.prepare(mb)

            def objective(s):
                model = fw.model(join(s, heads, layout), rest_m)
                z = model.features(mb["inputs"])
                outs = {tk.name: model.heads[tk.name](z) for tk in fw.tasks}
                return jnp.sum(ws * c * losses_from_outputs(fw.tasks, outs, mb))

            return jax.tree.map(jnp.add, acc, jax.grad(objective)(shared)), None

        g_shared, _ = jax.lax.scan(second, jax.tree.map(jnp.zeros_like, shared), (micro.data, micro.shares, rests))
        g_shared = masked(g_shared, inp.sparse_mask)
        g_heads = fw.scale_heads(gh, ws) if weigh.weighted_heads else gh
        return RouteOut(join(g_shared, g_heads, layout), losses, jnp.zeros((), jnp.float32), new_rest, w,
                        agg_state, extras)
