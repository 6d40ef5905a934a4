"""Every aggregator: jittable, finite on degenerate Gramians, NaN inputs
flagged, absent tasks zeroed; registry errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl.optim as mo

T = 4
NAMES = sorted(mo.AGGREGATORS)


def _jac(seed=0):
    return np.random.default_rng(seed).normal(size=(T, 6)).astype(np.float32)


def _degenerate():
    j = _jac()
    zero_row = j.copy()
    zero_row[2] = 0
    opposite = j.copy()
    opposite[1] = -opposite[0]
    scaled = j * np.array([1e5, 1e-5, 1.0, 1.0], np.float32)[:, None]
    jacs = {
        "all_zero": np.zeros_like(j),
        "identical": np.tile(j[:1], (T, 1)),
        "parallel": np.outer([1.0, 2.0, -3.0, 0.5], j[0]).astype(np.float32),
        "one_zero": zero_row,
        "opposite": opposite,
        "huge_scale": scaled,
        "tiny": j * 1e-18,
    }
    return {k: jnp.asarray(v @ v.T, jnp.float32) for k, v in jacs.items()}


DEGENERATE = _degenerate()
LOSSES = jnp.array([1.0, 2.0, 0.5, 3.0])


@functools.lru_cache(maxsize=None)
def _jitted(name):
    agg = mo.get_aggregator(name)
    return agg, jax.jit(agg.weights)


def _call(name, state=None, **kw):
    agg, fn = _jitted(name)
    kw.setdefault("losses", LOSSES)
    kw.setdefault("key", jax.random.key(0))
    kw.setdefault("present", jnp.ones(T, bool))  # one compiled shape per method
    if "gram" not in kw:
        kw["gram"] = jnp.asarray(_jac() @ _jac().T)
    return fn(agg.init(T) if state is None else state, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_gramians_give_finite_weights(name):
    agg, _ = _jitted(name)
    for label, gram in DEGENERATE.items():
        w, state = _call(name, gram=gram)
        assert np.isfinite(np.asarray(w)).all(), (name, label, w)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)
                   if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)), (name, label)
        # a second call from the new state stays finite too (stateful methods)
        w2, _ = _call(name, state=state, gram=gram)
        assert np.isfinite(np.asarray(w2)).all(), (name, label, "second call")
    if agg.post_step:
        new = agg.update(state, losses=LOSSES * 0.5)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(new))


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_inputs_are_flagged_and_state_kept(name):
    agg, _ = _jitted(name)
    bad = {}
    if "gram" in agg.needs:
        g = jnp.asarray(_jac() @ _jac().T).at[1, 2].set(jnp.nan)
        bad["gram"] = g
    if "losses" in agg.needs:
        bad["losses"] = LOSSES.at[0].set(jnp.inf)
    if not bad:
        pytest.skip(f"{name} reads neither G nor the losses")
    state0 = agg.init(T)
    w, state = _call(name, state=state0, **bad)
    assert np.isnan(np.asarray(w)).all()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", NAMES)
def test_absent_tasks_get_zero_weight(name):
    present = jnp.array([True, False, True, True])
    w, _ = _call(name, present=present)
    w = np.asarray(w)
    assert w[1] == 0 and np.isfinite(w).all() and np.abs(w).sum() > 0
    w, _ = _call(name, present=jnp.zeros(T, bool))
    np.testing.assert_array_equal(np.asarray(w), np.zeros(T))


@pytest.mark.parametrize("name", ["ew", "mgda", "gradnorm"])
def test_jac_instead_of_gram(name):
    j = jnp.asarray(_jac())
    agg = mo.get_aggregator(name)
    w_g, _ = agg.weights(agg.init(T), gram=j @ j.T, losses=LOSSES)
    w_j, _ = agg.weights(agg.init(T), jac={"a": j[:, :2], "b": j[:, 2:].reshape(T, 2, 2)},
                         losses=LOSSES)
    np.testing.assert_allclose(np.asarray(w_j), np.asarray(w_g), rtol=1e-4, atol=1e-6)


def test_missing_inputs_and_bad_shapes_raise():
    with pytest.raises(ValueError, match="Gramian"):
        mo.mgda().weights((), losses=LOSSES)
    with pytest.raises(ValueError, match="losses"):
        mo.dwa().weights(mo.dwa().init(T), gram=jnp.eye(T))
    with pytest.raises(ValueError, match=r"disagree.*gram \(3, 3\), losses \(4,\)"):
        mo.mgda().weights((), gram=jnp.eye(3), losses=LOSSES)
    with pytest.raises(ValueError, match=r"gram must have shape \(4, 4\)"):
        mo.mgda().weights((), gram=jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="number of tasks"):
        mo.ew().weights(())


def test_registry_errors_name_the_fix():
    with pytest.raises(ValueError) as err:
        mo.get_aggregator("cagard")
    assert "cagrad" in str(err.value) and "upgrad" in str(err.value)
    with pytest.raises(TypeError) as err:
        mo.get_aggregator("cagrad", alpha=0.5)
    assert "alpha" in str(err.value) and "c=0.4" in str(err.value)
    assert mo.get_aggregator("Nash-MTL").name == "nash_mtl"
    assert mo.get_aggregator("cagrad").hparams["c"] == 0.4
    assert mo.get_aggregator("dwa").hparams["temperature"] == 2.0
    assert mo.get_aggregator("gradnorm").hparams["alpha"] == 1.5


def test_every_aggregator_declares_its_needs():
    for name in NAMES:
        agg = mo.get_aggregator(name)
        assert agg.needs <= {"gram", "losses", "key"}
        assert agg.post_step == (name == "famo")
