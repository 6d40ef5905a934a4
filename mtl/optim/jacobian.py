"""Methods that need the Jacobian itself (the :class:`~mtl.optim.base.JacAggregator`
protocol): GradDrop and Trimmed mean (per coordinate), MoCo, DB-MTL and
ExcessMTL (per-task gradients or accumulators in their state).

``jac`` is a pytree whose leaves have leading axis T; the direction returned
has the same leaves without that axis. Absent tasks' rows arrive zeroed (the
wrapper) and their state rows are kept.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl.optim import solvers
from mtl.optim.base import (JacInputs, aggregate, gramian, make_jac_aggregator, row_mask,
                            safe_div, tree_zeros_rows)
from mtl.optim.weighting import _masked_softmax


def _sq_norms(jac):
    """‖row_t‖² for every task t of a stacked pytree."""
    return sum(jnp.sum(jnp.reshape(a, (a.shape[0], -1)) ** 2, axis=1)
               for a in jax.tree.leaves(jac))


def _scale_rows(c, jac):
    return jax.tree.map(lambda a: a * row_mask(c, a), jac)


def _keep_rows(mask, new, old):
    """new rows where mask > 0, old rows elsewhere."""
    return jax.tree.map(lambda n, o: jnp.where(row_mask(mask, n) > 0, n, o), new, old)


def _need_like(name, like):
    if like is None:
        raise ValueError(f"{name}: init needs like= (a pytree shaped like one task's gradient, "
                         "e.g. the shared parameters) to allocate its per-task state")


# ------------------------------------------------------------- GradDrop -----

def graddrop(leak=0.0, batch_axis: int | None = None):
    """Gradient sign dropout (Chen et al., NeurIPS 2020, Algorithm 1).

    Per element: G_t = J_t (times sign(activation) when ``activation`` is
    passed: sgn(A)∘∇_A L_t for the gradient at an activation A, as LibMTL's
    ``GradDrop.py`` does with the representation), summed over ``batch_axis``
    of a row if given (LibMTL sums over the representation's batch axis, so one
    mask per feature is shared by all samples); P = ½(1 + Σ_t G_t/(Σ_t |G_t| +
    1e-7)), U ~ Uniform(0, 1) per element of P; M_t = [P > U][G_t > 0] +
    [P < U][G_t < 0] (broadcast over the batch axis); direction
    Σ_t (ℓ_t + (1 − ℓ_t) M_t) J_t, ℓ = ``leak`` (a float or one per task;
    0 as LibMTL and TorchJD). Without ``activation`` and ``batch_axis`` it is
    TorchJD's ``GradDrop`` (f = identity) applied to J's rows; with
    ``activation=Z`` and ``batch_axis=0`` on the representation route it is
    LibMTL's (there ``jac`` is the per-task gradient of the shared
    representation Z and the direction is Z's cotangent). T = 1: d = J_1.
    """
    leaks = (float(leak),) if jnp.ndim(jnp.asarray(leak)) == 0 else tuple(map(float, leak))

    def init(num_tasks, like):
        if len(leaks) > 1 and len(leaks) != num_tasks:
            raise ValueError(f"graddrop: {len(leaks)} leak values for {num_tasks} tasks")
        return ()

    def core(state, x: JacInputs):
        lk = jnp.broadcast_to(jnp.asarray(leaks, x.mask.dtype), (x.num_tasks,))
        leaves, tree = jax.tree.flatten(x.jac)
        acts = (jax.tree.leaves(x.activation) if x.activation is not None
                else [None] * len(leaves))
        keys = jax.random.split(x.key, len(leaves))
        out = []
        for leaf, act, k in zip(leaves, acts, keys):
            g = leaf if act is None else leaf * jnp.sign(act)[None]
            if batch_axis is not None:
                g = jnp.sum(g, axis=1 + batch_axis, keepdims=True)
            p = 0.5 * (1.0 + jnp.sum(g, 0) / (jnp.sum(jnp.abs(g), 0) + 1e-7))
            u = jax.random.uniform(k, p.shape, p.dtype)
            m = ((p > u)[None] & (g > 0)) | ((p < u)[None] & (g < 0))
            keep = row_mask(lk, leaf) + (1.0 - row_mask(lk, leaf)) * m.astype(leaf.dtype)
            out.append(jnp.sum(keep * leaf, axis=0))
        return jax.tree.unflatten(tree, out), state

    return make_jac_aggregator("graddrop", ("key",), core, init=init,
                               hparams=dict(leak=leak, batch_axis=batch_axis))


# --------------------------------------------------------- Trimmed mean -----

SELECT_TRIM_UP_TO = 4  # trimmed_mean: repeated max/min selection up to this trim, a sort above

def trimmed_mean(trim: int = 1):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018; TorchJD's
    ``TrimmedMean``): per coordinate, drop the ``trim`` largest and ``trim``
    smallest values over the present tasks and average the rest. TorchJD
    requires trim_number; 1 here. ``init(T)`` raises a ValueError for
    T < 2·trim + 1; with fewer present tasks than that, the direction is the
    plain mean of the present tasks (documented fallback)."""
    if trim < 0:
        raise ValueError(f"trimmed_mean: trim must be >= 0, found {trim}")

    def core(state, x: JacInputs):
        on = x.mask > 0
        n = jnp.sum(on)
        rank = jnp.arange(x.num_tasks)

        def leaf_tm(a):
            r = jnp.reshape(rank, (-1,) + (1,) * (a.ndim - 1))
            if trim <= SELECT_TRIM_UP_TO:
                # drop the largest and the smallest remaining entry trim times (one position
                # each, ties by first index), then sum what is left: 2·trim + 1 passes over J,
                # where XLA:CPU's sort over the task axis took 4x the whole Jacobian step
                # (T = 10); no subtraction, so an outlier row cannot cancel the others' digits
                keep = jnp.broadcast_to(row_mask(on, a) > 0, a.shape)
                for _ in range(trim):
                    hi = jnp.argmax(jnp.where(keep, a, -jnp.inf), axis=0)
                    keep = keep & (r != hi[None])
                    lo = jnp.argmin(jnp.where(keep, a, jnp.inf), axis=0)
                    keep = keep & (r != lo[None])
                total = jnp.sum(jnp.where(keep, a, 0.0), 0)
            else:
                srt = jnp.sort(jnp.where(row_mask(on, a) > 0, a, jnp.inf), axis=0)
                total = jnp.sum(jnp.where((r >= trim) & (r < n - trim), srt, 0.0), 0)
            tm = total / jnp.maximum(n - 2 * trim, 1).astype(a.dtype)
            mean = jnp.sum(a, 0) / jnp.maximum(n, 1).astype(a.dtype)
            return jnp.where(n >= 2 * trim + 1, tm, mean)

        return jax.tree.map(leaf_tm, x.jac), state

    return make_jac_aggregator("trimmed_mean", (), core, min_tasks=2 * trim + 1,
                               hparams=dict(trim=trim))


