"""Methods that combine J itself (GradDrop, Trimmed mean, MoCo, DB-MTL, ExcessMTL) inside the
train step: the direction lands on the shared parameters (or, for GradDrop on the
representation, is pulled back through the encoder), heads get their own gradients, state
advances, and what cannot work is refused. References: per-task gradients one task at a time."""
import jax
import numpy as np
import pytest

from mtl.train.step import Steps
from train_optim_test import TASKS, factory, flat_delta, make_batch, one_device, reference_grads, sgd1


@pytest.mark.parametrize("aggregator,hparams,grad_on,scale", [
    ("trimmed_mean", dict(trim=0), "params", 0.5),      # no trimming: the mean of the rows
    ("graddrop", dict(leak=1.0), "params", 1.0),        # full leak: nothing dropped, the sum
    ("graddrop", dict(leak=1.0), "representation", 1.0),
])
def test_direction_is_the_shared_update(aggregator, hparams, grad_on, scale):
    rng = np.random.default_rng(0)
    b = make_batch(rng, 16)
    steps = Steps(factory, TASKS, sgd1(), one_device(),
                  optim=dict(aggregator=aggregator, hparams=hparams, grad_on=grad_on))
    state = steps.init()
    enc, hd, _, enc_grad = reference_grads(steps, state, b)
    p0 = jax.device_get(state.params)
    state, m = steps.step(state, steps.put_batch(b))
    p1 = jax.device_get(state.params)
    np.testing.assert_allclose(flat_delta(p0, p1, "encoder"), -enc_grad(np.full(2, scale)), rtol=2e-3, atol=1e-6)
    for t, name in enumerate(["cls", "reg"]):  # plain heads: each its own gradient
        for a, c, g in zip(jax.tree.leaves(p0["heads"][name]), jax.tree.leaves(p1["heads"][name]),
                           jax.tree.leaves(hd[t][name])):
            np.testing.assert_allclose(np.asarray(c) - np.asarray(a), -g, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(np.asarray(m["weights"]), [1.0, 1.0])
    assert bool(m["ok"]) and "cosines" in m


@pytest.mark.parametrize("aggregator", ["moco", "db_mtl", "excess_mtl"])
def test_stateful_methods_train_and_keep_state(aggregator):
    rng = np.random.default_rng(1)
    steps = Steps(factory, TASKS, sgd1(), one_device(), optim=dict(aggregator=aggregator))
    state = steps.init()
    before = [np.asarray(a).copy() for a in jax.tree.leaves(state.agg_state)]
    for _ in range(2):
        state, m = steps.step(state, steps.put_batch(make_batch(rng, 16)))
        assert bool(m["ok"])
    after = jax.tree.leaves(jax.device_get(state.agg_state))
    assert any(not np.array_equal(a, c) for a, c in zip(before, after))


def test_jac_methods_refuse_what_they_cannot_use():
    with pytest.raises(ValueError, match="jacobian='keep'"):
        Steps(factory, TASKS, sgd1(), one_device(), optim=dict(aggregator="moco", jacobian="stream"))
    with pytest.raises(ValueError, match="grad_on='params'"):
        Steps(factory, TASKS, sgd1(), one_device(), optim=dict(aggregator="moco", grad_on="representation"))
