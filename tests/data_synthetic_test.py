"""Synthetic generators, checked against numpy re-derivations from bundle.meta."""
import math

import numpy as np
import pytest

from mtl.data.synthetic import (equicorrelation, equicorrelation_sqrt, mmoe_synthetic,
                                multitab_synthetic)


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------- MMoE


@pytest.mark.parametrize("p", [-1.0, -0.3, 0.0, 0.5, 0.9, 1.0])
def test_mmoe_weight_cosine_and_norm(p):
    b = mmoe_synthetic(n_train=5, n_test=5, dim=20, correlation=p, scale=2.5, seed=3)
    u, w = b.meta["u"], b.meta["w"]
    np.testing.assert_allclose(u @ u.T, np.eye(2), atol=1e-12)
    assert _cos(w[0], w[1]) == pytest.approx(p, abs=1e-12)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), [2.5, 2.5], rtol=1e-12)


def test_mmoe_contract():
    b = mmoe_synthetic(n_train=30, n_test=20, dim=7, seed=0)
    assert b.task_names == ["task1", "task2"]
    assert all(t.kind == "regression" and t.dim == 1 for t in b.tasks)
    assert b.input_shape == (7,) and b.input_dtype == "float32"
    batch = b.train[np.arange(30)]
    assert batch["inputs"].shape == (30, 7) and batch["inputs"].dtype == np.float32
    for t in ("task1", "task2"):
        assert batch["labels"][t].shape == (30, 1) and batch["labels"][t].dtype == np.float32
        assert batch["masks"][t].all()
    assert len(b.test) == 20


def test_mmoe_labels_rederived_from_meta():
    b = mmoe_synthetic(n_train=50, n_test=40, dim=9, correlation=0.3, num_sines=4,
                       noise=0.0, scale=1.7, seed=5)
    w, alpha, beta = b.meta["w"], b.meta["alpha"], b.meta["beta"]
    assert alpha.shape == beta.shape == (4,)
    for src in (b.train, b.test):
        x = src.inputs.astype(np.float64)
        for k, t in enumerate(("task1", "task2")):
            expect = np.empty(len(x))
            for j in range(len(x)):  # scalar loop: an independent re-derivation
                z = float(np.dot(w[k], x[j]))
                expect[j] = z + sum(math.sin(a * z + c) for a, c in zip(alpha, beta))
            np.testing.assert_allclose(src.labels[t][:, 0], expect, rtol=1e-5, atol=1e-5)


