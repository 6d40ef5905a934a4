"""The Gramian without the Jacobian (``optim.jacobian="gram"``): exact G, no weight
gradient per task.

For a tapped dense layer (:mod:`mtl.nn.taps`; rows ``X`` [R, d_in] of its inputs over
every call, ``D_t`` [R, d_out] = ∂L_t/∂y its output cotangents), task t's kernel gradient
is ``Xᵀ D_t`` and its bias gradient ``1ᵀ D_t``, so its share of G is

    G_ts += ⟨Xᵀ D_t, Xᵀ D_s⟩ + ⟨1ᵀ D_t, 1ᵀ D_s⟩,

computed per layer by the cheaper of two exact contractions (a FLOP estimate from the
static shapes): the *batch* form ``Σ_ij K_ij (D_t D_sᵀ)_ij`` with ``K = X Xᵀ`` (cost
R²·d_in + T·R²·d_out + T²·R·d_out; it wins where the fan-in exceeds the rows) or the
*weight* form (``Xᵀ D_t`` per task, then inner products: T·R·d_in·d_out + T²·d_in·d_out).
Shared parameters outside tapped layers (conv kernels, norms, embeddings, positions) get
their per-task gradients from the same backward passes and their ordinary T × T share of G.

The D_t come from T backward passes that stop at the layer outputs: the passes are the
pullback of a forward in which every tapped output carries a zero perturbation ε; only
∂/∂ε (and the untapped parameters' gradients) of those passes is used, so XLA drops the
tapped layers' weight-gradient matmuls. A model with a shared representation
(``features``/``heads``) backpropagates through the heads ONCE (Z broadcast to T copies,
as the representation route) and only the encoder takes T passes; other models take T
passes through the whole network, as the streamed route. The update is one more backward
pass of the same forward, with cotangent Σ_t w_t ∂L_t/∂Z (or w), so a step costs one
forward, T activation-only backward passes, the per-layer contractions and one backward.

Not accumulated (the Gramian of a sum of micro-batch Jacobians is not the sum of their
Gramians) and not with sparse training or F-MTL (they need J_s itself): ``jacobian="keep"``.
"""
from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.nn import taps
from mtl.optim import aggregate, gramian
from mtl.train.grad_tools import join, pullback_rows, split_shared
from mtl.train.routes.base import RouteOut, StepInputs
from mtl.train.weigh import finite


def layer_gram(x, d, method: str | None = None):
    """T × T share of G of a dense layer with input rows ``x`` [R, d_in] and per-task output
    cotangents ``d`` [T, R, d_out] (kernel part only). ``method``: ``"batch"``, ``"weight"``
    or None (the cheaper by FLOP count)."""
    t, r, d_out = d.shape
    d_in = x.shape[1]
    if method is None:
        batch = r * r * d_in + t * r * r * d_out + t * t * r * d_out
        weight = t * r * d_in * d_out + t * t * d_in * d_out
        method = "batch" if batch < weight else "weight"
    if method == "batch":
        k = x @ x.T
        if r <= d_out:  # T GEMMs K @ D_t (K repeated: no bigger than d): XLA's single GEMM would
            # first transpose d to [(T, d_out), R] (measured ~10% slower at T = 40 on CPU)
            m = jnp.einsum("trs,tso->tro", jnp.broadcast_to(k, (t,) + k.shape), d)
        else:
            m = jnp.einsum("rs,tso->tro", k, d)
        return _rows_dot(d, m)
    j = jnp.einsum("ri,tro->tio", x, d)
    return _rows_dot(j, j)


def _rows_dot(a, b):
    """⟨a_t, b_u⟩ over everything but the leading axis, as ONE [T, n] x [n, T] GEMM: XLA:CPU
    runs the equivalent multi-axis einsum ~4x slower (measured: 24.8 vs 5.5 ms for
    T = 40, n = 131072)."""
    t = a.shape[0]
    return jax.lax.dot_general(a.reshape(t, -1), b.reshape(t, -1), (((1,), (1,)), ((), ())))


def _path_of(model):
    ids = {id(node): tuple(path) for path, node in nnx.iter_graph(model)}
    return lambda module: ids.get(id(module))


def _keys(path):
    """A pytree key path as plain keys, without a Variable's trailing ``value``."""
    keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return keys[:-1] if keys and keys[-1] == "value" else keys


