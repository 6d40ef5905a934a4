"""Independent float64 references for the Gramian aggregators' problems (scipy and
numpy, none shares code with mtl.optim.solvers), and ill-conditioned test
Gramians. Used by tests/optim_solvers_exact_test.py and
experiments/bench/solver_precision.py."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, nnls


def random_jacobian(seed: int, t: int, cond: float, p: int | None = None) -> np.ndarray:
    """J (t, p) = U diag(s) Vᵀ with Haar-random U, V and singular values
    log-spaced from 1 to 1/sqrt(cond), so G = JJᵀ has condition number cond."""
    rng = np.random.default_rng(seed)
    p = t if p is None else p
    u, _ = np.linalg.qr(rng.normal(size=(t, t)))
    v, _ = np.linalg.qr(rng.normal(size=(p, t)))
    s = np.logspace(0.0, -0.5 * np.log10(cond), t)
    return (u * s[None, :]) @ v.T


def float32_gram(jac: np.ndarray) -> np.ndarray:
    """G = JJᵀ rounded to float32 (what the trainer hands the solvers), back in
    float64: the references solve exactly the problem the solver was given."""
    return (jac @ jac.T).astype(np.float32).astype(np.float64)


def normalised(g: np.ndarray) -> np.ndarray:
    return g / (np.trace(g) / g.shape[0])


def _slsqp_simplex(f, grad, t, starts):
    cons = ({"type": "eq", "fun": lambda w: np.sum(w) - 1.0, "jac": lambda w: np.ones(t)},)
    best = None
    for x0 in starts:
        res = minimize(f, x0, jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * t,
                       constraints=cons, options={"ftol": 1e-16, "maxiter": 2000})
        x = np.clip(res.x, 0.0, None)
        x = x / x.sum()
        if best is None or f(x) < f(best):
            best = x
    return best


def mgda_ref(g: np.ndarray, extra_start=None) -> np.ndarray:
    """argmin_{w∈Δ} wᵀGw by SLSQP (from the uniform point, and from extra_start)."""
    t = g.shape[0]
    starts = [np.full(t, 1.0 / t)] + ([] if extra_start is None else [np.asarray(extra_start)])
    return _slsqp_simplex(lambda w: w @ g @ w, lambda w: 2.0 * g @ w, t, starts)


def cagrad_ref(g: np.ndarray, c: float, extra_start=None) -> np.ndarray:
    """CAGrad's weights 1/T + λw*, w* = argmin_{w∈Δ} wᵀGm + c‖g0‖·sqrt(wᵀGw), by SLSQP."""
    t = g.shape[0]
    m = np.full(t, 1.0 / t)
    b = g @ m
    r = c * np.sqrt(m @ g @ m)

    def f(w):
        return b @ w + r * np.sqrt(max(w @ g @ w, 0.0))

    def grad(w):
        return b + r * (g @ w) / np.sqrt(max(w @ g @ w, 1e-300))

    starts = [m] + ([] if extra_start is None else [np.asarray(extra_start)])
    w = _slsqp_simplex(f, grad, t, starts)
    return m + r / np.sqrt(w @ g @ w) * w, f(w)


def cagrad_dual_objective(g, w_star, c):
    t = g.shape[0]
    m = np.full(t, 1.0 / t)
    return (g @ m) @ w_star + c * np.sqrt(m @ g @ m) * np.sqrt(max(w_star @ g @ w_star, 0.0))


def box_qp_ref(g: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """argmin_{v ≥ lower} ½vᵀGv as NNLS: with G = LLᵀ (float64 Cholesky, a tiny
    ridge if needed), v = lower + z, z = argmin_{z≥0} ‖Lᵀz + Lᵀlower‖ (scipy.optimize.nnls)."""
    t = g.shape[0]
    try:
        chol = np.linalg.cholesky(g)
    except np.linalg.LinAlgError:
        chol = np.linalg.cholesky(g + 1e-14 * np.trace(g) * np.eye(t))
    a = chol.T
    z, _ = nnls(a, -a @ lower, maxiter=50 * t)
    return lower + z


def upgrad_ref(g: np.ndarray) -> np.ndarray:
    t = g.shape[0]
    return sum(box_qp_ref(g, np.eye(t)[i]) for i in range(t)) / t


def dualproj_ref(g: np.ndarray) -> np.ndarray:
    t = g.shape[0]
    return box_qp_ref(g, np.full(t, 1.0 / t))


def nash_ref(g: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Nash-MTL: argmin ½wᵀAw − Σ log w, A = G/‖G‖_F + eps·I, by scipy's trust-exact
    Newton method."""
    t = g.shape[0]
    a = g / np.linalg.norm(g) + eps * np.eye(t)

    def f(w):
        if np.any(w <= 0):
            return np.inf
        return 0.5 * w @ a @ w - np.sum(np.log(w))

    res = minimize(f, np.ones(t), jac=lambda w: a @ w - 1.0 / w,
                   hess=lambda w: a + np.diag(1.0 / w ** 2), method="trust-exact",
                   options={"gtol": 1e-13, "maxiter": 1000})
    return res.x


def imtl_g_ref(g: np.ndarray) -> np.ndarray:
    """IMTL-G: unknowns (α, κ) with (Gα)_t = κ‖g_t‖ for every t and Σα = 1, one
    (T+1)×(T+1) solve in float64."""
    t = g.shape[0]
    n = np.sqrt(np.diag(g))
    m = np.zeros((t + 1, t + 1))
    m[:t, :t] = g
    m[:t, t] = -n
    m[t, :t] = 1.0
    rhs = np.zeros(t + 1)
    rhs[t] = 1.0
    return np.linalg.solve(m, rhs)[:t]


def aligned_ref(g: np.ndarray) -> np.ndarray:
    """Aligned-MTL ('min' scale) for PD G: B = V diag(sqrt(λ_min/λ)) Vᵀ, w = B·1."""
    lam, vec = np.linalg.eigh(g)
    b = (vec * np.sqrt(lam.min() / lam)[None, :]) @ vec.T
    return b @ np.ones(g.shape[0])


def direction_error(g: np.ndarray, w: np.ndarray, w_ref: np.ndarray) -> float:
    """‖Jᵀ(w − w_ref)‖ / ‖Jᵀw_ref‖ from G alone."""
    e = w - w_ref
    return float(np.sqrt(max(e @ g @ e, 0.0) / max(w_ref @ g @ w_ref, 1e-300)))


def min_cosine(g: np.ndarray, w: np.ndarray) -> float:
    """min_t cos(g_t, d) for d = Jᵀw."""
    gw = g @ w
    return float(np.min(gw / (np.sqrt(np.diag(g)) * np.sqrt(max(w @ gw, 1e-300)))))
