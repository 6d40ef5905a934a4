"""Gradient aggregators on the Gramian: MGDA, PCGrad, CAGrad, IMTL-G,
Nash-MTL, Aligned-MTL, UPGrad (and DualProj).

Each returns weights w with wᵀJ equal to the method's aggregated direction,
computed from G = J Jᵀ alone (J is never needed). Absent tasks are removed
from the problem (rows/columns of G dropped) and get weight 0. Every method
here is invariant to a common rescaling of G except where noted, so G is
first divided by its mean diagonal to keep float32 well conditioned.

The methods that solve an optimisation problem (MGDA, CAGrad, Nash-MTL,
UPGrad, DualProj) use the exact solvers of :mod:`mtl.optim.solvers`; every
method here also returns, through ``agg.weights_info``, the info dict
``{"certificate": c, "iterations": k}`` (float and int32 scalars): c is the
residual of the returned weights for this call's problem, on the Gramian
normalised to mean diagonal 1 (0 = exact; its meaning per method is in each
docstring; measured values in experiments/results/solver_precision.md), k the
solver iterations (0 for the closed forms).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl.optim import solvers
from mtl.optim.base import (Inputs, make_aggregator, masked_gram, normalize_gram, safe_div,
                            task_norms)


def _prep(x: Inputs):
    return normalize_gram(masked_gram(x.gram, x.mask))


def _info(certificate, iterations=0):
    return {"certificate": jnp.asarray(certificate),
            "iterations": jnp.asarray(iterations, jnp.int32)}


# ----------------------------------------------------------------- MGDA -----

def mgda_two_tasks(gram, mask=None):
    """Closed-form min-norm point for T = 2: w_1 = clip((G22−G12)/(G11+G22−2G12), 0, 1)."""
    mask = jnp.ones((2,), gram.dtype) if mask is None else mask
    g11, g22, g12 = gram[0, 0], gram[1, 1], gram[0, 1]
    den = g11 + g22 - 2.0 * g12
    w1 = jnp.where(den > 0, jnp.clip(safe_div(g22 - g12, den), 0.0, 1.0), 0.5)
    both = jnp.stack([w1, 1.0 - w1])
    return jnp.where(mask[0] * mask[1] > 0, both, solvers.uniform(mask))


MGDA_NORMALIZERS = ("none", "l2", "loss", "loss+")


def mgda_normalizers(gram, losses, normalize: str):
    """n_t that MGDA divides task gradient t by before solving (Sener & Koltun's
    code, LibMTL's ``mgda_gn``): 'none' 1, 'l2' ‖g_t‖, 'loss' L_t, 'loss+'
    L_t·‖g_t‖. A loss ≤ 0 gives n_t = 0 (the 'loss' variants need positive losses)."""
    t = gram.shape[0]
    if normalize == "none":
        return jnp.ones((t,), gram.dtype)
    if normalize == "l2":
        return task_norms(gram)
    pos = jnp.maximum(losses, 0.0)
    if normalize == "loss":
        return pos
    if normalize == "loss+":
        return pos * task_norms(gram)
    raise ValueError(f"mgda: normalize must be one of {MGDA_NORMALIZERS}, found {normalize!r}")


def mgda(iters: int | None = None, normalize: str = "none"):
    """MGDA (Sener & Koltun): w = argmin_{w ∈ Δ} wᵀGw, the min-norm point of
    the convex hull of the task gradients; Σ w = 1. Closed form for T = 2, the
    exact active-set solver :func:`solvers.min_norm_simplex` otherwise
    (``iters``: its iteration cap, default 4T + 16). Certificate: the duality
    gap wᵀĜw − min_t (Ĝw)_t ≥ wᵀĜw − min_Δ vᵀĜv on the normalised Gramian Ĝ
    (of the normalised gradients with ``normalize``).

    ``normalize`` (default 'none' = the spec and the paper's algorithm): divide
    each task gradient by n_t (:func:`mgda_normalizers`: 'l2' ‖g_t‖, 'loss'
    L_t, 'loss+' L_t‖g_t‖; the optional step of the authors' code, LibMTL's
    ``mgda_gn``), solve MGDA on the normalised gradients, and apply the
    solution to them as LibMTL does: d = Σ_t s_t g_t/n_t, i.e. w_t = s_t/n_t
    (Σ_t w_t n_t = 1). d is then a common descent direction of the normalised
    gradients, hence of the original ones. (The authors' code instead applies
    s to the unnormalised losses, which loses that guarantee.) A task with
    n_t = 0 (zero gradient, or loss ≤ 0 for the 'loss' variants) has a zero
    normalised gradient: the min-norm point is 0 and the update is zero, as
    for a zero gradient without normalisation.

    Scale property (not a bug; measured in experiments/results/mtl_optim.md):
    with 'none', for nearly orthogonal gradients w_t ≈ (1/‖g_t‖²)/Σ_s 1/‖g_s‖²,
    so a task whose gradient is k times larger gets ~k² times less weight. On
    MultiTab (two linear and two quadratic regression tasks; ρ = 0.4, seed 0)
    the quadratic tasks' gradients are ~2× larger at initialisation; starved,
    they stay large (8–40× after ~50 steps) and each gets < 2% of the
    weight: the shared encoder never learns their features and their test
    MSE ends ~6× the single-task one (Δm over 3 seeds and ρ = 0, 0.4, 0.8:
    −177, −164, −133%, vs EW −26, −21, −11%). 'l2' (for orthogonal gradients
    w_t ∝ 1/‖g_t‖: every task's contribution has the same norm) removes that
    bias: −5.7, −0.9, +5.9%. The sum of the weights
    is irrelevant with Adam-type optimizers (MGDA weights × T give the same
    run: test MSE equal to 4 digits)."""
    if normalize not in MGDA_NORMALIZERS:
        raise ValueError(f"mgda: normalize must be one of {MGDA_NORMALIZERS}, found {normalize!r}")
    needs = ("gram", "losses") if normalize in ("loss", "loss+") else ("gram",)

    def core(state, x: Inputs):
        g = masked_gram(x.gram, x.mask)
        if normalize != "none":
            n = mgda_normalizers(g, x.losses, normalize)
            g = safe_div(g, n[:, None] * n[None, :])
        g = normalize_gram(g)
        if x.num_tasks == 2:
            s = mgda_two_tasks(g, x.mask)
            info = _info(solvers.simplex_gap(g, s, x.mask))
        else:
            sol = solvers.min_norm_simplex(g, x.mask, iters)
            s, info = sol.x, _info(sol.certificate, sol.iterations)
        return (s if normalize == "none" else safe_div(s, n)), state, info

    return make_aggregator("mgda", needs, core, hparams=dict(iters=iters, normalize=normalize))


# --------------------------------------------------------------- PCGrad -----

def pcgrad_order(key, num_tasks):
    """The random order PCGrad uses: row t is the order in which task t is
    projected against the others (an independent permutation per task)."""
    keys = jax.random.split(key, num_tasks)
    return jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(keys)


def pcgrad_weights(gram, order, mask=None):
    """PCGrad with a fixed order, tracked on G.

    For each task t, g_t' starts as g_t; for s in order[t] (s ≠ t, s present):
    if g_t'ᵀg_s < 0, g_t' ← g_t' − (g_t'ᵀg_s/‖g_s‖²) g_s (against the original
    g_s, as in the authors' code). Returns w with wᵀJ = Σ_t g_t' (the sum, as
    in the spec; the authors' code defaults to the mean = w/T)."""
    t = gram.shape[0]
    mask = jnp.ones((t,), gram.dtype) if mask is None else mask
    gram = masked_gram(gram, mask)
    diag = jnp.diagonal(gram)
    rows = jnp.arange(t)

    def body(k, coef):
        s = order[:, k]
        dots = jnp.sum(coef * gram[s], axis=1)  # g_t'ᵀ g_{s_t}
        proj = (dots < 0) & (s != rows) & (mask[s] > 0)
        c = jnp.where(proj, safe_div(dots, diag[s]), 0.0)
        return coef.at[rows, s].add(-c)

    coef = jax.lax.fori_loop(0, t, body, jnp.diag(mask))
    return jnp.sum(coef, axis=0)


def pcgrad():
    """PCGrad (Yu et al.): random projection order from ``key``; Σ of the
    projected gradients (see :func:`pcgrad_weights`)."""

    def core(state, x: Inputs):
        order = pcgrad_order(x.key, x.num_tasks)
        return pcgrad_weights(_prep(x), order, x.mask), state, _info(jnp.zeros((), x.dtype))

    return make_aggregator("pcgrad", ("gram", "key"), core)


# --------------------------------------------------------------- CAGrad -----

def cagrad_objective(w, gram, mean_w, c):
    """g_wᵀg0 + √φ‖g_w‖ with φ = c²‖g0‖², g0 = J ᵀmean_w, g_w = Jᵀw."""
    g0_norm = jnp.sqrt(jnp.maximum(mean_w @ gram @ mean_w, 0.0))
    gw_sq = jnp.maximum(w @ gram @ w, 0.0)
    return w @ gram @ mean_w + c * g0_norm * jnp.sqrt(gw_sq + 1e-12)


def cagrad(c: float = 0.4, iters: int | None = None, rescale: bool = False):
    """CAGrad (Liu et al. 2021): w* = argmin_{w∈Δ} g_wᵀg0 + √φ‖g_w‖, φ = c²‖g0‖²,
    g0 the mean gradient of the present tasks; d = g0 + (√φ/‖g_w*‖) g_w*, so the
    weights are 1/T + λ w* with λ = √φ/‖g_w*‖ (0 when g_w* = 0). Scale: the
    mean gradient's (Σ w = 1 + λ). ``rescale=True`` divides d by 1 + c², the
    authors' default. The simplex problem is solved exactly by the active-set
    :func:`solvers.sqrt_qp_simplex` (``iters``: its iteration cap, default
    4T + 16). Certificate: its Frank–Wolfe gap, an upper bound on the excess
    of the dual objective over its minimum, on the normalised Gramian."""
    if c < 0:
        raise ValueError(f"cagrad: c must be >= 0, found {c}")

    def core(state, x: Inputs):
        g = _prep(x)
        mean_w = solvers.uniform(x.mask)
        g0_norm = jnp.sqrt(jnp.maximum(mean_w @ g @ mean_w, 0.0))
        sol = solvers.sqrt_qp_simplex(g, g @ mean_w, c * g0_norm, x.mask, iters)
        w = sol.x
        gw_norm = jnp.sqrt(jnp.maximum(w @ g @ w, 0.0))
        lam = safe_div(c * g0_norm, gw_norm, 1e-10)
        d = mean_w + lam * w
        return (d / (1.0 + c * c) if rescale else d), state, _info(sol.certificate,
                                                                  sol.iterations)

    return make_aggregator("cagrad", ("gram",), core,
                           hparams=dict(c=c, iters=iters, rescale=rescale))


# --------------------------------------------------------------- IMTL-G -----

def imtl_g_weights(gram, mask=None, rtol: float = 1e-6):
    """IMTL-G (Liu et al. 2021) from G: α with Σ α = 1 such that the
    aggregated gradient Jᵀα has equal projections onto every unit task
    gradient u_t = g_t/‖g_t‖: (αᵀG)_t/‖g_t‖ equal for all t.

    Solved as one T×T linear system, by LU with a step of iterative
    refinement, or by least squares where that fails or leaves a larger
    residual (minimum-norm α when the gradients are linearly dependent, e.g.
    uniform for identical gradients). Tasks with a zero gradient
    (‖g_t‖ ≤ rtol·max‖g‖) or absent get α_t = 0 and are left out of the
    equal-projection conditions. Use :func:`imtl_g_solve` for the residual."""
    return imtl_g_solve(gram, mask, rtol).x


def imtl_g_solve(gram, mask=None, rtol: float = 1e-6) -> solvers.Solved:
    """:func:`imtl_g_weights` with its certificate: the componentwise backward
    error of the defining equations, max(½·spread of the projections
    p_t = (αᵀG)_t/‖g_t‖ over the valid tasks / max_t (|α|ᵀ|G|)_t/‖g_t‖,
    |Σα − 1|)."""
    t = gram.shape[0]
    mask = jnp.ones((t,), gram.dtype) if mask is None else mask
    gram = masked_gram(gram, mask)
    norms = task_norms(gram)
    valid = (mask > 0) & (norms > rtol * jnp.max(norms))
    proj = safe_div(gram, norms[None, :])  # proj[s, t] = g_sᵀu_t
    ref = jnp.argmax(valid)
    rows_eq = (proj - proj[:, ref][:, None]).T  # row t: (proj[:,t] − proj[:,ref])ᵀα = 0
    vmask = valid.astype(gram.dtype)
    eye = jnp.eye(t, dtype=gram.dtype)
    m = jnp.where(valid[:, None], rows_eq * vmask[None, :], eye)
    m = m.at[ref].set(vmask)
    rhs = jnp.zeros((t,), gram.dtype).at[ref].set(1.0)
    def resid(a):
        return jnp.max(jnp.abs(m @ a - rhs))

    a_lu = solvers.solve_refined(m, rhs)
    fine = jnp.all(jnp.isfinite(a_lu))
    a_lu = jnp.where(fine, a_lu, 0.0)

    def lstsq():
        a_ls = jnp.linalg.lstsq(m, rhs)[0]
        return jnp.where(resid(a_ls) < resid(a_lu), a_ls, a_lu)

    # least squares only where LU broke down or left a residual above round-off
    size = jnp.max(jnp.abs(m) @ jnp.abs(a_lu)) + 1.0
    alpha = jax.lax.cond(fine & (resid(a_lu) <= 64 * jnp.finfo(m.dtype).eps * size),
                         lambda: a_lu, lstsq)
    alpha = jnp.where(valid, alpha, 0.0)
    alpha = jnp.where(jnp.any(valid), alpha, 0.0)
    p = alpha @ proj
    size = jnp.max(jnp.where(valid, jnp.abs(alpha) @ jnp.abs(proj), 0.0))
    spread = jnp.max(jnp.where(valid, p, -jnp.inf)) - jnp.min(jnp.where(valid, p, jnp.inf))
    cert = jnp.maximum(safe_div(0.5 * spread, size), jnp.abs(jnp.sum(alpha) - 1.0))
    return solvers.Solved(alpha, jnp.where(jnp.any(valid), cert, 0.0), jnp.zeros((), jnp.int32))


def imtl_g(rtol: float = 1e-6):
    """IMTL-G, weights Σ α = 1 (see :func:`imtl_g_weights`); gradients with
    norm ≤ rtol × the largest count as zero (weight 0)."""

    def core(state, x: Inputs):
        sol = imtl_g_solve(_prep(x), x.mask, rtol)
        return sol.x, state, _info(sol.certificate)

    return make_aggregator("imtl_g", ("gram",), core, hparams=dict(rtol=rtol))


# ------------------------------------------------------------- Nash-MTL -----

def nash_mtl(update_every: int = 1, iters: int = 50, normalize: bool = True, eps: float = 1e-6):
    """Nash-MTL (Navon et al. 2022): w > 0 with (Ĝ w)_t = 1/w_t, found by
    damped Newton on ½wᵀĜw − Σ log w_t (:func:`solvers.log_barrier_fixed_point`,
    at most ``iters`` steps, stopping once converged). Certificate: the
    squared Newton decrement λ(w)² of ½wᵀĜw − Σ log w_t
    (:func:`solvers.nash_decrement`), a bound on its excess over the minimum,
    for the returned w and this call's Ĝ (so on the
    calls that reuse w with ``update_every`` > 1 it measures how far the reused
    weights are from this step's solution).

    Ĝ = G/‖G‖_F + eps·I when ``normalize`` (the authors' normalisation, which
    makes w invariant to the gradients' scale; the solution for G itself is
    w/sqrt(‖G‖_F)), else Ĝ = G + eps·I. The eps·I keeps a solution when some
    conic combination of gradients vanishes (a zero or two opposite
    gradients), where the exact equation has none; those weights are then
    large (~1/sqrt(eps)) but finite. ``update_every = k`` recomputes w every k
    calls and reuses it (times ``present``) in between; state:
    (w_last, calls)."""
    if update_every < 1:
        raise ValueError(f"nash_mtl: update_every must be >= 1, found {update_every}")

    def init(num_tasks):
        return (jnp.ones((num_tasks,)), jnp.zeros((), jnp.int32))

    def solve(x: Inputs):
        g = masked_gram(x.gram, x.mask)
        if normalize:
            g = safe_div(g, jnp.linalg.norm(g))
        return g + eps * jnp.eye(x.num_tasks, dtype=g.dtype)

    def core(state, x: Inputs):
        w_last, calls = state
        a = solve(x)
        fresh = lambda: solvers.log_barrier_fixed_point(a, x.mask, iters)  # noqa: E731
        if update_every == 1:
            sol = fresh()
        else:
            sol = jax.lax.cond(calls % update_every == 0, fresh,
                               lambda: solvers.Solved(w_last.astype(x.dtype) * x.mask,
                                                      jnp.zeros((), x.dtype),
                                                      jnp.zeros((), jnp.int32)))
        w = sol.x
        cert = solvers.nash_decrement(a, w, x.mask > 0)
        return w, (w.astype(w_last.dtype), calls + 1), _info(cert, sol.iterations)

    return make_aggregator("nash_mtl", ("gram",), core, init=init,
                           hparams=dict(update_every=update_every, iters=iters,
                                        normalize=normalize, eps=eps))


# ---------------------------------------------------------- Aligned-MTL -----

def aligned_mtl_matrix(gram, mask=None, scale: str = "min"):
    """B with Ĵ = B J the aligned Jacobian: G = V Λ Vᵀ, B = V_r diag(sqrt(σ/λ_i)) V_rᵀ
    over the r eigenvalues above λ_max·T·10·eps(dtype), so Ĵ Ĵᵀ = σ V_r V_rᵀ:
    every non-zero singular value of Ĵ equals sqrt(σ) (condition number 1).
    σ = the smallest kept eigenvalue ('min', the paper's default), their
    median ('median') or mean ('rmse')."""
    t = gram.shape[0]
    mask = jnp.ones((t,), gram.dtype) if mask is None else mask
    lam, vec = jnp.linalg.eigh(masked_gram(gram, mask))
    tol = jnp.max(lam) * t * 10.0 * jnp.finfo(gram.dtype).eps
    keep = lam > jnp.maximum(tol, 0.0)
    big = jnp.max(lam) + 1.0
    if scale == "min":
        sigma = jnp.min(jnp.where(keep, lam, big))
    elif scale == "median":
        kept = jnp.sort(jnp.where(keep, lam, jnp.inf))
        r = jnp.sum(keep)
        lo, hi = kept[jnp.maximum((r - 1) // 2, 0)], kept[jnp.maximum(r // 2, 0)]
        sigma = 0.5 * (lo + hi)
    elif scale == "rmse":
        sigma = safe_div(jnp.sum(jnp.where(keep, lam, 0.0)), jnp.sum(keep))
    else:
        raise ValueError(f"aligned_mtl: scale must be 'min', 'median' or 'rmse', found {scale!r}")
    sigma = jnp.where(jnp.any(keep), sigma, 0.0)
    coef = jnp.where(keep, jnp.sqrt(safe_div(sigma, jnp.where(keep, lam, 1.0))), 0.0)
    return (vec * coef[None, :]) @ vec.T


def aligned_residual(gram, b):
    """Aligned-MTL's certificate: max |B G B − σP| / σ, with σP the best multiple of
    a projector, read off B G B itself: σ = its largest eigenvalue, P the
    projector on the eigenvectors within a factor 2 of it (0 for B = 0)."""
    m = b @ gram @ b
    m = 0.5 * (m + m.T)
    lam, vec = jnp.linalg.eigh(m)
    sigma = jnp.max(lam)
    keep = lam > 0.5 * sigma
    proj = (vec * keep.astype(m.dtype)[None, :]) @ vec.T
    return jnp.where(sigma > 0, safe_div(jnp.max(jnp.abs(m - sigma * proj)), sigma), 0.0)


def aligned_mtl(scale: str = "min"):
    """Aligned-MTL (Senushkin et al. 2023): d = Σ_t ĝ_t = Jᵀ B 1 with B from
    :func:`aligned_mtl_matrix`; w = B·present. B depends only on ratios of
    eigenvalues, so w is invariant to the scale of G, and the aligned
    gradients ĝ_t (rows of BJ) have singular values all equal to sqrt(σ).
    """
    if scale not in ("min", "median", "rmse"):
        raise ValueError(f"aligned_mtl: scale must be 'min', 'median' or 'rmse', found {scale!r}")

    def core(state, x: Inputs):
        g = _prep(x)
        b = aligned_mtl_matrix(g, x.mask, scale)
        return b @ x.mask, state, _info(aligned_residual(g, b))

    return make_aggregator("aligned_mtl", ("gram",), core, hparams=dict(scale=scale))


# ------------------------------------------------------- UPGrad, DualProj ---

def dual_cone_weights(gram, u, mask=None, iters: int | None = None):
    """v with Jᵀv = the projection of Jᵀu onto the dual cone {x : Jx ≥ 0}.

    By duality v = argmin_{v ≥ u} ½vᵀGv (Quinton & Rey 2024), a box QP solved
    exactly by :func:`solvers.box_qp` (``iters``: iteration cap, default
    4T + 16). Absent tasks are dropped (no cone constraint)."""
    return dual_cone_solve(gram, u, mask, iters).x


def dual_cone_solve(gram, u, mask=None, iters: int | None = None) -> solvers.Solved:
    """:func:`dual_cone_weights` with its certificate (see :func:`solvers.box_qp`)."""
    mask = jnp.ones_like(u) if mask is None else mask
    return solvers.box_qp(masked_gram(gram, mask), u * mask, mask, iters)


def upgrad(iters: int | None = None):
    """UPGrad (Quinton & Rey 2024, 'Jacobian descent'): the mean of the
    projections of each g_t/n onto the dual cone of the rows of J,
    w = Σ_t v_t, v_t = argmin_{v ≥ e_t/n} vᵀGv (n = present tasks). The
    result conflicts with no task: (Jd)_t ≥ 0. (The spec's phrase 'project the
    mean gradient' is :func:`dualproj`; UPGrad in the paper and its code is
    this per-task version.) Each projection is an exact box QP
    (:func:`dual_cone_solve`); certificate: the largest of their KKT residuals
    max_s |min(v_s − u_s, (Ĝv)_s)|/max|u| (so (Ĝw)_s ≥ −certificate/n: no task
    conflicts with d beyond it)."""

    def core(state, x: Inputs):
        g = _prep(x)
        n = jnp.sum(x.mask)
        us = jnp.eye(x.num_tasks, dtype=g.dtype) * x.mask[:, None]
        sol = jax.vmap(lambda u: dual_cone_solve(g, u, x.mask, iters))(us)
        w = safe_div(jnp.sum(sol.x * x.mask[:, None], axis=0), n)
        return w, state, _info(jnp.max(sol.certificate), jnp.max(sol.iterations))

    return make_aggregator("upgrad", ("gram",), core, hparams=dict(iters=iters))


def dualproj(iters: int | None = None):
    """DualProj: the mean gradient projected onto the dual cone of the rows of
    J, w = argmin_{v ≥ 1/n} vᵀGv (the spec's wording for UPGrad); exact box QP,
    certificate as :func:`upgrad`'s."""

    def core(state, x: Inputs):
        g = _prep(x)
        u = safe_div(x.mask, jnp.sum(x.mask))
        sol = dual_cone_solve(g, u, x.mask, iters)
        return sol.x, state, _info(sol.certificate, sol.iterations)

    return make_aggregator("dualproj", ("gram",), core, hparams=dict(iters=iters))
