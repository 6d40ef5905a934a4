"""Small jittable solvers on T×T problems, with fixed iteration counts.

All take a float ``mask`` (T,) of active coordinates; inactive coordinates
are held at 0 and never enter the solution.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl.optim.base import safe_div


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


def min_norm_simplex(gram, mask, iters: int = 250):
    """argmin_{w ∈ Δ} wᵀ G w by pairwise Frank–Wolfe with exact line search.

    Each step moves mass from the active vertex with the largest gradient
    (G w)_a to the vertex with the smallest (G w)_s, by the exact minimiser
    along e_s − e_a clipped to [0, w_a]. Pairwise FW converges linearly on
    the simplex, unlike plain FW's O(1/k). Starts from the uniform point.
    """
    on = mask > 0
    inf = jnp.asarray(jnp.inf, gram.dtype)
    diag = jnp.diagonal(gram)

    def body(_, w):
        g = gram @ w
        s = jnp.argmin(jnp.where(on, g, inf))
        a = jnp.argmax(jnp.where(on & (w > 0), g, -inf))
        gap = g[a] - g[s]
        curv = diag[s] + diag[a] - 2.0 * gram[s, a]
        step = jnp.where(curv > 0, safe_div(gap, curv), w[a])
        step = jnp.clip(step, 0.0, w[a])
        step = jnp.where((gap > 0) & (s != a), step, 0.0)
        return w.at[s].add(step).at[a].add(-step)

    return jax.lax.fori_loop(0, iters, body, uniform(mask))


def simplex_minimize(f, w0, mask, iters: int = 200, n_trials: int = 12, tol: float = 1e-7,
                     rtol: float = 1e-6):
    """Minimise a convex f over the (masked) simplex: projected gradient with a
    backtracking step (the first of η·2^(2−j), j < n_trials, that satisfies the
    sufficient-decrease condition f(w⁺) ≤ f(w) + ∇fᵀ(w⁺−w) + ‖w⁺−w‖²/(2η)),
    all trials evaluated at once so each iteration has a fixed shape; η carries over
    between iterations (so it can also grow by 4× per iteration). Stops after ``iters``
    iterations, or once an accepted step moves w by less than ``tol`` (max-norm) or lowers
    f by at most ``rtol``·|f| (in float32 a flat optimum is otherwise chased in rounding
    noise until ``iters``)."""
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
        # no acceptable step: keep going with the smaller η (not converged)
        return i + 1, w_new, eta_new, done

    def cond(carry):
        i, _, _, done = carry
        return (i < iters) & ~done

    init = (jnp.zeros((), jnp.int32), w0, jnp.asarray(1.0, w0.dtype), jnp.asarray(False))
    _, w, _, _ = jax.lax.while_loop(cond, body, init)
    return w


def box_qp(gram, lower, mask, iters: int = 300):
    """argmin_v ½ vᵀ G v  s.t. v ≥ lower on active coordinates, v = 0 elsewhere.

    Accelerated projected gradient (FISTA, step 1/λ_max(G), with the
    O'Donoghue–Candès gradient restart). Converges for any PSD G."""
    lmax = jnp.max(jnp.linalg.eigvalsh(gram))
    step = safe_div(1.0, lmax)

    def proj(v):
        return jnp.where(mask > 0, jnp.maximum(v, lower), 0.0)

    def body(_, carry):
        x, y, t = carry
        x_new = proj(y - step * (gram @ y))
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        restart = jnp.dot(y - x_new, x_new - x) > 0
        y_new = x_new + ((t - 1.0) / t_new) * (x_new - x)
        y_new = jnp.where(restart, x_new, y_new)
        t_new = jnp.where(restart, 1.0, t_new)
        return x_new, y_new, t_new

    x0 = proj(lower)
    x, _, _ = jax.lax.fori_loop(0, iters, body, (x0, x0, jnp.asarray(1.0, gram.dtype)))
    return x


def log_barrier_fixed_point(a, mask, iters: int = 50):
    """Solve (A w)_t = 1/w_t, w > 0 on active coordinates, for PD A.

    It is the stationarity condition of the strictly convex, self-concordant
    f(w) = ½ wᵀAw − Σ log w_t, minimised by damped Newton (step 1/(1+λ),
    λ the Newton decrement: stays inside w > 0 without a line search and is
    quadratically convergent near the solution). Start: w_t ∝ 1/sqrt(A_tt),
    scaled to the best multiple. Inactive coordinates return 0.
    """
    t = a.shape[0]
    on = mask > 0
    eye = jnp.eye(t, dtype=a.dtype)
    a = jnp.where(on[:, None] & on[None, :], a, eye)
    w = 1.0 / jnp.sqrt(jnp.maximum(jnp.diagonal(a), 1e-30))
    w = w * jnp.sqrt(t / jnp.maximum(w @ a @ w, 1e-30))

    def body(_, w):
        grad = a @ w - 1.0 / w
        hess = a + jnp.diag(1.0 / (w * w))
        dw = -jnp.linalg.solve(hess, grad)
        lam = jnp.sqrt(jnp.maximum(-jnp.dot(grad, dw), 0.0))
        w_new = w + dw / (1.0 + lam)
        return jnp.where(jnp.all(jnp.isfinite(w_new)) & jnp.all(w_new > 0), w_new, w)

    w = jax.lax.fori_loop(0, iters, body, w)
    return jnp.where(on, w, 0.0)
