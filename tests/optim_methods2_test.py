"""Wave-2 weights-protocol methods (GLS, STCH, Constant, GradVac, ConFIG,
FairGrad, Krum, MoDo, SDMGrad) against numpy re-derivations written from the
papers' equations on the task gradients themselves (not on G), in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import least_squares

import mtl.optim as mo


def _jac(seed, t, p):
    return np.random.default_rng(seed).normal(size=(t, p))


def _run(agg, calls, t):
    """Feed kwargs dicts to a jitted `weights`; return the weights and final state."""
    fn = jax.jit(agg.weights)
    state = agg.init(t)
    out = []
    for kw in calls:
        w, state = fn(state, **kw)
        out.append(np.asarray(w))
    return out, state


def _np_simplex(v):
    """Euclidean projection onto the simplex (Held et al.'s sort rule)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u)
    k = np.arange(1, len(v) + 1)
    r = np.nonzero(u - (css - 1) / k > 0)[0][-1]
    return np.maximum(v - (css[r] - 1) / (r + 1), 0)


# ------------------------------------------------------------------- GLS ----

def test_gls_is_gradient_of_geometric_mean():
    with jax.enable_x64(True):
        losses = np.array([0.3, 2.0, 1.1, 5.0])
        (w,), _ = _run(mo.gls(), [dict(losses=jnp.asarray(losses))], 4)
        # numerical derivative of (Π L)^(1/T)
        f = lambda l: np.prod(l) ** (1 / 4)  # noqa: E731
        num = [(f(losses + h) - f(losses - h)) / 2e-6 for h in np.eye(4) * 1e-6]
        np.testing.assert_allclose(w, num, rtol=1e-7)
        # absent task: the geometric mean of the present three
        (w,), _ = _run(mo.gls(), [dict(losses=jnp.asarray(losses),
                                       present=jnp.array([1, 0, 1, 1], bool))], 4)
        sub = losses[[0, 2, 3]]
        np.testing.assert_allclose(w[[0, 2, 3]], np.prod(sub) ** (1 / 3) / (3 * sub), rtol=1e-10)
        assert w[1] == 0
        (w,), _ = _run(mo.gls(), [dict(losses=jnp.array([0.7]))], 1)
        np.testing.assert_allclose(w, [1.0])


# ------------------------------------------------------------------ STCH ----

def _stch_reference(loss_seq, mu, warmup, period, eps=1e-20):
    """LibMTL's schedule in calls; weights = the derivative of each phase's objective."""
    out, acc, cnt, z = [], 0.0, 0, None
    start, stop = warmup * period, (warmup + 1) * period
    for k, l in enumerate(loss_seq):
        if k < stop:
            f = lambda x: np.sum(np.log(x + eps))  # noqa: E731
            if k >= start:
                acc, cnt = acc + l, cnt + 1
        else:
            if z is None:
                z = acc / cnt
            n = len(l)
            f = lambda x: n * mu * np.log(np.sum(np.exp(np.log(x / z + eps) / mu)))  # noqa: E731
        # complex-step derivative: exact to rounding, no subtraction error
        out.append(np.array([np.imag(f(l + 1e-30j * e)) / 1e-30 for e in np.eye(len(l))]))
    return out


@pytest.mark.parametrize("mu,warmup,period", [(1.0, 2, 1), (0.3, 1, 2)])
def test_stch_schedule_and_weights(mu, warmup, period):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        seq = [rng.uniform(0.2, 3.0, size=3) for _ in range(8)]
        ws, _ = _run(mo.stch(mu=mu, warmup=warmup, period=period),
                     [dict(losses=jnp.asarray(l)) for l in seq], 3)
        for k, (w, ref) in enumerate(zip(ws, _stch_reference(seq, mu, warmup, period))):
            np.testing.assert_allclose(w, ref, rtol=1e-10, err_msg=f"call {k}")


def test_stch_bad_hparams():
    with pytest.raises(ValueError, match="mu"):
        mo.stch(mu=0.0)
    with pytest.raises(ValueError, match="period"):
        mo.stch(period=0)


# -------------------------------------------------------------- Constant ----

def test_constant_weights_and_length_check():
    agg = mo.get_aggregator("constant", weights=[0.5, 2.0, 1.0])
    (w,), _ = _run(agg, [dict(losses=jnp.ones(3), present=jnp.array([1, 1, 0], bool))], 3)
    np.testing.assert_array_equal(w, [0.5, 2.0, 0.0])
    with pytest.raises(ValueError, match="3 weights given for 4 tasks"):
        agg.init(4)
    (w,), _ = _run(mo.constant(), [dict(losses=jnp.ones(2))], 2)
    np.testing.assert_array_equal(w, [1.0, 1.0])


# --------------------------------------------------------------- GradVac ----

def _gradvac_reference(jac, order, target, beta, on_conflict_only):
    """The paper's loop on explicit vectors; returns (Σ g_i', new target)."""
    t = len(jac)
    target = target.copy()
    out = np.zeros_like(jac[0])
    for i in range(t):
        gi = jac[i].copy()
        for j in order[i]:
            if j == i:
                continue
            gj = jac[j]
            phi = gi @ gj / (np.linalg.norm(gi) * np.linalg.norm(gj) + 1e-8)
            tg = target[i, j]
            if phi < tg:
                gi = gi + np.linalg.norm(gi) * (tg * np.sqrt(1 - phi ** 2)
                                                - phi * np.sqrt(1 - tg ** 2)) / (
                    np.linalg.norm(gj) * np.sqrt(1 - tg ** 2) + 1e-8) * gj
            if phi < tg or not on_conflict_only:
                target[i, j] = (1 - beta) * tg + beta * phi
        out += gi
    return out, target


@pytest.mark.parametrize("seed,t,p,on_conflict_only", [(0, 3, 5, False), (1, 5, 4, True)])
def test_gradvac_matches_vector_loop(seed, t, p, on_conflict_only):
    with jax.enable_x64(True):
        jac = _jac(seed, t, p)
        jac /= np.sqrt(np.mean(np.sum(jac ** 2, 1)))  # the method's 1e-8 acts on normalised G
        agg = mo.gradvac(beta=0.3, ema_on_conflict_only=on_conflict_only)
        fn = jax.jit(agg.weights)
        state, target = agg.init(t), np.zeros((t, t))
        for call in range(4):
            key = jax.random.key(10 * seed + call)
            order = np.asarray(mo.pcgrad_order(key, t))
            w, state = fn(state, gram=jnp.asarray(jac @ jac.T), key=key)
            ref, target = _gradvac_reference(jac, order, target, 0.3, on_conflict_only)
            np.testing.assert_allclose(np.asarray(w) @ jac, ref, rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(np.asarray(state), target, rtol=1e-7, atol=1e-10)


def test_gradvac_first_step_is_pcgrad():
    with jax.enable_x64(True):
        jac = _jac(3, 4, 3)
        key = jax.random.key(5)
        (w,), _ = _run(mo.gradvac(), [dict(gram=jnp.asarray(jac @ jac.T), key=key)], 4)
        (w_pc,), _ = _run(mo.pcgrad(), [dict(gram=jnp.asarray(jac @ jac.T), key=key)], 4)
        np.testing.assert_allclose(np.asarray(w), np.asarray(w_pc), rtol=1e-6)


# ---------------------------------------------------------------- ConFIG ----

def _config_reference(jac, pref):
    units = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    best = np.linalg.pinv(units) @ pref
    unit = best / np.linalg.norm(best)
    return np.sum(jac @ unit) * unit


@pytest.mark.parametrize("seed,t,p", [(0, 3, 6), (1, 5, 5), (2, 4, 10)])
def test_config_matches_pinv_of_unit_rows(seed, t, p):
    with jax.enable_x64(True):
        jac = _jac(seed, t, p) * np.array([1.0, 10.0, 0.1, 3.0, 2.0])[:t, None]
        (w,), _ = _run(mo.config(), [dict(gram=jnp.asarray(jac @ jac.T))], t)
        d = w @ jac
        np.testing.assert_allclose(d, _config_reference(jac, np.ones(t)), rtol=1e-8, atol=1e-10)
        cos = jac @ d / (np.linalg.norm(jac, axis=1) * np.linalg.norm(d))
        np.testing.assert_allclose(cos, cos[0], rtol=1e-8)  # equal angle to every task
        assert cos[0] > 0
        pref = np.arange(1.0, t + 1)
        (w,), _ = _run(mo.config(pref=pref), [dict(gram=jnp.asarray(jac @ jac.T))], t)
        np.testing.assert_allclose(w @ jac, _config_reference(jac, pref), rtol=1e-8, atol=1e-10)


def test_config_absent_task_is_subproblem_and_t1():
    with jax.enable_x64(True):
        jac = _jac(4, 4, 6)
        present = np.array([1, 0, 1, 1], bool)
        (w,), _ = _run(mo.config(), [dict(gram=jnp.asarray(jac @ jac.T),
                                          present=jnp.asarray(present))], 4)
        np.testing.assert_allclose(w @ jac, _config_reference(jac[present], np.ones(3)),
                                   rtol=1e-8)
        (w,), _ = _run(mo.config(), [dict(gram=jnp.asarray(jac[:1] @ jac[:1].T))], 1)
        np.testing.assert_allclose(w, [1.0], rtol=1e-12)


# -------------------------------------------------------------- FairGrad ----

@pytest.mark.parametrize("seed,t,p,alpha", [(0, 3, 6, 0.5), (1, 5, 8, 1.0), (2, 4, 5, 2.0)])
def test_fairgrad_matches_least_squares(seed, t, p, alpha):
    """LibMTL's solve: scipy least_squares of G w − w^(−1/α) from 1/T, on the raw G."""
    with jax.enable_x64(True):
        jac = _jac(seed, t, p) * 3.0
        a = jac @ jac.T
        ref = least_squares(lambda x: a @ x - (1 / x) ** (1 / alpha), np.ones(t) / t,
                            bounds=(0, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15).x
        (w,), _ = _run(mo.fairgrad(alpha=alpha, eps=0.0), [dict(gram=jnp.asarray(a))], t)
        np.testing.assert_allclose(w, ref, rtol=1e-7)
        np.testing.assert_allclose(a @ w, w ** (-1 / alpha), rtol=1e-9)
        # the default eps = 1e-6 (relative to the mean diagonal) moves it little
        (w6,), _ = _run(mo.fairgrad(alpha=alpha), [dict(gram=jnp.asarray(a))], t)
        np.testing.assert_allclose(w6, ref, rtol=1e-4)


def test_fairgrad_t1_closed_form_and_bad_alpha():
    with jax.enable_x64(True):
        (w,), _ = _run(mo.fairgrad(alpha=2.0, eps=0.0), [dict(gram=jnp.array([[4.0]]))], 1)
        np.testing.assert_allclose(w, [4.0 ** (-2 / 3)], rtol=1e-10)
    with pytest.raises(ValueError, match="alpha"):
        mo.fairgrad(alpha=0.0)


# ------------------------------------------------------------------ Krum ----

def _krum_reference(jac, f, m):
    n = len(jac)
    dist = np.linalg.norm(jac[:, None] - jac[None], axis=2)
    scores = [np.sort(np.delete(dist[i], i))[: n - f - 2].sum() for i in range(n)]
    w = np.zeros(n)
    w[np.argsort(scores, kind="stable")[:m]] = 1.0 / m
    return w


@pytest.mark.parametrize("f,m", [(0, 1), (1, 1), (1, 2), (2, 3)])
def test_krum_matches_distance_loop(f, m):
    with jax.enable_x64(True):
        for seed in range(5):
            jac = _jac(seed, 6, 4)
            jac[seed % 6] += 8.0  # an outlier
            (w,), _ = _run(mo.krum(n_byzantine=f, n_selected=m),
                           [dict(gram=jnp.asarray(jac @ jac.T))], 6)
            np.testing.assert_allclose(w, _krum_reference(jac, f, m), atol=1e-12)


def test_krum_absent_tasks_and_fallback():
    with jax.enable_x64(True):
        jac = _jac(7, 5, 3)
        agg = mo.krum(n_byzantine=1)
        present = np.array([1, 1, 0, 1, 1], bool)
        (w,), _ = _run(agg, [dict(gram=jnp.asarray(jac @ jac.T), present=jnp.asarray(present))], 5)
        ref = np.zeros(5)
        ref[present] = _krum_reference(jac[present], 1, 1)
        np.testing.assert_allclose(w, ref, atol=1e-12)
        # 3 present < f + 3 = 4: the mean of the present tasks
        present = np.array([1, 0, 0, 1, 1], bool)
        (w,), _ = _run(agg, [dict(gram=jnp.asarray(jac @ jac.T), present=jnp.asarray(present))], 5)
        np.testing.assert_allclose(w, present / 3.0)
        with pytest.raises(ValueError, match="at least"):
            agg.init(3)


# ------------------------------------------------------------ MoDo, SDMGrad --

def test_modo_matches_projected_steps_on_cross_gramian():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        agg = mo.modo(gamma=0.05, rho=0.1)
        fn = jax.jit(agg.weights)
        state, lam = agg.init(4), np.full(4, 0.25)
        for _ in range(5):
            ja, jb = rng.normal(size=(2, 4, 7))
            g = ja @ jb.T  # double sampling: two independent batches
            w, state = fn(state, gram=jnp.asarray(g))
            lam = _np_simplex(lam - 0.05 * (ja @ (jb.T @ lam) + 0.1 * lam))
            np.testing.assert_allclose(np.asarray(w), lam, rtol=1e-10, atol=1e-12)


def _sdmgrad_reference(w, ga, gb, lamda, niter, lr=5.0, momentum=0.5):
    gg = ga @ gb.T
    scale = np.mean(np.sqrt(np.maximum(np.diag(gg), 0)))
    gg = gg / (scale ** 2 + 1e-8)
    mean_col = gg.mean(1)
    buf = None
    for _ in range(niter):
        grad = gg @ w + lamda * mean_col
        buf = grad if buf is None else momentum * buf + grad
        w = _np_simplex(w - lr * buf)
    return w


def test_sdmgrad_matches_momentum_sgd_loop():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        agg = mo.sdmgrad()
        fn = jax.jit(agg.weights)
        state, w_ref = agg.init(3), np.full(3, 1 / 3)
        for _ in range(3):
            ga, gb, gc = rng.normal(size=(3, 3, 6))
            w, state = fn(state, gram=jnp.asarray(ga @ gb.T))
            w_ref = _sdmgrad_reference(w_ref, ga, gb, 0.3, 20)
            d_ref = (gc.T @ w_ref + 0.3 * gc.mean(0)) / 1.3
            np.testing.assert_allclose(np.asarray(w) @ gc, d_ref, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(np.asarray(state), w_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["modo", "sdmgrad", "gradvac", "stch"])
def test_stateful_methods_t1(name):
    agg = mo.get_aggregator(name)
    w, _ = jax.jit(agg.weights)(agg.init(1), gram=jnp.array([[2.0]]), losses=jnp.array([0.5]),
                                key=jax.random.key(0))
    assert np.isfinite(np.asarray(w)).all() and float(w[0]) > 0
