"""Gradient aggregators vs independent references (scipy solves, numpy loops,
closed forms, defining properties), in float64."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

import mtl.optim as mo


def _rand_jac(seed, t, p):
    return np.random.default_rng(seed).normal(size=(t, p))


def _simplex_min(f, t):
    cons = ({"type": "eq", "fun": lambda w: np.sum(w) - 1.0},)
    best = None
    for start in [np.full(t, 1.0 / t)] + [np.eye(t)[i] * 0.9 + 0.1 / t for i in range(t)]:
        res = minimize(f, start, method="SLSQP", bounds=[(0, 1)] * t, constraints=cons,
                       options={"ftol": 1e-14, "maxiter": 500})
        if best is None or res.fun < best.fun:
            best = res
    return best.x


@functools.lru_cache(maxsize=None)
def _agg(name, hp):
    agg = mo.get_aggregator(name, **dict(hp))
    return agg, jax.jit(agg.weights)


def _weights(name, jac, **kw):
    agg, fn = _agg(name, tuple(sorted(kw.pop("hp", {}).items())))
    w, _ = fn(agg.init(jac.shape[0]), gram=jnp.asarray(jac @ jac.T), **kw)
    return np.asarray(w)


@pytest.mark.parametrize("seed,t,p", [(0, 3, 5), (1, 5, 4), (2, 6, 12)])
def test_mgda_matches_slsqp(seed, t, p):
    with jax.enable_x64(True):
        jac = _rand_jac(seed, t, p)
        g = jac @ jac.T
        w = _weights("mgda", jac)
        ref = _simplex_min(lambda v: v @ g @ v, t)
        assert abs(w.sum() - 1) < 1e-9 and (w >= -1e-12).all()
        assert w @ g @ w <= ref @ g @ ref + 1e-8 * np.trace(g)
        if p >= t:  # G positive definite: the minimiser is unique
            np.testing.assert_allclose(w, ref, atol=1e-5)


def test_mgda_dense_grid_three_tasks():
    with jax.enable_x64(True):
        jac = _rand_jac(3, 3, 2)  # 3 gradients in 2-D: singular G, min-norm point often 0
        g = jac @ jac.T
        w = _weights("mgda", jac)
        a = np.linspace(0, 1, 401)
        w1, w2 = np.meshgrid(a, a)
        keep = w1 + w2 <= 1
        grid = np.stack([w1[keep], w2[keep], 1 - w1[keep] - w2[keep]], axis=1)
        vals = np.einsum("ni,ij,nj->n", grid, g, grid)
        assert w @ g @ w <= vals.min() + 1e-9


def test_mgda_two_task_closed_form():
    with jax.enable_x64(True):
        for seed in range(4):
            jac = _rand_jac(seed, 2, 3)
            g1, g2 = jac
            # min over γ of ‖γ g1 + (1−γ) g2‖²: derivative zero, then clip
            gamma = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1)
            np.testing.assert_allclose(_weights("mgda", jac), [gamma, 1 - gamma], atol=1e-12)
        # one gradient inside the other's half-space: the shorter one is the answer
        jac = np.array([[1.0, 0.0], [3.0, 0.1]])
        np.testing.assert_allclose(_weights("mgda", jac), [1.0, 0.0], atol=1e-12)


def test_mgda_l2_normalisation_hand_worked():
    # orthogonal g1 = (1, 0), g2 = (0, 3). Plain MGDA: w ∝ 1/‖g‖² = (9/10, 1/10), so
    # d = (0.9, 0.3): the larger gradient's task gets 9x less weight. With 'l2' the
    # min-norm point of the unit vectors is s = (½, ½), applied to them: w = s/‖g‖ =
    # (½, 1/6) and d = (½, ½), the same contribution from each task.
    with jax.enable_x64(True):
        jac = np.array([[1.0, 0.0], [0.0, 3.0]])
        np.testing.assert_allclose(_weights("mgda", jac), [0.9, 0.1], atol=1e-12)
        w = _weights("mgda", jac, hp={"normalize": "l2"})
        np.testing.assert_allclose(w, [0.5, 1 / 6], atol=1e-12)
        np.testing.assert_allclose(w @ jac, [0.5, 0.5], atol=1e-12)
        # three orthogonal tasks: the Frank–Wolfe path gives the same rule
        jac3 = np.diag([1.0, 2.0, 4.0])
        np.testing.assert_allclose(_weights("mgda", jac3), np.array([16, 4, 1]) / 21, atol=1e-6)
        np.testing.assert_allclose(_weights("mgda", jac3, hp={"normalize": "l2"}),
                                   np.array([1, 1 / 2, 1 / 4]) / 3, atol=1e-6)


@pytest.mark.parametrize("normalize", ["l2", "loss", "loss+"])
@pytest.mark.parametrize("seed,t,p", [(4, 2, 5), (5, 4, 7)])
def test_mgda_normalised_matches_numpy(normalize, seed, t, p):
    # numpy re-derivation (LibMTL's mgda_gn): divide each gradient by n_t, take the
    # min-norm point s of the normalised gradients, the update is Σ s_t g_t/n_t
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        jac = rng.normal(size=(t, p)) * rng.uniform(0.1, 10.0, size=(t, 1))
        losses = rng.uniform(0.01, 5.0, size=t)
        norms = np.linalg.norm(jac, axis=1)
        n = {"l2": norms, "loss": losses, "loss+": losses * norms}[normalize]
        jn = jac / n[:, None]
        gn = jn @ jn.T
        s = _simplex_min(lambda v: v @ gn @ v, t)
        w = _weights("mgda", jac, losses=jnp.asarray(losses), hp={"normalize": normalize})
        np.testing.assert_allclose(w, s / n, atol=1e-5)
        np.testing.assert_allclose(w @ jac, s @ jn, atol=1e-5)
        d = w @ jac  # a common descent direction: no task's gradient conflicts with it
        assert (jac @ d >= -1e-9).all()


def test_mgda_normalize_validation():
    with pytest.raises(ValueError, match="normalize must be one of"):
        mo.mgda(normalize="L2")
    assert mo.mgda(normalize="l2").needs == frozenset({"gram"})
    agg = mo.get_aggregator("mgda", normalize="loss+")
    assert agg.needs == frozenset({"gram", "losses"})
    with pytest.raises(ValueError, match="needs the per-task losses"):
        agg.weights(agg.init(2), gram=jnp.eye(2))
    # a zero gradient: zero normalised gradient, min-norm point 0, zero update (as unnormalised)
    jac = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])
    w = _weights("mgda", jac, hp={"normalize": "l2"})
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w @ jac, 0.0, atol=1e-6)
    # absent tasks get weight 0 and are left out
    w = _weights("mgda", np.diag([1.0, 2.0, 4.0]), present=jnp.array([True, False, True]),
                 hp={"normalize": "l2"})
    np.testing.assert_allclose(w, [0.5, 0.0, 0.125], atol=1e-6)


def _pcgrad_numpy(jac, order):
    out = np.zeros(jac.shape[1])
    for t in range(jac.shape[0]):
        g = jac[t].copy()
        for s in order[t]:
            if s == t:
                continue
            dot = g @ jac[s]
            if dot < 0:
                g = g - dot / (jac[s] @ jac[s]) * jac[s]
        out += g
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pcgrad_matches_numpy_projection_loop(seed):
    with jax.enable_x64(True):
        jac = _rand_jac(seed, 5, 3)  # 5 gradients in 3-D: many conflicts
        key = jax.random.key(seed)
        order = np.asarray(mo.pcgrad_order(key, 5))
        assert all(sorted(row) == list(range(5)) for row in order.tolist())
        w = _weights("pcgrad", jac, key=key)
        np.testing.assert_allclose(w @ jac, _pcgrad_numpy(jac, order), rtol=1e-10, atol=1e-10)
        # same key -> same result; the function of a fixed order agrees too
        np.testing.assert_allclose(_weights("pcgrad", jac, key=key), w)
        w_fixed = np.asarray(mo.pcgrad_weights(jnp.asarray(jac @ jac.T), jnp.asarray(order)))
        np.testing.assert_allclose(w_fixed, w, rtol=1e-10)


def test_pcgrad_no_conflict_is_sum():
    with jax.enable_x64(True):
        jac = np.abs(_rand_jac(4, 3, 4))  # all inner products positive
        np.testing.assert_allclose(_weights("pcgrad", jac, key=jax.random.key(0)), np.ones(3))


@pytest.mark.parametrize("seed,t,p,c", [(0, 3, 6, 0.4), (1, 4, 3, 0.4), (2, 4, 8, 0.8)])
def test_cagrad_matches_direct_solve(seed, t, p, c):
    with jax.enable_x64(True):
        jac = _rand_jac(seed, t, p)
        g0 = jac.mean(0)
        phi_sqrt = c * np.linalg.norm(g0)
        f = lambda w: (w @ jac) @ g0 + phi_sqrt * np.linalg.norm(w @ jac)  # noqa: E731
        wref = _simplex_min(f, t)
        gw = wref @ jac
        d_ref = g0 + phi_sqrt * gw / np.linalg.norm(gw)
        w = _weights("cagrad", jac, hp=dict(c=c))
        np.testing.assert_allclose(w @ jac, d_ref, atol=2e-4 * np.linalg.norm(d_ref))
        # the primal claim: d maximises min_t g_tᵀd over the ball ‖d − g0‖ ≤ c‖g0‖
        rng = np.random.default_rng(seed)
        u = rng.normal(size=(2000, p))
        others = g0 + phi_sqrt * u / np.linalg.norm(u, axis=1, keepdims=True)
        assert (jac @ (w @ jac)).min() >= (others @ jac.T).min(axis=1).max() - 1e-6
        w_r = _weights("cagrad", jac, hp=dict(c=c, rescale=True))
        np.testing.assert_allclose(w_r, w / (1 + c * c), rtol=1e-6)


@pytest.mark.parametrize("seed,t,p", [(0, 2, 3), (1, 4, 6), (2, 5, 5)])
def test_imtl_g_equal_projections(seed, t, p):
    with jax.enable_x64(True):
        jac = _rand_jac(seed, t, p) * np.array([1, 10, 0.1, 3, 0.5])[:t, None]
        w = _weights("imtl_g", jac)
        d = w @ jac
        unit = jac / np.linalg.norm(jac, axis=1, keepdims=True)
        proj = unit @ d
        np.testing.assert_allclose(proj, proj[0], rtol=1e-8)
        assert abs(w.sum() - 1) < 1e-10


@pytest.mark.parametrize("normalize", [True, False])
def test_nash_fixed_point(normalize):
    with jax.enable_x64(True):
        jac = _rand_jac(5, 4, 7)
        g = jac @ jac.T
        eps = 1e-6
        w = _weights("nash_mtl", jac, hp=dict(normalize=normalize, eps=eps))
        gh = (g / np.linalg.norm(g) if normalize else g) + eps * np.eye(4)
        assert (w > 0).all()
        np.testing.assert_allclose((gh @ w) * w, np.ones(4), rtol=1e-8)
        if normalize:  # the authors' normalisation only rescales the solution
            w_raw = _weights("nash_mtl", jac, hp=dict(normalize=False, eps=eps * np.linalg.norm(g)))
            np.testing.assert_allclose(w / np.sqrt(np.linalg.norm(g)), w_raw, rtol=1e-8)


def test_nash_update_every_reuses_weights():
    agg = mo.get_aggregator("nash_mtl", update_every=3)
    state = agg.init(3)
    fn = jax.jit(agg.weights)
    grams = [jnp.asarray(_rand_jac(s, 3, 5) @ _rand_jac(s, 3, 5).T, jnp.float32) for s in range(4)]
    ws = []
    for g in grams:
        w, state = fn(state, gram=g)
        ws.append(np.asarray(w))
    np.testing.assert_allclose(ws[1], ws[0])
    np.testing.assert_allclose(ws[2], ws[0])
    assert not np.allclose(ws[3], ws[0])
    fresh, _ = jax.jit(mo.nash_mtl().weights)(mo.nash_mtl().init(3), gram=grams[3])
    np.testing.assert_allclose(ws[3], fresh, rtol=1e-5)


@pytest.mark.parametrize("seed,t,p", [(0, 3, 5), (1, 4, 4), (2, 5, 9)])
def test_aligned_mtl_condition_number_one(seed, t, p):
    with jax.enable_x64(True):
        jac = _rand_jac(seed, t, p) * np.linspace(0.2, 5, t)[:, None]
        g = jac @ jac.T
        b = np.asarray(mo.aligned_mtl_matrix(jnp.asarray(g)))
        sv = np.linalg.svd(b @ jac, compute_uv=False)
        np.testing.assert_allclose(sv, sv[0], rtol=1e-8)
        # σ_min scaling: the aligned singular values equal J's smallest one
        np.testing.assert_allclose(sv[0], np.linalg.svd(jac, compute_uv=False).min(), rtol=1e-8)
        # independent reference: Ĵ = σ_min U Vᵀ from J's SVD, d = Σ rows of Ĵ
        u, s, vt = np.linalg.svd(jac, full_matrices=False)
        d_ref = (s.min() * u @ vt).sum(0)
        w = _weights("aligned_mtl", jac)
        np.testing.assert_allclose(w @ jac, d_ref, rtol=1e-8, atol=1e-10)


def _project_dual_cone(jac, x):
    """argmin ‖y − x‖² s.t. J y ≥ 0, in the primal, by SLSQP."""
    res = minimize(lambda y: 0.5 * np.sum((y - x) ** 2), x, jac=lambda y: y - x, method="SLSQP",
                   constraints=({"type": "ineq", "fun": lambda y: jac @ y, "jac": lambda y: jac},),
                   options={"ftol": 1e-15, "maxiter": 1000})
    return res.x


@pytest.mark.parametrize("seed,t,p", [(0, 3, 4), (1, 4, 6), (2, 5, 3)])
def test_upgrad_and_dualproj_match_primal_qp(seed, t, p):
    with jax.enable_x64(True):
        jac = _rand_jac(seed, t, p)
        w_up = _weights("upgrad", jac, hp=dict(iters=2000))
        w_dp = _weights("dualproj", jac, hp=dict(iters=2000))
        d_up, d_dp = w_up @ jac, w_dp @ jac
        assert (jac @ d_up >= -1e-8).all() and (jac @ d_dp >= -1e-8).all()
        ref_up = sum(_project_dual_cone(jac, g / t) for g in jac)
        ref_dp = _project_dual_cone(jac, jac.mean(0))
        np.testing.assert_allclose(d_up, ref_up, atol=1e-6)
        np.testing.assert_allclose(d_dp, ref_dp, atol=1e-6)


def test_upgrad_default_iters_nonconflicting():
    """Default iteration count in float32: no task is hurt beyond round-off
    (relative to ‖g‖·‖g0‖; the dual cone may be {0}, then d ≈ 0)."""
    for seed, (t, p) in enumerate([(6, 4), (6, 8), (10, 20)]):
        jac = _rand_jac(seed, t, p).astype(np.float32)
        d = _weights("upgrad", jac) @ jac
        scale = np.linalg.norm(jac, axis=1).max() * np.linalg.norm(jac.mean(0))
        assert (jac @ d).min() > -1e-4 * scale


def test_no_conflict_means_upgrad_is_mean():
    with jax.enable_x64(True):
        jac = np.abs(_rand_jac(7, 4, 5))
        np.testing.assert_allclose(_weights("upgrad", jac), np.full(4, 0.25), atol=1e-10)


@pytest.mark.parametrize("name", ["mgda", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl",
                                  "upgrad", "dualproj"])
def test_absent_tasks_equal_subproblem(name):
    """Weights with a `present` mask = the method run on the present tasks only."""
    with jax.enable_x64(True):
        jac = _rand_jac(11, 4, 6)
        present = np.array([True, False, True, True])
        w_mask = _weights(name, jac, present=jnp.asarray(present))
        w_sub = _weights(name, jac[present])
        assert (w_mask[~present] == 0).all()
        np.testing.assert_allclose(w_mask[present], w_sub, rtol=1e-6, atol=1e-9)


def test_all_methods_scale_invariant_weights():
    with jax.enable_x64(True):
        jac = _rand_jac(12, 4, 6)
        for name in ["mgda", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "dualproj"]:
            np.testing.assert_allclose(_weights(name, jac * 1e3), _weights(name, jac),
                                       rtol=1e-6, err_msg=name)


def test_pcgrad_order_depends_on_key():
    jac = _rand_jac(0, 4, 2).astype(np.float32)
    ws = {tuple(np.round(_weights("pcgrad", jac, key=jax.random.key(k)), 5)) for k in range(8)}
    assert len(ws) > 1
