"""mtl.scaling: the fits recover known parameters from synthetic points of the law."""
import numpy as np
import pytest

from mtl.scaling import fit_chinchilla, fit_parscale, huber, parscale_law

TRUE = dict(E=1.0, A=5e4, alpha=0.3, k=0.4)


def synthetic(noise=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    N, P = (a.ravel() for a in np.meshgrid([1e5, 2e5, 5e5, 1e6, 2e6], [1, 2, 4, 8]))
    L = parscale_law(N, P, **TRUE) * np.exp(rng.normal(0, noise, N.size))
    return N, P, L


def test_law_closed_form():
    # hand-worked: N = A = 1e4, P = e (ln P = 1), k = 1 -> (1 / 2)^α
    assert parscale_law(1e4, np.e, 0.5, 1e4, 0.5, 1.0) == pytest.approx(0.5 + 0.5 ** 0.5)
    r = np.array([0.0, 5e-4, -2e-3])
    np.testing.assert_allclose(huber(r, 1e-3), [0.0, 0.5 * 2.5e-7, 1e-3 * (2e-3 - 5e-4)])


def test_fit_parscale_recovers_parameters():
    N, P, L = synthetic()
    fit = fit_parscale(np.stack([N, P, L], 1), bootstrap=60)
    p = fit.params
    assert p["k"] == pytest.approx(TRUE["k"], rel=0.05)
    assert p["alpha"] == pytest.approx(TRUE["alpha"], rel=0.05)
    assert p["E"] == pytest.approx(TRUE["E"], rel=0.02)
    assert fit.r2 > 0.999
    lo, hi = fit.k_interval
    assert lo < TRUE["k"] < hi and hi - lo < 0.1
    # residuals are observed - predicted, in input order
    np.testing.assert_allclose(fit.residuals, L - fit.predict(N, P))
    assert np.abs(fit.residuals).max() < 0.01


def test_fit_accepts_a_mapping_and_is_exact_without_noise():
    N, P, L = synthetic(noise=0.0)
    fit = fit_parscale({"N": N, "P": P, "loss": L}, bootstrap=0)
    assert fit.k_interval is None
    np.testing.assert_allclose(fit.predict(N, P), L, rtol=1e-5)
    assert fit.params["k"] == pytest.approx(TRUE["k"], rel=1e-2)


def test_fit_chinchilla_recovers_parameters():
    rng = np.random.default_rng(1)
    N = np.geomspace(1e5, 3e6, 8)
    L = (1.2 + 400.0 / N ** 0.35) * np.exp(rng.normal(0, 1e-3, N.size))
    fit = fit_chinchilla(np.stack([N, L], 1))
    assert fit.params["alpha"] == pytest.approx(0.35, rel=0.1)
    assert fit.params["E"] == pytest.approx(1.2, rel=0.03)
    assert fit.r2 > 0.999
    # the ParScale law at P = 1 is this law with A_chinchilla = A^α
    Np, Pp, Lp = synthetic(noise=0.0)
    m = Pp == 1
    c = fit_chinchilla(np.stack([Np[m], Lp[m]], 1))
    assert c.params["A"] == pytest.approx(TRUE["A"] ** TRUE["alpha"], rel=0.05)


@pytest.mark.parametrize("points,match", [
    ([(1e5, 1, 2.0)] * 4, "at least 5 points"),
    ([(1e5, 1, 2.0), (2e5, 2, 1.9), (3e5, 4, 1.8), (4e5, 8, 1.7), (-1.0, 1, 1.6)], "N must be finite and > 0"),
    ([(1e5, 1, 2.0), (2e5, 2, 1.9), (3e5, 4, 1.8), (4e5, 8, 1.7), (5e5, 0.5, 1.6)], "P must be >= 1"),
    ([(1e5, 1, 2.0), (2e5, 2, 1.9), (3e5, 4, 0.0), (4e5, 8, 1.7), (5e5, 2, 1.6)], "loss must be finite and > 0"),
    ([(1e5, 1, 2.0), (2e5, 1, 1.9), (3e5, 1, 1.8), (4e5, 1, 1.7), (5e5, 1, 1.6)], "2 distinct N and 2 distinct P"),
    ([(1e5, 2.0), (2e5, 1.9)], "triples"),
])
def test_bad_input_is_refused(points, match):
    with pytest.raises(ValueError, match=match):
        fit_parscale(points)


def test_chinchilla_bad_input():
    with pytest.raises(ValueError, match="at least 4 points"):
        fit_chinchilla([(1e5, 2.0), (2e5, 1.9), (3e5, 1.8)])
    with pytest.raises(ValueError, match="loss must be finite"):
        fit_chinchilla([(1e5, 2.0), (2e5, np.nan), (3e5, 1.8), (4e5, 1.7)])


def test_bootstrap_interval_is_honest_where_k_is_poorly_determined():
    """Six noisy points shaped like experiments/parscale.py's first sweep (two N, P up to 8 at the smaller):
    k is barely identified, and each 95% interval must still cover the true k. Refitting every resample
    only from the full fit gave intervals a few percent wide around the estimate that missed it (seeds 0, 2)."""
    true = dict(E=1.0, A=5e4, alpha=0.3, k=0.05)
    N = np.array([1e5] * 4 + [3.4e5] * 2)
    P = np.array([1, 2, 4, 8, 1, 2])
    for seed in range(4):
        rng = np.random.default_rng(seed)
        L = parscale_law(N, P, **true) * np.exp(rng.normal(0, 0.02, N.size))
        lo, hi = fit_parscale(np.stack([N, P, L], 1), bootstrap=60).k_interval
        assert lo < true["k"] < hi, (seed, lo, hi)
