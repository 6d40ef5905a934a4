"""Per-task gradients inside the train step, and their aggregation (``config.optim``).

``OptimSpec`` is the resolved ``config.optim``; ``TaskGradients`` computes, inside the
jitted step, the update gradient for one aggregator from ``mtl.optim``:

* **Loss-only methods** (EW, RLW, UW, DWA, FAMO): one forward and one backward of
  ``Σ_t w_t L_t``; w is computed inside the forward from the (stop-gradient) losses.
  EW with nothing else configured takes the trainer's original path untouched.
* ``grad_on="params"``: the Jacobian J of the loss vector over *all* parameters (1
  forward + T backward passes, :func:`per_task_pullbacks`); G = J_s J_sᵀ over the
  *shared* parameters J_s (every parameter outside ``heads``); the shared update is
  wᵀJ_s, read off the Jacobian that is already there (no extra backward).
  ``optim.jacobian="stream"`` builds G without keeping J (each parameter's Jacobian block
  is reduced to its T × T share of G as the batched backward pass produces it) and takes
  the shared update from one more backward pass, of ``Σ_t w_t L_t``: 1 forward + T + 1
  backward, for when J (T × shared parameters) does not fit.
* ``grad_on="representation"`` (the cheap variant): one forward of the encoder to the
  shared representation Z (kept with its VJP); Z is broadcast to T copies, head t reads
  copy t, so ONE backward pass of ``Σ_t L_t`` through the heads gives every ∂L_t/∂Z (row
  t) and every head's own gradient; G from those, then one backward of
  ``Σ_t w_t ∂L_t/∂Z`` through the encoder: about the cost of one ordinary step, for any
  T. Needs a model with ``features`` / ``heads_from_features`` / ``heads``
  (``arch="shared"``).

Heads (``optim.head_grads``): ``"plain"`` (default; LibMTL's choice) gives each head the
gradient of its own unweighted loss, so the weights act only on the shared parameters;
``"weighted"`` gives it ``w_t ∇L_t`` (the Nash-MTL / FAMO codes). With loss-only methods
"plain" is implemented by scaling the gradient flowing from head t into Z by w_t; a
model without ``features``/``heads_from_features`` then gets weighted heads.

Partial labels: a task is *present* when at least one sample of the batch has its
label; absent tasks get weight exactly 0 that step and are left out of the method (their
rows/columns of G are dropped by the aggregator).

FAMO's post-step update needs losses after the step. With ``update_on="same_batch"``
(its default, as the authors' code) the train step re-evaluates its own batch with the
updated parameters (one extra forward pass) and calls :meth:`TaskGradients.post_update`;
with ``update_on="next_batch"`` step k first calls ``agg.update(state, losses=L_k)`` on
its own batch's losses and then ``agg.weights`` — no extra forward pass, noisier.

F-MTL (``fmtl_rho > 0``, ``grad_on="params"`` only): each task's shared parameters are
perturbed by ρ g_t/‖g_t‖, h_t = ∇L_t(θ + ε_t) − g_t (T more forward+backward passes),
and the shared update is Agg({g_t}) + Agg({h_t}); for Gramian methods the h-weights come
from a second copy of the aggregator state on G_h = H Hᵀ, loss-only methods reuse w.

Sparse training (``sparse_fraction > 0``): a fixed mask keeps the top fraction of the
shared parameters, by magnitude at initialisation (``sparse_criterion="magnitude"``) or
by saliency |θ ⊙ ∇Σ_t L_t| on the first training batch (``"saliency"``, SNIP-style; our
choice where the spec leaves the criterion open); only they are updated, and G (hence
the weights and the conflict diagnostics) is built from the masked gradients.

Rep-MTL (``rep_mtl > 0``, representation gradients): see :func:`rep_mtl_penalty`.

Gradient accumulation (``train.accum_steps = K > 1``): :mod:`mtl.train.accumulate`
(``TaskGradients.accumulated``), exact for every method except F-MTL, Rep-MTL and
``jacobian="stream"``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.optim import aggregate, fmtl_perturbation, get_aggregator, gramian
from mtl.optim.diagnostics import gradient_stats
from mtl.tasks import losses_from_outputs
from mtl.train.accumulate import Accumulation
from mtl.train.grad_tools import join, per_task_pullbacks, present_mask, scale_grad, split_shared

GRAD_ON = ("params", "representation")
JACOBIAN = ("keep", "stream")
HEAD_GRADS = ("plain", "weighted")
SPARSE_CRITERIA = ("magnitude", "saliency")


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    aggregator: str = "ew"
    hparams: tuple = ()
    grad_on: str = "params"
    jacobian: str = "keep"
    head_grads: str = "plain"
    fmtl_rho: float = 0.0
    sparse_fraction: float = 0.0
    sparse_criterion: str = "magnitude"
    rep_mtl: float = 0.0
    diagnostics_every: int = 0

    @classmethod
    def from_config(cls, c=None) -> "OptimSpec":
        if c is None:
            return cls()
        if isinstance(c, OptimSpec):
            return c
        d = dict(c.to_dict() if hasattr(c, "to_dict") else c)
        hp = d.pop("hparams", {}) or {}
        hp = dict(hp.to_dict() if hasattr(hp, "to_dict") else hp)
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - fields)
        if bad:
            raise KeyError(f"unknown optim key(s) {bad}; valid: {sorted(fields)}")
        spec = cls(hparams=tuple(sorted(hp.items())), **d)
        spec.validate()
        return spec

    def validate(self) -> None:
        self.make_aggregator()  # unknown name / hyper-parameter: the registry's error
        if self.grad_on not in GRAD_ON:
            raise ValueError(f"optim.grad_on must be one of {GRAD_ON}; got {self.grad_on!r}")
        if self.jacobian not in JACOBIAN:
            raise ValueError(f"optim.jacobian must be one of {JACOBIAN}; got {self.jacobian!r}")
        if self.jacobian == "stream" and self.fmtl_rho > 0:
            raise ValueError("optim.jacobian='stream' does not keep the per-task gradients that F-MTL "
                             "(optim.fmtl_rho > 0) perturbs along; use optim.jacobian='keep'")
        if self.head_grads not in HEAD_GRADS:
            raise ValueError(f"optim.head_grads must be one of {HEAD_GRADS}; got {self.head_grads!r}")
        if self.sparse_criterion not in SPARSE_CRITERIA:
            raise ValueError(f"optim.sparse_criterion must be one of {SPARSE_CRITERIA}; got "
                             f"{self.sparse_criterion!r}")
        if not 0.0 <= float(self.sparse_fraction) < 1.0:
            raise ValueError(f"optim.sparse_fraction must be in [0, 1) (0 = off); got {self.sparse_fraction}")
        for k in ("fmtl_rho", "rep_mtl"):
            if float(getattr(self, k)) < 0:
                raise ValueError(f"optim.{k} must be >= 0; got {getattr(self, k)}")
        if self.fmtl_rho > 0 and self.grad_on != "params":
            raise ValueError("optim.fmtl_rho > 0 (F-MTL) perturbs the shared parameters: it needs "
                             "optim.grad_on='params'")
        if self.rep_mtl > 0 and self.grad_on != "representation":
            raise ValueError("optim.rep_mtl > 0 (Rep-MTL) regularises representation saliencies: it needs "
                             "optim.grad_on='representation'")
        if int(self.diagnostics_every) < 0:
            raise ValueError(f"optim.diagnostics_every must be >= 0; got {self.diagnostics_every}")

    def make_aggregator(self):
        return get_aggregator(self.aggregator, **dict(self.hparams))

    @property
    def is_plain_ew(self) -> bool:
        return (self.aggregator.lower() == "ew" and self.fmtl_rho == 0 and self.sparse_fraction == 0
                and self.rep_mtl == 0)


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


# ------------------------------------------------------------------ the machinery
class TaskGradients(Accumulation):
    """Update gradients for ``spec`` given pure loss functions of a model (see module doc).

    ``losses_fn(params, rest, batch) -> (losses [T], aux_loss, new_rest)`` is the
    trainer's forward; ``graphdef`` merges params back into a model for the
    representation path."""

    def __init__(self, spec: OptimSpec, tasks, graphdef, losses_fn, has_aux: bool, has_features: bool,
                 loss_weights=None):
        self.spec, self.tasks, self.graphdef = spec, list(tasks), graphdef
        self.agg = spec.make_aggregator()
        self.losses_fn, self.has_aux, self.has_features = losses_fn, has_aux, has_features
        # fixed EW weights (train.loss_weights; plain EW only): they scale EW's weights, so the
        # Jacobian path (diagnostics steps) applies the same weighted update as the plain one
        self.loss_weights = None if loss_weights is None else jnp.asarray(loss_weights, jnp.float32)
        if spec.grad_on == "representation" and not has_features:
            raise ValueError("optim.grad_on='representation' needs a model with features(x) and "
                             "heads_from_features(z) (model.arch='shared'); use grad_on='params'")

    @property
    def weighted_heads(self) -> bool:
        """Heads get w_t ∇L_t: ``head_grads="weighted"``, or fixed EW loss weights (plain EW
        weights its heads too, and the Jacobian path must apply the same update)."""
        return self.spec.head_grads == "weighted" or self.loss_weights is not None

    @property
    def needs_gram(self) -> bool:
        return "gram" in self.agg.needs

    @property
    def always_jacobian(self) -> bool:
        """Every step computes per-task gradients (and so returns diagnostics)."""
        return self.needs_gram or self.spec.fmtl_rho > 0 or self.spec.rep_mtl > 0

    def init_state(self):
        t = len(self.tasks)
        main = self.agg.init(t)
        flat = self.agg.init(t) if (self.spec.fmtl_rho > 0 and self.needs_gram) else ()
        return {"main": main, "flat": flat}

    def _weights(self, st, *, gram, losses, key, step, present):
        w, st = self.agg.weights(st, gram=gram, losses=losses, key=key, step=step, present=present)
        if self.loss_weights is not None and self.spec.is_plain_ew:
            w = self.loss_weights.astype(w.dtype) * w
        return w, st

    @property
    def same_batch_update(self) -> bool:
        """The aggregator's post-step update wants the losses of this step's batch after
        the update (FAMO's default): the train step calls :meth:`post_update`."""
        return self.agg.post_step and dict(self.agg.hparams or {}).get("update_on") == "same_batch"

    def post_update(self, agg_state, losses_after, present):
        """The post-step update on the step's own batch re-evaluated after the update."""
        main = self.agg.update(agg_state["main"], losses=jax.lax.stop_gradient(losses_after), present=present)
        return {**agg_state, "main": main}

    def _pre(self, agg_state, losses, present):
        main = agg_state["main"]
        if self.agg.post_step and not self.same_batch_update:
            # FAMO, next-batch variant: the previous step's update, on this step's losses
            main = self.agg.update(main, losses=jax.lax.stop_gradient(losses), present=present)
        return main

    # ---------------------------------------------------------------- entry point
    def __call__(self, params, rest, batch, agg_state, key, step, *, diagnostics: bool = False,
                 sparse_mask=None):
        """(grads, losses, aux_loss, new_rest, w, new_agg_state, extras)."""
        present = present_mask(self.tasks, batch)
        if not (self.always_jacobian or diagnostics):
            return self._loss_only(params, rest, batch, agg_state, key, step, present)
        if self.spec.grad_on == "representation":
            return self._representation(params, rest, batch, agg_state, key, step, present, sparse_mask)
        return self._params(params, rest, batch, agg_state, key, step, present, sparse_mask)

    def _loss_only(self, params, rest, batch, agg_state, key, step, present):
        plain_heads = self.spec.head_grads == "plain" and self.has_features

        def objective(p):
            if plain_heads:
                model = nnx.merge(self.graphdef, p, rest)
                z = model.features(batch["inputs"])
                losses0 = self._head_losses(model, z, batch)
                main = self._pre(agg_state, losses0, present)
                w, new_main = self._weights(main, gram=None, losses=jax.lax.stop_gradient(losses0), key=key,
                                            step=step, present=present)
                ws = jax.lax.stop_gradient(jnp.where(jnp.isfinite(w), w, 0.0))
                # heads see their own unweighted loss; the encoder sees w_t times it
                outs = {t.name: model.heads[t.name](scale_grad(z, ws[i])) for i, t in enumerate(self.tasks)}
                losses = losses_from_outputs(self.tasks, outs, batch)
                new_rest = nnx.split(model, nnx.Param, ...)[2]
                return jnp.sum(losses), (losses, jnp.zeros((), jnp.float32), new_rest, w, new_main)
            losses, aux, new_rest = self.losses_fn(p, rest, batch)
            main = self._pre(agg_state, losses, present)
            w, new_main = self._weights(main, gram=None, losses=jax.lax.stop_gradient(losses), key=key,
                                        step=step, present=present)
            ws = jax.lax.stop_gradient(jnp.where(jnp.isfinite(w), w, 0.0))
            return jnp.sum(ws * losses) + aux, (losses, aux, new_rest, w, new_main)

        (total, (losses, aux, new_rest, w, new_main)), grads = jax.value_and_grad(
            objective, has_aux=True)(params)
        return grads, losses, aux, new_rest, w, {**agg_state, "main": new_main}, {}

    def _head_losses(self, model, z, batch):
        return losses_from_outputs(self.tasks, model.heads_from_features(z), batch)

    def _finish(self, agg_state, losses, gram, key, step, present, diagnostics_gram):
        main = self._pre(agg_state, losses, present)
        w, new_main = self._weights(main, gram=gram, losses=losses, key=key, step=step, present=present)
        extras = {}
        if diagnostics_gram is not None:
            st = gradient_stats(diagnostics_gram, present)
            extras = {"cosines": st["cosines"], "conflict_fraction": st["conflict_fraction"],
                      "grad_norms": st["norms"]}
        return w, {**agg_state, "main": new_main}, extras

    def _params(self, params, rest, batch, agg_state, key, step, present, sparse_mask):
        shared, heads, keys = split_shared(params)

        def vec(s, h):
            losses, aux, new_rest = self.losses_fn(join(s, h, keys), rest, batch)
            out = jnp.concatenate([losses, aux[None]]) if self.has_aux else losses
            return out, (losses, aux, new_rest)

        if self.spec.jacobian == "stream":
            return self._params_stream(vec, shared, heads, keys, agg_state, key, step, present, sparse_mask)
        js, jh, (losses, aux, new_rest) = per_task_pullbacks(vec, shared, heads)
        flat = lambda js_: self._flat(shared, heads, keys, rest, batch, js_, sparse_mask)
        grads, w, new_state, extras = self._from_jacobian(js, jh, keys, losses, agg_state, key, step, present,
                                                          sparse_mask, flat)
        return grads, losses, aux, new_rest, w, new_state, extras

    def _from_jacobian(self, js, jh, keys, losses, agg_state, key, step, present, sparse_mask, flat=None):
        """From the Jacobian rows (T tasks, + the auxiliary loss's row when the model has
        one) over the shared parameters ``js`` and the heads ``jh``: G, the weights, the
        update. ``flat(js)`` gives F-MTL's h rows. Returns (grads, w, new_agg_state, extras)."""
        t = len(self.tasks)
        if self.has_aux:
            aux_s = jax.tree.map(lambda a: a[t], js)
            aux_h = jax.tree.map(lambda a: a[t], jh)
            js = jax.tree.map(lambda a: a[:t], js)
            jh = jax.tree.map(lambda a: a[:t], jh)
        if sparse_mask is not None:
            js = jax.tree.map(lambda a, m: a * m.astype(a.dtype), js, sparse_mask)
        gram = gramian(js)
        w, new_state, extras = self._finish(agg_state, losses, gram, key, step, present, gram)
        ws = jnp.where(jnp.isfinite(w), w, 0.0)
        g_shared = aggregate(ws, js)
        if self.spec.fmtl_rho > 0:
            h = flat(js)
            if self.needs_gram:
                wh, new_flat = self._weights(agg_state["flat"], gram=gramian(h), losses=losses, key=key,
                                             step=step, present=present)
                new_state = {**new_state, "flat": new_flat}
                w = jnp.where(jnp.isfinite(wh), w, wh)  # a NaN in either marks the step bad
            else:
                wh = w
            whs = jnp.where(jnp.isfinite(wh), wh, 0.0)
            g_shared = jax.tree.map(jnp.add, g_shared, aggregate(whs, h))
        hw = ws if self.weighted_heads else present.astype(ws.dtype)
        g_heads = aggregate(hw, jh)
        if self.has_aux:
            g_shared = jax.tree.map(jnp.add, g_shared, aux_s)
            g_heads = jax.tree.map(jnp.add, g_heads, aux_h)
        return join(g_shared, g_heads, keys), w, new_state, extras

    def _params_stream(self, vec, shared, heads, keys, agg_state, key, step, present, sparse_mask):
        """``optim.jacobian="stream"``: G without keeping J over the shared parameters.

        The T backward passes run batched (``vmap`` of the pullback), and every shared
        parameter's Jacobian block (T × its size) is reduced to its T × T contribution to G
        as soon as the backward pass produces it and is then dead: peak memory holds one
        block at a time, not J (T × all shared parameters). The update is then one more
        backward pass, the gradient of Σ_t w_t L_t (+ the auxiliary loss). Cost: 1 forward
        + T + 1 backward, against 1 + T for ``"keep"``. The heads' Jacobian (each row only
        non-zero on its own head) is small and kept."""
        t = len(self.tasks)
        out, pullback, (losses, aux, new_rest) = jax.vjp(vec, shared, heads, has_aux=True)
        r = out.shape[0]
        eye = jnp.eye(r, dtype=out.dtype)
        js, jh = jax.vmap(pullback)(eye[:t])
        if sparse_mask is not None:
            js = jax.tree.map(lambda a, m: a * m.astype(a.dtype), js, sparse_mask)
        gram = gramian(js)
        w, new_state, extras = self._finish(agg_state, losses, gram, key, step, present, gram)
        ws = jnp.where(jnp.isfinite(w), w, 0.0)
        cot = jnp.concatenate([ws, jnp.ones((r - t,), ws.dtype)]).astype(out.dtype)
        g_shared, _ = pullback(cot)
        if sparse_mask is not None:
            g_shared = jax.tree.map(lambda a, m: a * m.astype(a.dtype), g_shared, sparse_mask)
        hw = ws if self.weighted_heads else present.astype(ws.dtype)
        g_heads = aggregate(hw, jh)
        if self.has_aux:
            (_, aux_h) = pullback(eye[t])
            g_heads = jax.tree.map(jnp.add, g_heads, aux_h)
        return join(g_shared, g_heads, keys), losses, aux, new_rest, w, new_state, extras

    def _flat(self, shared, heads, keys, rest, batch, js, sparse_mask):
        """h_t = ∇_θ L_t(θ + ε_t) − g_t on the shared parameters (F-MTL)."""
        t = len(self.tasks)
        eps = fmtl_perturbation(js, self.spec.fmtl_rho)

        def one(onehot, e):
            def f(s):
                s2 = jax.tree.map(jnp.add, s, e)
                losses, _, _ = self.losses_fn(join(s2, heads, keys), rest, batch)
                return jnp.sum(onehot * losses)
            return jax.grad(f)(shared)

        gt = jax.vmap(one)(jnp.eye(t, dtype=jnp.float32), eps)
        h = jax.tree.map(jnp.subtract, gt, js)
        if sparse_mask is not None:
            h = jax.tree.map(lambda a, m: a * m.astype(a.dtype), h, sparse_mask)
        return h

    def _head_z_grads(self, shared, heads, keys, rest1, batch, zs):
        """All per-task gradients ∂L_t/∂Z in ONE backward pass through the heads.

        ``zs`` is Z broadcast to (T, ...); head t reads only ``zs[t]``, so the gradient of
        Σ_t L_t w.r.t. ``zs`` has ∂L_t/∂Z in row t, and w.r.t. the heads each head's own
        gradient (every head only sees its own loss). Cost: one forward and one backward of
        every head, instead of T backward passes through all heads.
        Returns (losses, jz [T, ...], head grads (plain), new_rest)."""
        def total(h, zz):
            model = nnx.merge(self.graphdef, join(shared, h, keys), rest1)
            outs = {t.name: model.heads[t.name](zz[i]) for i, t in enumerate(self.tasks)}
            losses = losses_from_outputs(self.tasks, outs, batch)
            return jnp.sum(losses), (losses, nnx.split(model, nnx.Param, ...)[2])

        (_, (losses, new_rest)), (gh, jz) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(heads, zs)
        return losses, jz, gh, new_rest

    def _scale_heads(self, gh, scale):
        """Multiply head ``t``'s gradient (``heads/<task name>/...``) by ``scale[t]``."""
        index = {t.name: i for i, t in enumerate(self.tasks)}

        def f(path, g):
            name = getattr(path[1], "key", getattr(path[1], "name", None)) if len(path) > 1 else None
            if name not in index:
                raise ValueError(f"head gradient at {jax.tree_util.keystr(path)} does not belong to a task")
            return g * scale[index[name]].astype(g.dtype)

        return jax.tree_util.tree_map_with_path(f, gh)

    def _representation(self, params, rest, batch, agg_state, key, step, present, sparse_mask):
        shared, heads, keys = split_shared(params)

        def encode(s):
            model = nnx.merge(self.graphdef, join(s, heads, keys), rest)
            z = model.features(batch["inputs"])
            return z, nnx.split(model, nnx.Param, ...)[2]

        z, enc_vjp, rest1 = jax.vjp(encode, shared, has_aux=True)
        zs = jnp.broadcast_to(z, (len(self.tasks),) + z.shape)
        losses, jz, gh, new_rest = self._head_z_grads(shared, heads, keys, rest1, batch, zs)
        gram = gramian(jz)
        w, new_state, extras = self._finish(agg_state, losses, gram, key, step, present, gram)
        ws = jnp.where(jnp.isfinite(w), w, 0.0)
        dz = jnp.tensordot(ws.astype(jz.dtype), jz, axes=1)
        if self.spec.rep_mtl > 0:
            dz = dz + self.spec.rep_mtl * self._rep_mtl_grad(heads, keys, z, rest1, batch, present, shared)
        (g_shared,) = enc_vjp(dz)
        if sparse_mask is not None:
            g_shared = jax.tree.map(lambda a, m: a * m.astype(a.dtype), g_shared, sparse_mask)
        # the plain gradient already gives each head its own loss's gradient (an absent task's
        # masked loss is 0); weighted heads scale head t by w_t
        g_heads = self._scale_heads(gh, ws) if self.weighted_heads else gh
        aux = jnp.zeros((), jnp.float32)
        return join(g_shared, g_heads, keys), losses, aux, new_rest, w, new_state, extras

    def _rep_mtl_grad(self, heads, keys, z, rest1, batch, present, shared):
        """∂ penalty/∂Z, where the penalty is computed on per-sample saliencies ∂L_t/∂Z.

        The regulariser shapes the representation (it flows into the encoder); the heads
        are not regularised (our simplification)."""
        b = z.shape[0]
        t = len(self.tasks)

        def penalty(zz):
            zs = jnp.broadcast_to(zz, (t,) + zz.shape)
            _, jz, _, _ = self._head_z_grads(shared, heads, keys, rest1, batch, zs)
            return rep_mtl_penalty(b * jz, present)

        return jax.grad(penalty)(z)