def test_mmoe_integer_sines_hand_worked():
    """sines='integer': alpha = 1..m, beta = (i-1)^2, whatever the seeds; one label worked by hand."""
    b = mmoe_synthetic(n_train=30, n_test=5, dim=6, correlation=0.5, num_sines=3, noise=0.0, seed=2,
                       sines="integer")
    np.testing.assert_array_equal(b.meta["alpha"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(b.meta["beta"], [0.0, 1.0, 4.0])
    x, w = b.train.inputs[0].astype(np.float64), b.meta["w"][1]
    z = float(np.dot(w, x))
    expect = z + math.sin(z) + math.sin(2 * z + 1) + math.sin(3 * z + 4)
    assert b.train.labels["task2"][0, 0] == pytest.approx(expect, rel=1e-5, abs=1e-5)
    other = mmoe_synthetic(n_train=30, n_test=5, dim=6, correlation=0.5, num_sines=3, seed=2, sine_seed=7,
                           sines="integer")
    np.testing.assert_array_equal(other.meta["alpha"], b.meta["alpha"])
    with pytest.raises(ValueError, match="sines must be 'normal'.*'integer'.*got 'uniform'"):
        mmoe_synthetic(n_train=4, n_test=4, dim=4, sines="uniform")


def test_mmoe_linear_case_recovers_weights_from_data():
    # No sines, no noise: y = Xw, so least squares on the data alone recovers w and p.
    b = mmoe_synthetic(n_train=200, n_test=5, dim=10, correlation=-0.6, num_sines=0,
                       noise=0.0, seed=1)
    x = b.train.inputs.astype(np.float64)
    y = np.concatenate([b.train.labels["task1"], b.train.labels["task2"]], 1)
    w_hat = np.linalg.lstsq(x, y, rcond=None)[0].T
    assert _cos(w_hat[0], w_hat[1]) == pytest.approx(-0.6, abs=1e-5)


def test_mmoe_noise_is_variance():
    b = mmoe_synthetic(n_train=20000, n_test=5, dim=4, num_sines=2, noise=0.04, seed=2)
    from mtl.data.synthetic import mmoe_labels
    clean = mmoe_labels(b.train.inputs, b.meta["w"], b.meta["alpha"], b.meta["beta"])
    resid = np.concatenate([b.train.labels["task1"], b.train.labels["task2"]], 1) - clean
    assert resid.std() == pytest.approx(0.2, rel=0.03)  # std = sqrt(variance 0.04)
    assert abs(np.corrcoef(resid.T)[0, 1]) < 0.05  # independent noise per task


def test_mmoe_determinism_and_seeds():
    a = mmoe_synthetic(n_train=20, n_test=10, dim=5, seed=7)
    b = mmoe_synthetic(n_train=20, n_test=10, dim=5, seed=7)
    c = mmoe_synthetic(n_train=20, n_test=10, dim=5, seed=8)
    np.testing.assert_array_equal(a.train.inputs, b.train.inputs)
    np.testing.assert_array_equal(a.test.labels["task2"], b.test.labels["task2"])
    np.testing.assert_array_equal(a.meta["w"], b.meta["w"])
    assert not np.allclose(a.train.inputs, c.train.inputs)
    assert not np.allclose(a.meta["w"], c.meta["w"])
    # test inputs are fresh (not the train ones) and do not depend on n_train
    assert not np.allclose(a.train.inputs[:10], a.test.inputs)
    d = mmoe_synthetic(n_train=33, n_test=10, dim=5, seed=7)
    np.testing.assert_array_equal(a.test.inputs, d.test.inputs)


def test_mmoe_sine_parameters_fixed_across_seeds():
    # The paper's alpha, beta are "given parameters": by default a seed changes u, the
    # samples and the noise but not the label function (before, each seed drew its own).
    a = mmoe_synthetic(n_train=5, n_test=5, dim=6, seed=0)
    b = mmoe_synthetic(n_train=5, n_test=5, dim=6, seed=1)
    np.testing.assert_array_equal(a.meta["alpha"], b.meta["alpha"])
    np.testing.assert_array_equal(a.meta["beta"], b.meta["beta"])
    assert not np.allclose(a.meta["u"], b.meta["u"])
    c = mmoe_synthetic(n_train=5, n_test=5, dim=6, seed=0, sine_seed=1)
    assert not np.allclose(a.meta["alpha"], c.meta["alpha"])
    np.testing.assert_array_equal(a.meta["u"], c.meta["u"])  # sine_seed leaves u alone


def test_mmoe_sine_seed_none_is_the_per_seed_draw():
    # sine_seed=None: alpha, beta come after u from the seed's parameter stream
    # [seed, 0] -- re-derived here with plain numpy (Gram-Schmidt for u).
    b = mmoe_synthetic(n_train=5, n_test=5, dim=6, num_sines=3, seed=4, sine_seed=None)
    rng = np.random.default_rng([4, 0])
    g = rng.standard_normal((6, 2))
    u1 = g[:, 0] / np.linalg.norm(g[:, 0])
    u2 = g[:, 1] - (g[:, 1] @ u1) * u1
    np.testing.assert_allclose(b.meta["u"], np.stack([u1, u2 / np.linalg.norm(u2)]), atol=1e-12)
    np.testing.assert_array_equal(b.meta["alpha"], rng.standard_normal(3))
    np.testing.assert_array_equal(b.meta["beta"], rng.standard_normal(3))
    assert b.meta["sine_seed"] is None


def test_mmoe_label_correlation_tracks_p():
    # Linear case: corr(y1, y2) = p exactly in the population (w1.w2 = p, |w| = 1).
    for p in (0.2, 0.6, 0.9):
        b = mmoe_synthetic(n_train=5, n_test=40000, dim=8, correlation=p, num_sines=0, noise=0.0, seed=0)
        y = np.concatenate([b.test.labels["task1"], b.test.labels["task2"]], 1)
        assert np.corrcoef(y.T)[0, 1] == pytest.approx(p, abs=0.015)
    # With the default sines: still monotone in p, from ~0 at p=0 to ~1 at p=1 (Figure 3 of the paper).
    corr = []
    for p in (0.0, 0.5, 0.7, 0.9, 1.0):
        b = mmoe_synthetic(n_train=5, n_test=40000, dim=8, correlation=p, seed=0)
        y = np.concatenate([b.test.labels["task1"], b.test.labels["task2"]], 1)
        corr.append(np.corrcoef(y.T)[0, 1])
    assert abs(corr[0]) < 0.03 and corr[-1] > 0.99
    assert all(c1 < c2 - 0.1 for c1, c2 in zip(corr[:-1], corr[1:]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(correlation=1.5), "correlation.*1.5"),
    (dict(correlation=float("nan")), "correlation"),
    (dict(dim=1), "dim.*1"),
    (dict(n_train=0), "n_train.*0"),
    (dict(num_sines=-1), "num_sines"),
    (dict(noise=-0.1), "noise.*-0.1"),
    (dict(scale=0.0), "scale"),
    (dict(seed=-3), "seed.*-3"),
    (dict(sine_seed=-1), "sine_seed.*-1"),
])
def test_mmoe_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mmoe_synthetic(**{"n_train": 4, "n_test": 4, "dim": 4, **kwargs})


# ------------------------------------------------------------------------- MultiTab


@pytest.mark.parametrize("T, rho", [(1, 0.3), (2, -1.0), (3, -0.5), (3, 0.0), (4, 0.5),
                                    (5, 1.0), (6, -0.2)])
def test_multitab_gram_equals_P(T, rho):
    b = multitab_synthetic(num_tasks=T, n_train=4, n_test=4, dim=8, correlation=rho, seed=T)
    W, U, P = b.meta["W"], b.meta["U"], b.meta["P"]
    expect_P = np.full((T, T), rho)
    np.fill_diagonal(expect_P, 1.0)
    np.testing.assert_allclose(P, expect_P, atol=0)
    np.testing.assert_allclose(W @ W.T, expect_P, atol=1e-6)
    np.testing.assert_allclose(U @ U.T, np.eye(T), atol=1e-12)
    assert W.shape == U.shape == (T, 8)


def test_equicorrelation_sqrt_matches_eigendecomposition():
    for T, rho in [(2, 0.4), (4, -1 / 3), (5, 0.9)]:
        P = equicorrelation(T, rho)
        lam, V = np.linalg.eigh(P)
        ref = V @ np.diag(np.sqrt(np.clip(lam, 0, None))) @ V.T
        np.testing.assert_allclose(equicorrelation_sqrt(T, rho), ref, atol=1e-7)


def test_multitab_U_is_gram_schmidt_of_gaussians():
    T, D, seed = 3, 6, 11
    b = multitab_synthetic(num_tasks=T, n_train=4, n_test=4, dim=D, seed=seed)
    g = np.random.default_rng([seed, 0]).standard_normal((D, T)).T  # the T Gaussian vectors
    basis = []
    for v in g:  # classical Gram-Schmidt
        for e in basis:
            v = v - (v @ e) * e
        basis.append(v / np.linalg.norm(v))
    np.testing.assert_allclose(b.meta["U"], np.array(basis), atol=1e-10)


def test_multitab_labels_rederived_from_meta():
    degrees = [1, 2, 4]
    b = multitab_synthetic(num_tasks=3, n_train=25, n_test=15, dim=5, correlation=0.2,
                           degrees=degrees, noise=0.0, seed=4)
    assert b.meta["degrees"] == (1, 2, 4)
    W = b.meta["W"]
    for src in (b.train, b.test):
        x = src.inputs.astype(np.float64)
        for t, d in enumerate(degrees):
            z = x @ W[t]
            expect = z + sum(z ** k for k in range(2, d + 1))
            np.testing.assert_allclose(src.labels[f"t{t}"][:, 0], expect, rtol=1e-5, atol=1e-5)


def test_multitab_noise_is_std_and_contract():
    b = multitab_synthetic(num_tasks=2, n_train=20000, n_test=7, dim=3, noise=0.5, seed=0)
    assert b.task_names == ["t0", "t1"]
    assert all(t.kind == "regression" and t.dim == 1 for t in b.tasks)
    assert b.input_shape == (3,)
    z = b.train.inputs.astype(np.float64) @ b.meta["W"].T
    resid = np.concatenate([b.train.labels["t0"], b.train.labels["t1"]], 1) - z
    assert resid.std() == pytest.approx(0.5, rel=0.03)
    assert b.train.labels["t0"].dtype == np.float32 and len(b.test) == 7


def test_multitab_determinism_and_seeds():
    kw = dict(num_tasks=3, n_train=10, n_test=6, dim=5, degrees=[1, 2, 3])
    a, b, c = multitab_synthetic(seed=1, **kw), multitab_synthetic(seed=1, **kw), \
        multitab_synthetic(seed=2, **kw)
    np.testing.assert_array_equal(a.meta["W"], b.meta["W"])
    np.testing.assert_array_equal(a.train.labels["t2"], b.train.labels["t2"])
    np.testing.assert_array_equal(a.test.inputs, b.test.inputs)
    assert not np.allclose(a.meta["W"], c.meta["W"])
    assert not np.allclose(a.test.inputs, c.test.inputs)
    assert not np.allclose(a.train.inputs[:6], a.test.inputs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_tasks=3, correlation=-0.6), r"correlation.*-0\.5.*-0\.6"),
    (dict(num_tasks=3, correlation=1.01), "correlation"),
    (dict(num_tasks=5, dim=4), "dim.*num_tasks=5.*dim=4"),
    (dict(num_tasks=0), "num_tasks"),
    (dict(num_tasks=2, degrees=[1]), "degrees"),
    (dict(num_tasks=2, degrees=[1, 0]), r"degrees\[1\]"),
    (dict(noise=-1.0), "noise"),
])
def test_multitab_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        multitab_synthetic(**{"n_train": 4, "n_test": 4, "dim": 4, **kwargs})