# ----------------------------------------------------------------- MoCo -----

MOCO_PROJECTIONS = ("softmax", "simplex")


def moco(beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
         gamma_sigma: float = 0.5, rho: float = 0.0, normalize: bool = True,
         projection: str = "softmax"):
    """MoCo (Fernando et al., ICLR 2023): tracked task gradients Y and weights λ.

    Call k = 1, 2, …: β_k = β/k^β_σ, γ_k = γ/k^γ_σ;
    Y ← Y − β_k(Y − Ĵ), Ĵ_t = g_t/(‖g_t‖ + 1e-8)·L_t (``normalize``, LibMTL's
    ``MoCo.py``, from the authors' shared code) or g_t;
    λ ← P(λ − γ_k(YYᵀ + ρI)λ) with P = softmax (LibMTL) or the Euclidean
    projection onto the simplex (``projection='simplex'``, the paper; the
    authors' public code also uses it, with a factor 2 that γ absorbs and no
    normalisation); d = Yᵀλ. Defaults as LibMTL: β 0.5, β_σ 0.5, γ 0.1,
    γ_σ 0.5, ρ 0. Y starts at 0 and λ at 1/T. Absent tasks: their rows of Y
    are kept and λ runs on the present tasks (renormalised). State:
    (Y like J, λ (T,), k). T = 1: d = Y_1.
    """
    if projection not in MOCO_PROJECTIONS:
        raise ValueError(f"moco: projection must be one of {MOCO_PROJECTIONS}, "
                         f"found {projection!r}")

    def init(num_tasks, like):
        _need_like("moco", like)
        return (tree_zeros_rows(num_tasks, like), jnp.full((num_tasks,), 1.0 / num_tasks),
                jnp.zeros((), jnp.int32))

    def core(state, x: JacInputs):
        y, lam, k = state
        k = k + 1
        kf = k.astype(x.mask.dtype)
        b = beta / kf ** beta_sigma
        g_k = gamma / kf ** gamma_sigma
        target = x.jac
        if normalize:
            c = x.losses / (jnp.sqrt(_sq_norms(x.jac)) + 1e-8)
            target = _scale_rows(c, x.jac)
        y_new = jax.tree.map(lambda a, t: a - b.astype(a.dtype) * (a - t.astype(a.dtype)), y,
                             target)
        y = _keep_rows(x.mask, y_new, y)
        yy = gramian(jax.tree.map(lambda a: a * row_mask(x.mask, a), y)).astype(x.mask.dtype)
        lam0 = lam.astype(x.mask.dtype) * x.mask
        lam0 = jnp.where(jnp.sum(lam0) > 0, safe_div(lam0, jnp.sum(lam0)),
                         solvers.uniform(x.mask))
        step = lam0 - g_k * (yy @ lam0 + rho * lam0)
        new = (_masked_softmax(step, x.mask) if projection == "softmax"
               else solvers.project_simplex(step, x.mask))
        d = aggregate(new, y)
        return d, (y, jnp.where(x.mask > 0, new, lam).astype(lam.dtype), k)

    needs = ("losses",) if normalize else ()
    return make_jac_aggregator("moco", needs, core, init=init,
                               hparams=dict(beta=beta, beta_sigma=beta_sigma, gamma=gamma,
                                            gamma_sigma=gamma_sigma, rho=rho,
                                            normalize=normalize, projection=projection))


