"""More aggregators on the Gramian: GradVac, ConFIG, FairGrad, Krum.

Each returns w with wᵀJ equal to the method's direction, from G = J Jᵀ alone
(as in :mod:`mtl.optim.gradient`). Absent tasks are dropped from the problem
and get weight 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl.optim.base import (Inputs, make_aggregator, masked_gram, normalize_gram, safe_div, tiny,
                            task_norms)
from mtl.optim.gradient import pcgrad_order


# -------------------------------------------------------------- GradVac -----

def gradvac_weights(gram, order, target, beta, mask=None, ema_on_conflict_only=False, eps=1e-8):
    """GradVac with a fixed order, tracked on G. Returns (w, new_target).

    For each task i, g_i' starts as g_i; for j in order[i] (j ≠ i, both
    present): φ = cos(g_i', g_j); if φ < φ̂_ij,
    g_i' += ‖g_i'‖(φ̂√(1−φ²) − φ√(1−φ̂²)) / (‖g_j‖√(1−φ̂²) + eps) · g_j
    (the multiple of the original g_j that raises the cosine to φ̂); then
    φ̂_ij ← (1−β)φ̂_ij + βφ. g_i' = Σ_k C_ik g_k is tracked by its coefficients:
    ‖g_i'‖² = (C G Cᵀ)_ii, g_i'ᵀg_j = (C G)_ij. w = Σ_i C_i (the sum of the g_i').
    """
    t = gram.shape[0]
    mask = jnp.ones((t,), gram.dtype) if mask is None else mask
    gram = masked_gram(gram, mask)
    norms = task_norms(gram)
    rows = jnp.arange(t)

    def body(k, carry):
        coef, phi_hat = carry
        s = order[:, k]
        cg = coef @ gram
        dots = cg[rows, s]
        norm_i = jnp.sqrt(jnp.maximum(jnp.sum(cg * coef, axis=1), 0.0))
        phi = safe_div(dots, norm_i * norms[s] + eps)
        valid = (s != rows) & (mask[s] > 0) & (mask > 0)
        tgt = phi_hat[rows, s]
        low = valid & (phi < tgt)
        root_t = jnp.sqrt(jnp.maximum(1.0 - tgt * tgt, 0.0))
        root_p = jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0))
        c = norm_i * (tgt * root_p - phi * root_t) / (norms[s] * root_t + eps)
        coef = coef.at[rows, s].add(jnp.where(low, c, 0.0))
        upd = low if ema_on_conflict_only else valid
        new_t = jnp.where(upd, (1.0 - beta) * tgt + beta * phi, tgt)
        phi_hat = phi_hat.at[rows, s].set(new_t)
        return coef, phi_hat

    coef, target = jax.lax.fori_loop(0, t, body, (jnp.diag(mask), target.astype(gram.dtype)))
    return jnp.sum(coef, axis=0), target


def gradvac(beta: float = 0.5, ema_on_conflict_only: bool = False):
    """Gradient Vaccine (Wang et al., ICLR 2021), whole-model granularity.

    PCGrad generalised to a target cosine φ̂_ij per ordered pair, tracked by an
    EMA (φ̂ = 0 at the start, so the first step is PCGrad): see
    :func:`gradvac_weights`; random order from ``key`` as PCGrad (an
    independent permutation per task); w = the sum of the adjusted gradients
    (LibMTL's scale). β = 0.5 as LibMTL's default (the paper uses 1e-2).

    The EMA: the paper's Algorithm updates φ̂_ij at every visit of (i, j) with
    the cosine φ measured just before the adjustment (default);
    ``ema_on_conflict_only=True`` updates it only when φ < φ̂ (LibMTL's
    ``GradVac.py`` does this). LibMTL's per-layer groupings (group_type 1, 2)
    would need one Gramian per group and are not offered. State: φ̂ (T, T).
    T = 1: w = 1.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"gradvac: beta must be in [0, 1], found {beta}")

    def init(num_tasks):
        return jnp.zeros((num_tasks, num_tasks))

    def core(state, x: Inputs):
        order = pcgrad_order(x.key, x.num_tasks)
        w, target = gradvac_weights(normalize_gram(masked_gram(x.gram, x.mask)), order, state,
                                    beta, x.mask, ema_on_conflict_only)
        return w, target.astype(state.dtype)

    return make_aggregator("gradvac", ("gram", "key"), core, init=init,
                           hparams=dict(beta=beta, ema_on_conflict_only=ema_on_conflict_only))


# --------------------------------------------------------------- ConFIG -----

def config_weights(gram, pref, mask=None, rcond=None):
    """ConFIG (Liu et al. 2024, Eq. 2, as TorchJD's ``ConFIG``) from G.

    Unit rows U = D⁻¹J (D = diag ‖g_t‖, zero rows stay zero); the best direction
    b = U⁺p (p the preference vector, default ones) = Uᵀ(UUᵀ)⁺p = Jᵀ a with
    a = D⁻¹C⁺p, C = D⁻¹GD⁻¹ the cosine matrix. d = (Σ_t g_tᵀb̂) b̂ with b̂ = b/‖b‖,
    so w = a·(1ᵀGa)/(aᵀGa). C⁺ drops eigenvalues ≤ rcond·λ_max(C) (default
    10·T·eps(dtype); TorchJD's torch.linalg.pinv(U) cuts singular values of U
    below max(T, P)·eps·σ_max, which for large P drops much more)."""
    t = gram.shape[0]
    mask = jnp.ones((t,), gram.dtype) if mask is None else mask
    gram = masked_gram(gram, mask)
    norms = task_norms(gram)
    inv = safe_div(jnp.ones_like(norms), norms)
    cos = gram * inv[:, None] * inv[None, :]
    lam, vec = jnp.linalg.eigh(cos)
    rc = 10.0 * t * float(jnp.finfo(gram.dtype).eps) if rcond is None else rcond
    keep = lam > rc * jnp.maximum(jnp.max(lam), 0.0)
    lam_inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    a = inv * ((vec * lam_inv[None, :]) @ (vec.T @ (pref * mask)))
    ga = gram @ a
    return a * safe_div(jnp.sum(ga), a @ ga)


def config(pref=None, rcond=None):
    """ConFIG: a direction with equal cosine to every task gradient
    (``pref=None``; a preference vector p makes the cosines ∝ p), of length
    Σ_t g_tᵀd̂ (see :func:`config_weights`). TorchJD's default pref is ones.
    w is invariant to the scale of G (a scales as 1/sqrt(c), 1ᵀGa as sqrt(c)),
    so it is computed on G/mean-diagonal; d scales with J. T = 1: w = 1."""
    fixed = None if pref is None else tuple(float(v) for v in pref)

    def init(num_tasks):
        if fixed is not None and len(fixed) != num_tasks:
            raise ValueError(f"config: pref has {len(fixed)} entries for {num_tasks} tasks")
        return ()

    def core(state, x: Inputs):
        p = jnp.ones((x.num_tasks,), x.dtype) if fixed is None else jnp.asarray(fixed, x.dtype)
        return config_weights(normalize_gram(masked_gram(x.gram, x.mask)), p, x.mask,
                              rcond), state

    return make_aggregator("config", ("gram",), core, init=init,
                           hparams=dict(pref=fixed, rcond=rcond))


# ------------------------------------------------------------- FairGrad -----

def alpha_fair_point(a, mask, alpha, iters: int = 50, n_trials: int = 10):
    """w > 0 with (A w)_t = w_t^(−1/α) on active coordinates, for PD A.

    It is the stationarity condition of the strictly convex
    f(w) = ½wᵀAw − Σ_t φ(w_t), φ(w) = log w (α = 1) or w^(1−1/α)/(1−1/α),
    minimised by Newton steps (Hessian A + diag(w^(−1/α−1)/α)) kept inside
    w > 0 (at most 99% of the way to the boundary) with backtracking on f
    (the largest of 2^−j, j < n_trials, with Armijo decrease; all trials
    evaluated at once). Start: the best multiple of 1/sqrt(A_tt)."""
    t = a.shape[0]
    on = mask > 0
    a = jnp.where(on[:, None] & on[None, :], a, jnp.eye(t, dtype=a.dtype))
    inv_a = 1.0 / alpha
    p = 1.0 - inv_a

    def phi(w):
        return jnp.log(w) if alpha == 1.0 else w ** p / p

    def f(w):
        return 0.5 * w @ a @ w - jnp.sum(jnp.where(on, phi(w), 0.0))

    v = 1.0 / jnp.sqrt(jnp.maximum(jnp.diagonal(a), 1e-30))
    # c minimising f(c v): c^(1+1/α) = Σ v^(1−1/α) / vᵀAv
    c = (jnp.sum(v ** p) / jnp.maximum(v @ a @ v, 1e-30)) ** (1.0 / (1.0 + inv_a))
    w0 = c * v
    steps = 2.0 ** -jnp.arange(n_trials, dtype=a.dtype)

    def body(_, w):
        grad = a @ w - w ** (-inv_a)
        hess = a + jnp.diag(inv_a * w ** (-inv_a - 1.0))
        dw = -jnp.linalg.solve(hess, grad)
        neg = dw < 0
        room = jnp.min(jnp.where(neg, -w / jnp.where(neg, dw, -1.0), jnp.inf))
        top = jnp.minimum(1.0, 0.99 * room)
        cands = w[None, :] + (top * steps)[:, None] * dw[None, :]
        fc = jax.vmap(f)(cands)
        fw = f(w)
        ok = (fc <= fw + 1e-4 * top * steps * (grad @ dw)) & jnp.isfinite(fc) \
            & jnp.all(cands > 0, axis=1)
        j = jnp.argmax(ok)
        w_new = jnp.where(jnp.any(ok), cands[j], w)
        return jnp.where(jnp.all(jnp.isfinite(w_new)), w_new, w)

    w = jax.lax.fori_loop(0, iters, body, w0)
    return jnp.where(on, w, 0.0)


def fairgrad(alpha: float = 1.0, iters: int = 50, eps: float = 1e-6):
    """FairGrad (Ban & Ji, ICML 2024): α-fair allocation, w > 0 with
    (G w)_t = w_t^(−1/α) (α = 1: Nash-MTL's equation), d = Jᵀw.

    As LibMTL's ``FairGrad.py`` (α = 1; it solves the same equation by
    scipy's least_squares from w = 1/T on the raw G), the weights are those
    of the raw G — no scale normalisation. The equation is solved on
    Ĝ = G/s + eps·I (s = mean diagonal, for float32 range; eps·I keeps a
    solution when a conic combination of gradients vanishes, e.g. a zero
    gradient, where the exact equation has none) by :func:`alpha_fair_point`;
    then w = s^(−α/(1+α))·ŵ, the exact solution for G when eps = 0. G = 0:
    w = ŵ. T = 1: w = G^(−α/(1+α)).
    """
    if alpha <= 0:
        raise ValueError(f"fairgrad: alpha must be > 0, found {alpha}")

    def core(state, x: Inputs):
        g = masked_gram(x.gram, x.mask)
        n = jnp.sum(x.mask)
        s = safe_div(jnp.trace(g), n)
        big = s > tiny(x.dtype)
        g_hat = jnp.where(big, g / jnp.where(big, s, 1.0), 0.0)
        a = g_hat + eps * jnp.eye(x.num_tasks, dtype=g.dtype)
        w = alpha_fair_point(a, x.mask, alpha, iters)
        scale = jnp.where(big, jnp.where(big, s, 1.0) ** (-alpha / (1.0 + alpha)), 1.0)
        return w * scale, state

    return make_aggregator("fairgrad", ("gram",), core,
                           hparams=dict(alpha=alpha, iters=iters, eps=eps))


# ---------------------------------------------------------------- Krum ------

def krum_weights(gram, mask, n_byzantine: int, n_selected: int = 1):
    """(Multi-)Krum (Blanchard et al., NeurIPS 2017; TorchJD's ``Krum``) from G.

    Distances ‖g_s − g_t‖ = sqrt(G_ss + G_tt − 2G_st); each present task's
    score is the sum of its distances to its n − f − 2 nearest other present
    tasks (n present, f = ``n_byzantine``); w = 1/m on the m = ``n_selected``
    lowest scores (ties: lower index). Fewer than f + 3 present tasks (too few
    for the rule): w = the mean of the present tasks (a documented fallback;
    TorchJD raises). m larger than n: all present tasks, 1/n each."""
    t = gram.shape[0]
    on = mask > 0
    n = jnp.sum(on)
    diag = jnp.diagonal(gram)
    dist = jnp.sqrt(jnp.maximum(diag[:, None] + diag[None, :] - 2.0 * gram, 0.0))
    big = jnp.asarray(jnp.inf, gram.dtype)
    other = on[:, None] & on[None, :] & ~jnp.eye(t, dtype=bool)
    srt = jnp.sort(jnp.where(other, dist, big), axis=1)
    k = n - n_byzantine - 2
    scores = jnp.sum(jnp.where(jnp.arange(t)[None, :] < k, srt, 0.0), axis=1)
    scores = jnp.where(on, scores, big)
    rank = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
    m = jnp.minimum(n_selected, n)
    chosen = on & (rank < m)
    w = safe_div(chosen.astype(gram.dtype), m.astype(gram.dtype))
    mean = safe_div(mask, jnp.sum(mask))
    return jnp.where(n >= n_byzantine + 3, w, mean)


def krum(n_byzantine: int = 0, n_selected: int = 1):
    """Krum / Multi-Krum: the mean of the ``n_selected`` task gradients with
    the smallest summed distance to their nearest neighbours (see
    :func:`krum_weights`); Σ w = 1. TorchJD requires ``n_byzantine``; 0 here.
    ``init(T)`` raises a ValueError for T < n_byzantine + 3 or T < n_selected
    (as TorchJD's checks). Distances are computed on G/mean-diagonal (the
    choice is scale invariant)."""
    if n_byzantine < 0 or n_selected < 1:
        raise ValueError(f"krum: need n_byzantine >= 0 and n_selected >= 1, found "
                         f"n_byzantine={n_byzantine}, n_selected={n_selected}")

    def init(num_tasks):
        if num_tasks < n_byzantine + 3 or num_tasks < n_selected:
            raise ValueError(f"krum needs at least max(n_byzantine + 3, n_selected) = "
                             f"{max(n_byzantine + 3, n_selected)} tasks, found {num_tasks}; "
                             f"lower n_byzantine/n_selected or use another method")
        return ()

    def core(state, x: Inputs):
        g = normalize_gram(masked_gram(x.gram, x.mask))
        return krum_weights(g, x.mask, n_byzantine, n_selected), state

    return make_aggregator("krum", ("gram",), core, init=init,
                           hparams=dict(n_byzantine=n_byzantine, n_selected=n_selected))