class BatchGramian:
    cannot_accumulate = (
        "optim.jacobian='gram' builds G from each batch's layer inputs and output cotangents; the Gramian of a "
        "sum of micro-batch Jacobians is not the sum of their Gramians; use optim.jacobian='keep'")

    def __init__(self, forward):
        self.forward = forward

    # ------------------------------------------------------------------ the recorded forward
    def _forward_fn(self, inp, layout, heads_fixed: bool, meta: dict):
        """The forward to differentiate: (shared[, heads], eps) -> output, with the taps'
        inputs and the new state as aux; ``meta`` receives the tap layout (static)."""
        fw = self.forward

        def run(model, eps):
            with taps.recording(eps) as rec:
                if heads_fixed:
                    out = model.features(inp.batch["inputs"])
                    extra = ()
                else:
                    losses, aux, _ = fw.losses_of_model(model, inp.batch)
                    out = jnp.concatenate([losses, aux[None]]) if fw.has_aux else losses
                    extra = (losses, aux)
            path = _path_of(model)
            meta["calls"] = [(path(m), r.shape, y) for m, r, y in rec.calls]
            meta["modules"] = {path(m): m.bias is not None for m, _, _ in rec.calls}
            meta["untapped"] = {path(m) for m in rec.untapped}
            return out, (tuple(r for _, r, _ in rec.calls), fw.rest_of(model), extra)

        if heads_fixed:
            heads = split_shared(inp.params)[1]
            return lambda s, eps: run(fw.model(join(s, heads, layout), inp.rest), eps)
        return lambda s, h, eps: run(fw.model(join(s, h, layout), inp.rest), eps)

    def __call__(self, inp: StepInputs, weigh) -> RouteOut:
        fw, t = self.forward, len(self.forward.tasks)
        shared, heads, layout = split_shared(inp.params)
        meta: dict = {}
        features = fw.single_representation(inp.params, inp.rest, inp.batch)   # heads once
        f = self._forward_fn(inp, layout, features, meta)
        args = (shared,) if features else (shared, heads)
        jax.eval_shape(lambda *a: f(*a, None), *args)            # the tap layout, shapes only
        eps = [jnp.zeros(y) for _, _, y in meta["calls"]]
        out, pull, (xs, rest1, extra) = jax.vjp(f, *args, eps, has_aux=True)
        if features:  # heads once: every ∂L_t/∂Z and the heads' own gradients
            zs = jnp.broadcast_to(out, (t,) + out.shape)
            losses, jz, gh, new_rest = fw.head_z_grads(shared, heads, layout, rest1, inp.batch, zs)
            aux = jnp.zeros((), jnp.float32)
            rows = pullback_rows(pull, jz)
        else:
            (losses, aux), new_rest = extra, rest1
            rows = pullback_rows(pull, jnp.eye(out.shape[0], dtype=out.dtype)[:t])
        gram = self._gram(meta, xs, rows[0], rows[-1], t)
        w, agg_state, extras = weigh(inp, losses, gram)
        ws = finite(w)
        if features:
            g_shared = pull(jnp.tensordot(ws.astype(jz.dtype), jz, axes=1))[0]
            g_heads = fw.scale_heads(gh, ws) if weigh.weighted_heads else gh
        else:
            r = out.shape[0]
            g_shared, g_aux_h = pull(jnp.concatenate([ws, jnp.ones((r - t,), ws.dtype)]).astype(out.dtype))[:2]
            jh = rows[1]
            g_heads = aggregate(ws if weigh.weighted_heads else inp.present.astype(ws.dtype), jh)
            if fw.has_aux:
                g_heads = jax.tree.map(jnp.add, g_heads, pull(jnp.eye(r, dtype=out.dtype)[t])[1])
        return RouteOut(join(g_shared, g_heads, layout), losses, aux, new_rest, w, agg_state, extras)

    def _gram(self, meta, xs, d_shared, d_eps, t):
        """G from the taps of shared layers plus the untapped shared parameters' rows."""
        covered = {p for p, has_bias in meta["modules"].items()
                   if p is not None and p[:1] != ("heads",) and p not in meta["untapped"]}
        gram = jnp.zeros((t, t), jnp.float32)
        by_module: dict = {}
        for (path, _, y), x, d in zip(meta["calls"], xs, d_eps):
            if path in covered:
                by_module.setdefault(path, []).append((x, d.reshape((t, x.shape[0], -1))))
        for path, parts in by_module.items():
            x = jnp.concatenate([p[0] for p in parts], axis=0)
            d = jnp.concatenate([p[1] for p in parts], axis=1)
            gram = gram + layer_gram(x, d).astype(jnp.float32)
            if meta["modules"][path]:
                b = jnp.sum(d, axis=1)
                gram = gram + (b @ b.T).astype(jnp.float32)
        covered_leaves = {_keys(p) + (leaf,) for p in covered for leaf in ("kernel", "bias")}
        rest = [(kp, a) for kp, a in jax.tree_util.tree_flatten_with_path(d_shared)[0]
                if _keys(kp) not in covered_leaves]
        if rest:
            _note_untapped(rest)
            gram = gram + gramian([a for _, a in rest]).astype(jnp.float32)
        return gram


_NOTED: set = set()


def _note_untapped(rest):
    """Say once per layout which shared parameters take the per-parameter route."""
    names = tuple(sorted("/".join(map(str, _keys(kp))) for kp, _ in rest))
    if names in _NOTED:
        return
    _NOTED.add(names)
    size = sum(math.prod(a.shape[1:]) for _, a in rest)
    shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
    warnings.warn(f"optim.jacobian='gram': {size} shared parameters are not in tapped dense layers ({shown}); "
                  "their rows of G come from per-parameter gradients (exact, at the per-parameter cost)",
                  stacklevel=2)