# --------------------------------------------------------------- DB-MTL -----

def db_mtl(beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8):
    """DB-MTL (Lin et al. 2023, 'Dual-balancing multi-task learning'), as
    LibMTL's ``DB_MTL.py``.

    Loss-scale balancing: the gradient of log(L_t + eps), ĝ_t = g_t/(L_t + eps).
    Gradient-magnitude balancing: an EMA of those gradients, call k = 1, 2, …:
    m_t ← ĝ_t + β_k(m_t − ĝ_t), β_k = β/k^β_σ (m starts at 0, no bias
    correction, as LibMTL), then d = Σ_t α_t m_t with
    α_t = max_s ‖m_s‖/(‖m_t‖ + eps): every task contributes the largest norm.
    Defaults as LibMTL: β 0.9, β_σ 0. LibMTL's task heads are trained on
    Σ log(L_t + eps), i.e. head weights 1/(L_t + eps) (the trainer's part).
    State: (m like J, k). T = 1: d = m_1.
    """

    def init(num_tasks, like):
        _need_like("db_mtl", like)
        return (tree_zeros_rows(num_tasks, like), jnp.zeros((), jnp.int32))

    def core(state, x: JacInputs):
        m, k = state
        k = k + 1
        b = beta / k.astype(x.mask.dtype) ** beta_sigma
        ghat = _scale_rows(x.mask / (x.losses + eps), x.jac)
        m_new = jax.tree.map(lambda a, g: g + b.astype(a.dtype) * (a - g), m, ghat)
        m = _keep_rows(x.mask, m_new, m)
        norms = jnp.sqrt(_sq_norms(m))
        top = jnp.max(jnp.where(x.mask > 0, norms, 0.0))
        alpha = top / (norms + eps) * x.mask
        return aggregate(alpha, m), (m, k)

    return make_jac_aggregator("db_mtl", ("losses",), core, init=init,
                               hparams=dict(beta=beta, beta_sigma=beta_sigma, eps=eps))


# ------------------------------------------------------------ ExcessMTL -----

def excess_mtl(robust_step_size: float = 1e-2, eps: float = 1e-7):
    """ExcessMTL (He et al., ICML 2024, 'Robust multi-task learning with
    excess risks'), as LibMTL's ``ExcessMTL.py`` (from the authors' code).

    Per task an AdaGrad-style diagonal curvature estimate H_t = sqrt(Σ_steps
    g_t² + eps) (elementwise, accumulated over calls); the excess-risk
    estimate e_t = g_tᵀ H_t⁻¹ g_t. The first call a task is present records
    e_t⁰ and leaves its weight; afterwards ω_t ← ω_t·exp(η e_t/e_t⁰), η =
    ``robust_step_size`` = 1e-2 (LibMTL), and ω is renormalised to Σ ω = T.
    d = Σ_t ω_t g_t with this call's ω (weights start at 1). e_t⁰ = 0 (a zero
    first gradient) gives e_t/e_t⁰ = 0. State: (Σ g² like J, e⁰ (T,), seen (T,),
    ω (T,)). T = 1: ω = 1.
    """

    def init(num_tasks, like):
        _need_like("excess_mtl", like)
        z = jnp.zeros((num_tasks,))
        return (tree_zeros_rows(num_tasks, like), z, jnp.zeros((num_tasks,), bool),
                jnp.ones((num_tasks,)))

    def core(state, x: JacInputs):
        acc, e0, seen, omega = state
        on = x.mask > 0
        acc = jax.tree.map(lambda a, g: a + (g * g).astype(a.dtype), acc, x.jac)
        e = sum(jnp.sum(jnp.reshape(g * g / jnp.sqrt(a + eps).astype(g.dtype),
                                    (g.shape[0], -1)), axis=1)
                for a, g in zip(jax.tree.leaves(acc), jax.tree.leaves(x.jac)))
        e = e.astype(omega.dtype)
        update = on & seen
        ratio = safe_div(e, e0)
        omega_new = jnp.where(update, omega * jnp.exp(robust_step_size * ratio), omega)
        total = jnp.sum(omega_new)
        omega_new = jnp.where(jnp.any(update), omega_new * x.num_tasks / total, omega)
        e0 = jnp.where(on & ~seen, e, e0)
        d = aggregate(omega_new.astype(x.mask.dtype) * x.mask, x.jac)
        return d, (acc, e0, seen | on, omega_new)

    return make_jac_aggregator("excess_mtl", (), core, init=init,
                               hparams=dict(robust_step_size=robust_step_size, eps=eps))
