"""Methods that need J itself (the JacAggregator protocol): GradDrop, Trimmed
mean, MoCo, DB-MTL, ExcessMTL against numpy re-derivations, plus the
protocol's rules (absent tasks, NaN, T too small, pytrees, registry)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl.optim as mo


def _jac(seed, t, p):
    return np.random.default_rng(seed).normal(size=(t, p))


def _run(agg, calls, t, like=None):
    fn = jax.jit(agg.combine)
    state = agg.init(t, like=like)
    out = []
    for kw in calls:
        d, state = fn(state, **kw)
        out.append(jax.tree.map(np.asarray, d))
    return out, state


def _np_simplex(v):
    u = np.sort(v)[::-1]
    css = np.cumsum(u)
    k = np.arange(1, len(v) + 1)
    r = np.nonzero(u - (css - 1) / k > 0)[0][-1]
    return np.maximum(v - (css[r] - 1) / (r + 1), 0)


# ------------------------------------------------------------- GradDrop -----

def _graddrop_expectation(jac, leak=0.0, act=None, batch_axis=None):
    """E_U[direction] = Σ_t (ℓ + (1−ℓ)(P [G_t > 0] + (1 − P)[G_t < 0])) J_t."""
    g = jac if act is None else jac * np.sign(act)[None]
    if batch_axis is not None:
        g = g.sum(axis=1 + batch_axis, keepdims=True)
    p = 0.5 * (1 + g.sum(0) / (np.abs(g).sum(0) + 1e-7))
    keep_prob = p[None] * (g > 0) + (1 - p)[None] * (g < 0)
    return np.sum((leak + (1 - leak) * keep_prob) * jac, axis=0)


@pytest.mark.parametrize("variant", ["plain", "batch"])
def test_graddrop_mean_over_keys_is_expectation(variant):
    jac = _jac(0, 3, 2 * 5).reshape(3, 2, 5).astype(np.float32)
    act = np.random.default_rng(1).normal(size=(2, 5)).astype(np.float32)
    kw = dict(batch_axis=0) if variant == "batch" else {}
    agg = mo.graddrop(leak=0.2, **kw)
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    extra = dict(activation=jnp.asarray(act)) if variant == "batch" else {}
    f = jax.jit(jax.vmap(lambda k: agg.combine((), jac=jnp.asarray(jac), key=k, **extra)[0]))
    ds = np.asarray(f(keys))
    ref = _graddrop_expectation(jac.astype(np.float64), 0.2, act if extra else None,
                                kw.get("batch_axis"))
    # each element is a sum of 3 Bernoulli-gated terms: 6 standard errors
    se = np.sqrt(np.sum(jac ** 2, 0) / n)
    assert np.all(np.abs(ds.mean(0) - ref) < 6 * se + 1e-6)
    # every draw keeps, per element, exactly the positive or the negative parts
    g = jac * np.sign(act)[None] if extra else jac
    if variant == "batch":
        g = g.sum(1, keepdims=True)
    pos = np.sum(jac * (g > 0), 0)
    neg = np.sum(jac * (g < 0), 0)
    ok = (np.isclose(ds, 0.2 * (pos + neg) + 0.8 * pos, atol=1e-5)
          | np.isclose(ds, 0.2 * (pos + neg) + 0.8 * neg, atol=1e-5))
    assert ok.all()


def test_graddrop_deterministic_cases():
    jac = np.abs(_jac(2, 3, 6))  # all positive: P = 1 > U, everything kept
    (d,), _ = _run(mo.graddrop(), [dict(jac=jnp.asarray(jac), key=jax.random.key(0))], 3)
    np.testing.assert_allclose(d, jac.sum(0), rtol=1e-6)
    jac = _jac(3, 3, 6)
    (d,), _ = _run(mo.graddrop(leak=1.0), [dict(jac=jnp.asarray(jac), key=jax.random.key(0))], 3)
    np.testing.assert_allclose(d, jac.sum(0), rtol=1e-6)
    (d,), _ = _run(mo.graddrop(), [dict(jac=jnp.asarray(jac[:1]), key=jax.random.key(0))], 1)
    np.testing.assert_allclose(d, jac[0], rtol=1e-6)  # T = 1: the gradient itself


# --------------------------------------------------------- Trimmed mean -----

@pytest.mark.parametrize("trim", [0, 1, 2, 5])  # 5 > SELECT_TRIM_UP_TO: the sort path
def test_trimmed_mean_per_coordinate(trim):
    with jax.enable_x64(True):
        t = 2 * trim + 4
        jac = _jac(4, t, 7)
        jac[: t // 2, :3] = np.round(jac[: t // 2, :3])  # ties: several equal entries per coordinate
        jac[:, 3] = 2.5  # a coordinate where every task agrees
        (d,), _ = _run(mo.trimmed_mean(trim=trim), [dict(jac=jnp.asarray(jac))], t)
        ref = np.array([np.mean(np.sort(col)[trim:t - trim]) for col in jac.T])
        np.testing.assert_allclose(d, ref, rtol=1e-12)


def test_trimmed_mean_keeps_the_small_rows_digits_next_to_an_outlier():
    jac = np.array([[1e-3, 2e-3], [2e-3, 3e-3], [3e-3, 1e-3], [1e7, -1e7]], np.float32)
    (d,), _ = _run(mo.trimmed_mean(trim=1), [dict(jac=jnp.asarray(jac))], 4)
    np.testing.assert_allclose(d, [2.5e-3, 1.5e-3], rtol=1e-6)


@jax.enable_x64(True)
def test_trimmed_mean_absent_tasks_and_fallback():
    jac = _jac(5, 5, 4)
    jac[1] = 1e6  # an absent task's row must not enter
    present = np.array([1, 0, 1, 1, 1], bool)
    agg = mo.trimmed_mean(trim=1)
    (d,), _ = _run(agg, [dict(jac=jnp.asarray(jac), present=jnp.asarray(present))], 5)
    ref = np.array([np.mean(np.sort(col)[1:3]) for col in jac[present].T])
    np.testing.assert_allclose(d, ref, rtol=1e-12)
    present = np.array([1, 0, 0, 1, 0], bool)  # 2 < 2·1 + 1: plain mean
    (d,), _ = _run(agg, [dict(jac=jnp.asarray(jac), present=jnp.asarray(present))], 5)
    np.testing.assert_allclose(d, jac[present].mean(0), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 3 tasks"):
        agg.init(2)


# ----------------------------------------------------------------- MoCo -----

def _moco_reference(seq, beta, bs, gamma, gs, rho, normalize, projection):
    t = seq[0][0].shape[0]
    y, lam, out = np.zeros_like(seq[0][0]), np.full(t, 1 / t), []
    for k, (jac, losses) in enumerate(seq, start=1):
        h = jac / (np.linalg.norm(jac, axis=1, keepdims=True) + 1e-8) * losses[:, None] \
            if normalize else jac
        y = y - beta / k ** bs * (y - h)
        z = lam - gamma / k ** gs * (y @ y.T + rho * np.eye(t)) @ lam
        lam = np.exp(z - z.max()) / np.exp(z - z.max()).sum() if projection == "softmax" \
            else _np_simplex(z)
        out.append(y.T @ lam)
    return out


@pytest.mark.parametrize("normalize,projection,rho", [(True, "softmax", 0.0),
                                                      (False, "simplex", 0.1)])
def test_moco_matches_numpy_loop(normalize, projection, rho):
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        seq = [(rng.normal(size=(3, 5)), rng.uniform(0.5, 2, size=3)) for _ in range(4)]
        agg = mo.moco(rho=rho, normalize=normalize, projection=projection)
        ds, _ = _run(agg, [dict(jac=jnp.asarray(j), losses=jnp.asarray(l)) for j, l in seq], 3,
                     like=jnp.zeros(5))
        ref = _moco_reference(seq, 0.5, 0.5, 0.1, 0.5, rho, normalize, projection)
        for d, r in zip(ds, ref):
            np.testing.assert_allclose(d, r, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------- DB-MTL -----

def test_db_mtl_matches_numpy_loop():
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        seq = [(rng.normal(size=(3, 4)) * [[1], [10], [0.1]], rng.uniform(0.1, 3, size=3))
               for _ in range(4)]
        for beta, sigma in [(0.9, 0.0), (0.5, 0.5)]:
            ds, _ = _run(mo.db_mtl(beta=beta, beta_sigma=sigma),
                         [dict(jac=jnp.asarray(j), losses=jnp.asarray(l)) for j, l in seq], 3,
                         like=jnp.zeros(4))
            m = np.zeros((3, 4))
            for k, ((jac, losses), d) in enumerate(zip(seq, ds), start=1):
                g = jac / (losses[:, None] + 1e-8)  # gradient of log(L + 1e-8)
                m = g + beta / k ** sigma * (m - g)
                nrm = np.linalg.norm(m, axis=1)
                ref = (nrm.max() / (nrm + 1e-8)) @ m
                np.testing.assert_allclose(d, ref, rtol=1e-9)
                # every task contributes the same norm
                assert np.allclose(nrm.max() / (nrm + 1e-8) * nrm, nrm.max())


# ------------------------------------------------------------ ExcessMTL -----

def test_excess_mtl_matches_numpy_loop():
    with jax.enable_x64(True):
        rng = np.random.default_rng(8)
        seq = [rng.normal(size=(3, 5)) * [[1], [3], [0.2]] for _ in range(4)]
        ds, state = _run(mo.excess_mtl(robust_step_size=0.5),
                         [dict(jac=jnp.asarray(j)) for j in seq], 3, like=jnp.zeros(5))
        acc, omega, e0 = np.zeros((3, 5)), np.ones(3), None
        for k, (jac, d) in enumerate(zip(seq, ds)):
            acc += jac ** 2
            e = np.array([jac[i] @ (jac[i] / np.sqrt(acc[i] + 1e-7)) for i in range(3)])
            if e0 is None:
                e0 = e
            else:
                omega = omega * np.exp(0.5 * e / e0)
                omega = omega / omega.sum() * 3
            np.testing.assert_allclose(d, omega @ jac, rtol=1e-9)
        np.testing.assert_allclose(np.asarray(state[3]), omega, rtol=1e-9)


# ------------------------------------------------------------ protocol ------

JAC_NAMES = sorted(mo.JAC_AGGREGATORS)


def _call(name, jac, **kw):
    agg = mo.get_aggregator(name)
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), jac)
    state = agg.init(4, like=like)
    d, new = jax.jit(agg.combine)(state, jac=jac, losses=jnp.array([1.0, 2.0, 0.5, 3.0]),
                                  key=jax.random.key(0), **kw)
    return agg, state, d, new


def _tree_jac(seed=0):
    j = _jac(seed, 4, 10).astype(np.float32)
    return {"a": jnp.asarray(j[:, :4]), "b": jnp.asarray(j[:, 4:].reshape(4, 2, 3))}


@pytest.mark.parametrize("name", JAC_NAMES)
def test_jac_protocol_pytree_equals_flat(name):
    jac = _tree_jac()
    _, _, d_tree, _ = _call(name, jac)
    flat = jnp.concatenate([jac["a"], jac["b"].reshape(4, -1)], axis=1)
    _, _, d_flat, _ = _call(name, {"x": flat})
    got = np.concatenate([np.asarray(d_tree["a"]), np.asarray(d_tree["b"]).ravel()])
    if name == "graddrop":  # per-leaf random draws differ; compare the structure only
        assert got.shape == np.asarray(d_flat["x"]).shape and np.isfinite(got).all()
    else:
        np.testing.assert_allclose(got, np.asarray(d_flat["x"]), rtol=1e-5, atol=1e-6)
    assert d_tree["b"].shape == (2, 3)


@pytest.mark.parametrize("name", JAC_NAMES)
def test_jac_protocol_nan_flagged_state_kept(name):
    jac = _tree_jac()
    bad = dict(jac, a=jac["a"].at[2, 1].set(jnp.nan))
    _, state, d, new = _call(name, bad)
    assert all(np.isnan(np.asarray(x)).all() for x in jax.tree.leaves(d))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", JAC_NAMES)
def test_jac_protocol_absent_task_ignored(name):
    """An absent task's row (even NaN) changes nothing: equal to the run without it
    (for the per-task methods, whose state starts the same)."""
    jac = _tree_jac(1)
    present = jnp.array([True, True, False, True])
    poisoned = jax.tree.map(lambda a: a.at[2].set(jnp.nan), jac)
    _, _, d1, _ = _call(name, poisoned, present=present)
    zeroed = jax.tree.map(lambda a: a.at[2].set(0.0), jac)
    _, _, d2, _ = _call(name, zeroed, present=present)
    for a, b in zip(jax.tree.leaves(d1), jax.tree.leaves(d2)):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_jac_protocol_errors_name_the_fix():
    with pytest.raises(ValueError, match="like="):
        mo.moco().init(3)
    with pytest.raises(ValueError, match="leading axis T=3"):
        mo.trimmed_mean().combine((), jac={"a": jnp.ones((3, 2)), "b": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="losses"):
        mo.db_mtl().combine(mo.db_mtl().init(3, like=jnp.zeros(2)), jac=jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="key"):
        mo.graddrop().combine((), jac=jnp.ones((3, 2)))
    assert "jac" in mo.get_aggregator("Trimmed-Mean").needs
    assert all("jac" not in mo.get_aggregator(n).needs for n in mo.AGGREGATORS)
    with pytest.raises(ValueError) as err:
        mo.get_aggregator("mocoo")
    assert "moco" in str(err.value) and "trimmed_mean" in str(err.value)


def _degenerate_jacs():
    j = _jac(9, 4, 6).astype(np.float32)
    zero_row, opposite = j.copy(), j.copy()
    zero_row[2] = 0
    opposite[1] = -opposite[0]
    return {"all_zero": np.zeros_like(j), "identical": np.tile(j[:1], (4, 1)),
            "one_zero": zero_row, "opposite": opposite,
            "huge_scale": j * np.array([1e5, 1e-5, 1.0, 1.0], np.float32)[:, None],
            "tiny": j * 1e-18}


@pytest.mark.parametrize("name", JAC_NAMES)
def test_jac_methods_finite_on_degenerate_jacobians(name):
    agg = mo.get_aggregator(name)
    fn = jax.jit(agg.combine)
    for label, j in _degenerate_jacs().items():
        state = agg.init(4, like=jnp.zeros(6))
        for call in range(2):
            d, state = fn(state, jac=jnp.asarray(j), losses=jnp.array([1.0, 2.0, 0.5, 3.0]),
                          key=jax.random.key(call))
            assert np.isfinite(np.asarray(d)).all(), (name, label, call)
            assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)
                       if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)), (name, label)


@pytest.mark.parametrize("name", ["moco", "db_mtl", "excess_mtl"])
def test_single_task_direction_is_a_positive_multiple_of_the_gradient(name):
    with jax.enable_x64(True):
        g = _jac(10, 1, 5)
        (d1, d2), _ = _run(mo.get_aggregator(name),
                           [dict(jac=jnp.asarray(g), losses=jnp.array([0.7]))] * 2, 1,
                           like=jnp.zeros(5))
        for d in (d1, d2):
            c = d @ g[0] / (g[0] @ g[0])
            assert c > 0
            np.testing.assert_allclose(d, c * g[0], rtol=1e-10)
