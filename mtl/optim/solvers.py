"""Small jittable solvers on T×T problems, each with a certificate.

All take a float ``mask`` (T,) of active coordinates; inactive coordinates
are held at 0 and never enter the solution. Everything is pure, shape-static
and jittable (``lax.while_loop`` with an iteration cap), in the dtype of its
inputs: float32 in training (JAX x64 stays off), float64 under
``jax.enable_x64`` in the tests.

Why exact active-set methods, in the graph. The QPs here are tiny (T ≤ 64)
and have finitely many faces, so an active-set method that solves each face
exactly (one LU of a masked T×T matrix, plus one step of iterative
refinement) ends in finitely many steps at the exact optimum of the problem
it was given, up to the backward error of float32 LU: it is the exact
solution of a problem whose Gramian differs from G by ~eps·‖G‖. Fixed-count
first-order methods (the Frank–Wolfe / projected-gradient solvers this
module used to hold) stop where their linear rate runs out on ill-conditioned
G, which is what left UPGrad with conflicting directions. A float64 host
solve via ``jax.pure_callback`` was the alternative; it was not chosen: it
blocks the device on every step, adds a host round trip to the jitted,
sharded step (measured per call in experiments/bench/solver_precision.py),
and would still see only the float32 Gramian. The in-graph solve costs one
or a few LU factorisations of a T×T matrix per iteration and ≤ ~2T
iterations (measured times in experiments/results/solver_precision.md).

What float32 can and cannot deliver (eps = 1.19e-7; tolerances asserted in
tests/optim_solvers_exact_test.py, measured values in
experiments/results/solver_precision.md):

- certificates (each solver's own; on the Gramian normalised to mean
  diagonal 1; 0 = exact) in float32 at cond(G) ≤ 1e6, T ≤ 64: ≤ 1e-5 for
  MGDA, CAGrad and IMTL-G, ≤ 1e-4 for UPGrad, DualProj and Nash-MTL (measured
  up to 2.6e-6, 7.5e-9, 1.2e-7; 2.2e-5, 3.8e-6, 2.0e-5); ≤ 1e-10 in float64
  (under ``jax.enable_x64``, where the same code reaches ~1e-15).
  UPGrad/DualProj's no-conflict condition (Gw)_t ≥ 0 holds to that residual.
  Nash-MTL's Newton iteration can end at its cap (50) in float32 at cond 1e6:
  rounding keeps its decrement above the stopping threshold, not its answer
  away from the optimum (objective gap measured ≤ 1e-5).
- the objective (MGDA's ‖d‖², CAGrad's dual, the projections' ½vᵀGv) is within
  1e-6 of scipy's float64 optimum of the same float32 G (measured ≤ 1e-8).
- the weights are determined only to ~cond(G)·eps in the worst direction (the
  problem's own sensitivity to rounding G to float32), the update direction
  d = Jᵀw to ≤ 10·T·sqrt(cond)·eps relative (0.077 at T = 64, cond 1e6;
  measured ≤ 0.041): the tests compare against scipy within that.
- Aligned-MTL is an eigendecomposition: it drops eigenvalues below
  λ_max·T·10·eps as before (in float32 from cond ≈ 1.3e4 at T = 64, 2e5 at
  T = 4, where eigh cannot resolve them), so beyond that it returns the
  rank-truncated answer; its certificate (deviation of the aligned Gramian
  from σ × a projector) is ≤ 1e-3 in float32.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import lu_factor, lu_solve

from mtl.optim.base import safe_div


class Solved(NamedTuple):
    """A solver's answer: ``x`` and how far it is from exact.

    ``certificate``: a scalar ≥ 0, zero exactly at the problem's solution (its
    meaning is given by each solver); ``iterations``: int32 scalar, the
    iterations used (== the cap means the cap was reached)."""

    x: jax.Array
    certificate: jax.Array
    iterations: jax.Array


def project_simplex(v, mask):
    """Euclidean projection of v onto {w ≥ 0, Σ w = 1, w_i = 0 where mask = 0}
    (sort-based, Duchi et al. 2008). Returns 0 if no coordinate is active."""
    on = mask > 0
    big = jnp.max(jnp.where(on, jnp.abs(v), 0.0)) + 1.0
    key = jnp.where(on, v, -big - 1.0)
    order = jnp.argsort(-key)
    u = key[order]
    on_sorted = on[order]
    css = jnp.cumsum(jnp.where(on_sorted, u, 0.0)) - 1.0
    k = jnp.arange(1, v.shape[0] + 1, dtype=v.dtype)
    cond = on_sorted & (u - css / k > 0)
    rho = jnp.maximum(jnp.sum(cond) - 1, 0)
    theta = css[rho] / (rho + 1).astype(v.dtype)
    w = jnp.where(on, jnp.maximum(v - theta, 0.0), 0.0)
    return jnp.where(jnp.any(on), w, 0.0)


def uniform(mask):
    return safe_div(mask, jnp.sum(mask))


def simplex_minimize(f, w0, mask, iters: int = 200, n_trials: int = 12, tol: float = 1e-7,
                     rtol: float = 1e-6):
    """Minimise a convex f over the (masked) simplex: projected gradient with a
    backtracking step (the first of η·2^(2−j), j < n_trials, that satisfies the
    sufficient-decrease condition f(w⁺) ≤ f(w) + ∇fᵀ(w⁺−w) + ‖w⁺−w‖²/(2η)),
    all trials evaluated at once so each iteration has a fixed shape; η carries over
    between iterations (so it can also grow by 4× per iteration). Stops after ``iters``
    iterations, or once an accepted step moves w by less than ``tol`` (max-norm) or lowers
    f by at most ``rtol``·|f|. A generic first-order tool (no certificate); the
    methods of :mod:`mtl.optim.gradient` use the exact solvers below."""
    grad_f = jax.grad(f)
    scales = 2.0 ** (2.0 - jnp.arange(n_trials, dtype=w0.dtype))

    def body(carry):
        i, w, eta, _ = carry
        g = grad_f(w) * mask
        fw = f(w)
        etas = eta * scales
        cands = jax.vmap(lambda e: project_simplex(w - e * g, mask))(etas)
        fc = jax.vmap(f)(cands)
        diff = cands - w
        bound = fw + diff @ g + jnp.sum(diff * diff, axis=1) / (2.0 * etas)
        ok = (fc <= bound) & jnp.isfinite(fc)
        j = jnp.argmax(ok)
        any_ok = jnp.any(ok)
        w_new = jnp.where(any_ok, cands[j], w)
        eta_new = jnp.where(any_ok, etas[j], eta * scales[-1])
        moved = jnp.max(jnp.abs(w_new - w))
        stalled = (fw - fc[j]) <= rtol * jnp.abs(fw)
        done = any_ok & ((moved <= tol) | stalled)
        return i + 1, w_new, eta_new, done

    def cond(carry):
        i, _, _, done = carry
        return (i < iters) & ~done

    init = (jnp.zeros((), jnp.int32), w0, jnp.asarray(1.0, w0.dtype), jnp.asarray(False))
    _, w, _, _ = jax.lax.while_loop(cond, body, init)
    return w


# ------------------------------------------------------------ linear algebra --

def _face_matrix(a, free):
    """a on free×free, the identity elsewhere (so a solve leaves the rest at 0)."""
    eye = jnp.eye(a.shape[0], dtype=a.dtype)
    return jnp.where(free[:, None] & free[None, :], a, eye)


def solve_refined(a, b):
    """x = a⁻¹b by LU with partial pivoting plus one step of iterative
    refinement (same precision: it brings the componentwise backward error to
    ~eps). ``b`` may be (T,) or (T, k)."""
    lu = lu_factor(a)
    x = lu_solve(lu, b)
    return x + lu_solve(lu, b - a @ x)


def _default_cap(t: int, max_iter):
    return 4 * t + 16 if max_iter is None else int(max_iter)


# ------------------------------------------------------ nonnegative QP (LH) --

def nonneg_qp(q, c, mask, max_iter=None) -> Solved:
    """argmin_z ½ zᵀQz + cᵀz  s.t. z ≥ 0 on active coordinates, z = 0 elsewhere,
    for PSD Q: the primal active-set method of Lawson & Hanson (NNLS in Gram
    form, Q = AᵀA, c = −Aᵀb), which ends in finitely many steps.

    Passive set P (z_P > 0), the rest held at 0. Each iteration solves the
    face system Q_PP s_P = −c_P exactly; if s_P > 0 it becomes z and the
    most negative multiplier μ_j = (Qz + c)_j, j ∉ P, enters P (stop when
    none is below −16·eps·(|Q||z| + |c|)_j, the rounding of μ); otherwise z
    moves towards s until a coordinate hits 0, which leaves P. Exact
    arithmetic keeps Q_PP nonsingular (a coordinate enters only with a
    strictly negative multiplier). The problem is solved after the Jacobi
    scaling z = D y, D = diag(Q)^(-1/2) (it leaves z ≥ 0 unchanged and
    removes the conditioning due to gradients of different norms).

    Certificate: the natural residual max_j |min(y_j, μ_j)| of the scaled
    problem (0 iff KKT holds), relative to max(1, max|c_j|·D_j). Iteration
    cap: ``max_iter`` (default 4T + 16)."""
    t = q.shape[0]
    dtype = q.dtype
    on = mask > 0
    eps = jnp.finfo(dtype).eps
    dq = jnp.diagonal(q)
    s = jnp.where(on & (dq > 0), jax.lax.rsqrt(jnp.where(dq > 0, dq, 1.0)), 1.0)
    qs = jnp.where(on[:, None] & on[None, :], q * s[:, None] * s[None, :], 0.0)
    cs = jnp.where(on, c * s, 0.0)
    absq = jnp.abs(qs)
    cap = _default_cap(t, max_iter)
    inf = jnp.asarray(jnp.inf, dtype)

    def body(carry):
        k, y, free, _ = carry
        sol = solve_refined(_face_matrix(qs, free), jnp.where(free, -cs, 0.0))
        sol = jnp.where(free, sol, 0.0)
        feasible = jnp.all(jnp.where(free, sol > 0, True)) & jnp.all(jnp.isfinite(sol))
        # feasible face solution: accept it, let the most negative multiplier in
        mu = qs @ sol + cs
        thr = 16.0 * eps * (absq @ jnp.abs(sol) + jnp.abs(cs))
        cand = on & ~free & (mu < -thr)
        j = jnp.argmin(jnp.where(cand, mu, inf))
        add = jnp.any(cand)
        free_a = free.at[j].set(free[j] | add)
        # infeasible: step towards it until the first coordinate reaches 0
        sol_b = jnp.where(jnp.isfinite(sol), sol, 0.0)
        block = free & (sol_b <= 0)
        ratio = jnp.where(block, safe_div(y, y - sol_b), inf)
        i = jnp.argmin(ratio)
        alpha = jnp.clip(ratio[i], 0.0, 1.0)
        y_b = y + alpha * (sol_b - y)
        free_b = free & (y_b > 0) & (jnp.arange(t) != i)
        y_b = jnp.where(free_b, y_b, 0.0)
        y = jnp.where(feasible, sol, y_b)
        free = jnp.where(feasible, free_a, free_b)
        return k + 1, y, free, feasible & ~add

    def cond(carry):
        k, _, _, done = carry
        return (k < cap) & ~done

    init = (jnp.zeros((), jnp.int32), jnp.zeros((t,), dtype), jnp.zeros((t,), bool),
            jnp.asarray(False))
    k, y, _, _ = jax.lax.while_loop(cond, body, init)
    y = jnp.where(on, jnp.maximum(y, 0.0), 0.0)
    mu = qs @ y + cs
    scale = jnp.maximum(1.0, jnp.max(jnp.abs(cs)))
    cert = jnp.max(jnp.where(on, jnp.abs(jnp.minimum(y, mu)), 0.0)) / scale
    return Solved(y * s, cert, k)


# ---------------------------------------------------------------- problems --

def min_norm_simplex(gram, mask, max_iter=None) -> Solved:
    """argmin_{w ∈ Δ} wᵀGw (MGDA), exactly.

    The min-norm point of the convex hull is the NNLS problem
    u = argmin_{u ≥ 0} ½uᵀ(G + 11ᵀ)u − 1ᵀu, w = u / Σu (Lawson & Hanson's
    least-distance reduction: the KKT conditions (G + 11ᵀ)u − 1 = μ ≥ 0,
    μ ⊥ u become Gw = λ1 + μ/Σu with λ = (1 − Σu)/Σu, those of MGDA), solved
    by :func:`nonneg_qp`. Certificate: the duality (Frank–Wolfe) gap
    wᵀGw − min_t (Gw)_t ≥ f(w) − f*, over the active tasks, in the units of G."""
    on = mask > 0
    ones = mask.astype(gram.dtype)
    g = jnp.where(on[:, None] & on[None, :], gram, 0.0)
    res = nonneg_qp(g + ones[:, None] * ones[None, :], -ones, mask, max_iter)
    w = safe_div(res.x, jnp.sum(res.x))
    w = jnp.where(jnp.any(on) & (jnp.sum(w) > 0), w, uniform(mask))
    return Solved(w, simplex_gap(g, w, mask), res.iterations)


def simplex_gap(gram, w, mask):
    """Frank–Wolfe gap of wᵀGw on the masked simplex: wᵀGw − min_t (Gw)_t (≥ 0 clipped)."""
    gw = gram @ w
    low = jnp.min(jnp.where(mask > 0, gw, jnp.inf))
    gap = jnp.where(jnp.any(mask > 0), w @ gw - low, 0.0)
    return jnp.maximum(gap, 0.0)


def box_qp(gram, lower, mask, max_iter=None) -> Solved:
    """argmin_v ½ vᵀ G v  s.t. v ≥ lower on active coordinates, v = 0 elsewhere,
    exactly: v = lower + z with z = argmin_{z ≥ 0} ½zᵀGz + (G·lower)ᵀz
    (:func:`nonneg_qp`). Certificate: the KKT (natural) residual
    max_t |min(v_t − lower_t, (Gv)_t)| / max_t |lower_t|, in the units of G."""
    on = mask > 0
    g = jnp.where(on[:, None] & on[None, :], gram, 0.0)
    low = jnp.where(on, lower, 0.0)
    res = nonneg_qp(g, g @ low, mask, max_iter)
    v = jnp.where(on, low + res.x, 0.0)
    return Solved(v, box_residual(g, v, low, mask), res.iterations)


def box_residual(gram, v, lower, mask):
    r = jnp.abs(jnp.minimum(v - lower, gram @ v))
    r = jnp.max(jnp.where(mask > 0, r, 0.0))
    return safe_div(r, jnp.max(jnp.abs(jnp.where(mask > 0, lower, 0.0))))


# --------------------------------------------------------------- CAGrad's ---

def _line_min(slope, r, q0, q1, q2, tmax, steps: int = 40):
    """argmin_{t ∈ [0, tmax]} slope·t + r·sqrt(q0 + 2 q1 t + q2 t²) (convex) by
    bisection on the derivative."""
    def deriv(t):
        qq = jnp.maximum(q0 + 2.0 * q1 * t + q2 * t * t, 0.0)
        return slope + r * safe_div(q1 + q2 * t, jnp.sqrt(qq))

    def body(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        pos = deriv(mid) > 0
        return jnp.where(pos, lo, mid), jnp.where(pos, mid, hi)

    lo, hi = jax.lax.fori_loop(0, steps, body, (jnp.zeros_like(tmax), tmax))
    return jnp.where(deriv(tmax) <= 0, tmax, 0.5 * (lo + hi))


def sqrt_qp_simplex(gram, b, r, mask, max_iter=None) -> Solved:
    """argmin_{w ∈ Δ} f(w) = bᵀw + r·sqrt(wᵀGw) (CAGrad's dual), r ≥ 0, by an
    active-set method with exact face solves.

    On the face with support F (w = 0 elsewhere) the stationary point has a
    closed form: with a = G_FF⁻¹1, β = G_FF⁻¹b_F, A = 1ᵀa, B = 1ᵀβ, C = b_Fᵀβ
    and Δ = B² − A(C − r²) > 0, w_F = (λa − β)/√Δ with λ = (B + √Δ)/A (then
    ∇f = b + rGw/‖g_w‖ = λ1 on F and Σw = 1). If it is ≥ 0 it becomes w and the
    most negative multiplier ∇f_j − λ, j ∉ F, enters F; if not, w moves towards
    it until a weight hits 0 (f decreases on the segment by convexity). When
    the face has no stationary point (Δ ≤ 0, f unbounded below on the face's
    affine hull, or G_FF singular), one projected-gradient step with an exact
    line search is taken on the face instead. Starts from the uniform point.

    Certificate: the Frank–Wolfe gap ∇f(w)ᵀw − min_t ∇f(w)_t ≥ f(w) − f*, in
    the units of G."""
    t = gram.shape[0]
    dtype = gram.dtype
    on = mask > 0
    eps = jnp.finfo(dtype).eps
    g = jnp.where(on[:, None] & on[None, :], gram, 0.0)
    b = jnp.where(on, b, 0.0)
    r = jnp.asarray(r, dtype)
    ones = jnp.where(on, 1.0, 0.0).astype(dtype)
    cap = _default_cap(t, max_iter)
    inf = jnp.asarray(jnp.inf, dtype)
    dmax = jnp.max(jnp.diagonal(g))
    thr = 16.0 * eps * jnp.sqrt(jnp.asarray(t, dtype)) * (
        jnp.max(jnp.abs(b)) + r * jnp.sqrt(jnp.maximum(dmax, 0.0)) + jnp.finfo(dtype).tiny)

    def grad_f(w):
        gw = g @ w
        return b + r * safe_div(gw, jnp.sqrt(jnp.maximum(w @ gw, 0.0)))

    def body(carry):
        k, w, free, _ = carry
        fm = free.astype(dtype)
        rhs = jnp.stack([fm, b * fm], axis=1)
        sol = solve_refined(_face_matrix(g, free), rhs) * fm[:, None]
        a1, ab = sol[:, 0], sol[:, 1]
        aa, bb, cc = jnp.sum(a1), jnp.sum(ab), b @ ab
        disc = bb * bb - aa * (cc - r * r)
        sq = jnp.sqrt(jnp.maximum(disc, 0.0))
        lam = safe_div(bb + sq, aa)
        p = safe_div(lam * a1 - ab, sq) * fm
        valid = (disc > 0) & (aa > 0) & (r > 0) & jnp.all(jnp.isfinite(p)) & \
            (jnp.abs(jnp.sum(p) - 1.0) < 1e3 * eps)
        # (1) face optimum feasible: take it, let the most negative multiplier in
        pos = jnp.all(jnp.where(free, p > 0, True))
        w1 = p
        gr1 = grad_f(w1)
        lam1 = safe_div(jnp.sum(gr1 * w1), jnp.sum(w1))
        cand1 = on & ~free & (gr1 - lam1 < -thr)
        j1 = jnp.argmin(jnp.where(cand1, gr1, inf))
        free1 = free.at[j1].set(free[j1] | jnp.any(cand1))
        # (2) face optimum infeasible: step towards it, drop the blocking weight
        block = free & (p <= 0)
        ratio = jnp.where(block, safe_div(w, w - p), inf)
        i2 = jnp.argmin(ratio)
        alpha = jnp.clip(ratio[i2], 0.0, 1.0)
        w2 = w + alpha * (p - w)
        free2 = free & (w2 > 0) & (jnp.arange(t) != i2)
        w2 = jnp.where(free2, w2, 0.0)
        # (3) no face optimum: projected-gradient step on the face, exact line search
        gr = grad_f(w)
        nf = jnp.maximum(jnp.sum(fm), 1.0)
        dirn = -(gr - jnp.sum(gr * fm) / nf) * fm
        stationary = jnp.max(jnp.abs(dirn)) <= thr
        neg = free & (dirn < 0)
        tmax_all = jnp.where(neg, safe_div(w, -dirn), inf)
        i3 = jnp.argmin(tmax_all)
        tmax = jnp.where(jnp.any(neg), tmax_all[i3], 0.0)
        gd = g @ dirn
        step = _line_min(b @ dirn, r, w @ g @ w, w @ gd, dirn @ gd, tmax)
        w3 = w + step * dirn
        hit = step >= tmax
        free3 = free & (w3 > 0) & ~((jnp.arange(t) == i3) & hit)
        w3 = jnp.where(free3, w3, 0.0)
        lam3 = safe_div(jnp.sum(gr * w), jnp.sum(w))
        cand3 = on & ~free & (gr - lam3 < -thr)
        j3 = jnp.argmin(jnp.where(cand3, gr, inf))
        free3s = free.at[j3].set(free[j3] | jnp.any(cand3))

        w_new = jnp.where(valid, jnp.where(pos, w1, w2), jnp.where(stationary, w, w3))
        free_new = jnp.where(valid, jnp.where(pos, free1, free2),
                             jnp.where(stationary, free3s, free3))
        done = jnp.where(valid, pos & ~jnp.any(cand1), stationary & ~jnp.any(cand3))
        w_new = safe_div(w_new, jnp.sum(w_new))
        return k + 1, w_new, free_new, done

    def cond(carry):
        k, _, _, done = carry
        return (k < cap) & ~done

    init = (jnp.zeros((), jnp.int32), uniform(mask).astype(dtype), on, jnp.asarray(False))
    k, w, _, _ = jax.lax.while_loop(cond, body, init)
    gr = grad_f(w)
    low = jnp.min(jnp.where(on, gr, inf))
    cert = jnp.where(jnp.any(on), jnp.maximum(gr @ w - low, 0.0), 0.0)
    return Solved(w, cert, k)


# -------------------------------------------------------------- Nash-MTL's --

def log_barrier_fixed_point(a, mask, max_iter: int = 50) -> Solved:
    """Solve (A w)_t = 1/w_t, w > 0 on active coordinates, for PD A.

    It is the stationarity condition of the strictly convex, self-concordant
    f(w) = ½ wᵀAw − Σ log w_t, minimised by damped Newton (step 1/(1+λ),
    λ the Newton decrement: stays inside w > 0 without a line search and is
    quadratically convergent near the solution), until λ² ≤ 1e-3·T·eps or a
    step changes w by less than 4·eps relative, or after ``max_iter`` steps
    (float32 rounding can keep λ² above the first threshold: the cap then ends
    it). Start: w_t ∝ 1/sqrt(A_tt), scaled to the best multiple. Inactive
    coordinates return 0. Certificate: λ(w)² = ∇fᵀ∇²f⁻¹∇f at the returned w
    (:func:`nash_decrement`), which bounds f(w) − f* (self-concordance, for
    λ ≤ 0.68)."""
    t = a.shape[0]
    on = mask > 0
    eps = jnp.finfo(a.dtype).eps
    eye = jnp.eye(t, dtype=a.dtype)
    a = jnp.where(on[:, None] & on[None, :], a, eye)
    w = 1.0 / jnp.sqrt(jnp.maximum(jnp.diagonal(a), 1e-30))
    w = w * jnp.sqrt(t / jnp.maximum(w @ a @ w, 1e-30))
    stop = 1e-3 * t * eps

    def body(carry):
        k, w, _ = carry
        grad = a @ w - 1.0 / w
        hess = a + jnp.diag(1.0 / (w * w))
        dw = -solve_refined(hess, grad)
        lam2 = jnp.maximum(-jnp.dot(grad, dw), 0.0)
        w_new = w + dw / (1.0 + jnp.sqrt(lam2))
        ok = jnp.all(jnp.isfinite(w_new)) & jnp.all(w_new > 0)
        w_new = jnp.where(ok, w_new, w)
        small = (jnp.max(jnp.abs(w_new - w) / w) <= 4.0 * eps) | (lam2 <= stop)
        return k + 1, w_new, small | ~ok

    def cond(carry):
        k, _, done = carry
        return (k < max_iter) & ~done

    k, w, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), w, jnp.asarray(False)))
    return Solved(jnp.where(on, w, 0.0), nash_decrement(a, w, on), k)


def nash_decrement(a, w, on):
    """λ(w)² = gᵀH⁻¹g for f(w) = ½wᵀAw − Σ log w_t over the active t (g = Aw − 1/w,
    H = A + diag(1/w²)); ≥ f(w) − f* once it is ≤ 0.68² (self-concordance).
    Non-finite (w ≤ 0 on an active task) gives inf."""
    t = a.shape[0]
    eye = jnp.eye(t, dtype=a.dtype)
    a = jnp.where(on[:, None] & on[None, :], a, eye)
    pos = jnp.all(jnp.where(on, w > 0, True))
    wp = jnp.where(on & (w > 0), w, 1.0)
    grad = jnp.where(on, a @ jnp.where(on, wp, 0.0) - 1.0 / wp, 0.0)
    hess = a + jnp.diag(jnp.where(on, 1.0 / (wp * wp), 0.0))
    lam2 = jnp.maximum(grad @ solve_refined(hess, grad), 0.0)
    return jnp.where(pos, lam2, jnp.inf)
