"""Sandwich-rule training inside the train step (mtl.nn.slimmable.training via train_losses):
sharded on 8 devices equals one device; the step's objective equals sandwich_losses
re-derived outside the step; MGDA weighs the labelled losses (closed form for T=2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import sharding as shd
from mtl.nn import heads
from mtl.nn.slimmable import SandwichSampler, SlimmableMultiTask, build_slim_encoder, sandwich_losses
from mtl.tasks import Task
from mtl.train.grad_tools import split_shared
from mtl.train.optimizer import make_optimizer
from mtl.train.step import Steps

TASKS = [Task("cls", heads.Classification(4)), Task("reg", heads.Regression(2))]
SANDWICH = dict(n=3, kd_weight=0.5, cikd_weight=2.0, pool_size=4)


def factory(sandwich=SANDWICH, hidden=(32, 16)):
    def make(rngs):
        enc = build_slim_encoder("mlp", (12,), (0.25, 0.5, 1.0), hidden=hidden, rngs=rngs)
        return SlimmableMultiTask(enc, TASKS, widths=(0.25, 0.5, 1.0), decoder_hidden=(8,),
                                  sandwich=sandwich, rngs=rngs)
    return make


def batch(rng, n=16):
    return {"inputs": rng.normal(size=(n, 12)).astype(np.float32),
            "labels": {"cls": rng.integers(0, 4, n).astype(np.int32),
                       "reg": rng.normal(size=(n, 2)).astype(np.float32)},
            "masks": {"cls": np.ones(n, bool), "reg": np.ones(n, bool)}}


def run(axes, devices, batches, optim=None, lr=0.05, momentum=0.9):
    mesh = shd.make_mesh(axes, devices)
    steps = Steps(factory(), TASKS, make_optimizer("sgd", lr, 10, schedule="constant", momentum=momentum),
                  mesh, optim=optim)
    state = steps.init()
    out = []
    for b in batches:
        state, m = steps.step(state, steps.put_batch(b))
        out.append((np.asarray(m["losses"]), float(m["aux_loss"])))
    return steps, state, out


@pytest.mark.slow
def test_sandwich_step_sharded_equals_single_device():
    rng = np.random.default_rng(0)
    bs = [batch(rng) for _ in range(3)]
    _, s1, o1 = run({"data": 1}, jax.devices()[:1], bs)
    _, s8, o8 = run({"data": 2, "fsdp": 4}, jax.devices(), bs)
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(s8.params))
    for (l1, a1), (l8, a8) in zip(o1, o8):
        np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a8, a1, rtol=1e-5, atol=1e-6)
        assert a1 > 0  # distillation + CIKD really are part of the objective
    for a, b in zip(jax.tree.leaves(jax.device_get(s1.params)), jax.tree.leaves(jax.device_get(s8.params))):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def _reference(steps, state, b):
    """The step's objective re-derived outside it: the group the step picks for its step
    number, sandwich_losses of that group with the same pool and weights."""
    model = steps.model(state.params, state.rest)
    sampler = SandwichSampler((0.25, 0.5, 1.0), ("cls", "reg"), n=3, pool_size=4)
    assert model.train_variants == len(sampler.groups) == 4
    group = steps.variant_of(int(state.step))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def parts(p):
        m = nnx.merge(graphdef, p, rest)
        sl = sandwich_losses(m, jax.tree.map(jnp.asarray, b), TASKS, sampler, group=group)
        return sl.labelled, 0.5 * sl.distill + 2.0 * sl.cikd
    return params, parts


def test_step_objective_is_sandwich_losses():
    rng = np.random.default_rng(1)
    b = batch(rng)
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    steps = Steps(factory(), TASKS, make_optimizer("sgd", 1.0, 10, schedule="constant", momentum=0.0), mesh)
    state = steps.init()
    params, parts = _reference(steps, state, b)
    lab, aux = parts(params)
    g = jax.grad(lambda p: jnp.sum(parts(p)[0]) + parts(p)[1])(params)
    p0 = jax.device_get(params)
    new, m = steps.step(state, steps.put_batch(b))
    np.testing.assert_allclose(np.asarray(m["losses"]), np.asarray(lab), rtol=1e-5)
    np.testing.assert_allclose(float(m["aux_loss"]), float(aux), rtol=1e-5)
    for a, b_, gg in zip(jax.tree.leaves(p0), jax.tree.leaves(jax.device_get(new.params)), jax.tree.leaves(g)):
        np.testing.assert_allclose(a - b_, gg, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optim", [{"aggregator": "mgda"}])
def test_mgda_weighs_the_labelled_losses(optim):
    """MGDA's weights are the closed-form two-task min-norm point of the shared-parameter
    gradients of the labelled losses; the update adds the aux gradient unweighted."""
    rng = np.random.default_rng(2)
    b = batch(rng)
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    steps = Steps(factory(), TASKS, make_optimizer("sgd", 1.0, 10, schedule="constant", momentum=0.0), mesh,
                  optim=optim)
    state = steps.init()
    params, parts = _reference(steps, state, b)
    flat = lambda t: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(split_shared(t)[0])])  # noqa: E731
    g1 = flat(jax.grad(lambda p: parts(p)[0][0])(params))
    g2 = flat(jax.grad(lambda p: parts(p)[0][1])(params))
    w1 = float(jnp.clip(jnp.dot(g2 - g1, g2) / jnp.dot(g1 - g2, g1 - g2), 0.0, 1.0))
    g_aux = flat(jax.grad(lambda p: parts(p)[1])(params))
    before = flat(jax.device_get(params))
    new, m = steps.step(state, steps.put_batch(b))  # donates state (and params)
    np.testing.assert_allclose(np.asarray(m["weights"]), [w1, 1 - w1], atol=2e-3)
    upd = before - flat(jax.device_get(new.params))
    np.testing.assert_allclose(upd, w1 * g1 + (1 - w1) * g2 + g_aux, rtol=2e-3, atol=2e-5)


def test_the_step_picks_every_group_as_a_function_of_seed_and_step():
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    steps = Steps(factory(), TASKS, make_optimizer("sgd", 0.1, 10, schedule="constant"), mesh)
    picks = [steps.variant_of(s) for s in range(200)]
    assert set(picks) == {0, 1, 2, 3} and max(np.bincount(picks)) < 80   # ~uniform over 4 groups
    again = Steps(factory(), TASKS, make_optimizer("sgd", 0.1, 10, schedule="constant"), mesh)
    assert [again.variant_of(s) for s in range(200)] == picks              # resume: same groups
    # the step run with step= equals the step that reads the step number from the state
    rng = np.random.default_rng(3)
    b = steps.put_batch(batch(rng))
    s1, m1 = steps.step(steps.init(), b, step=0)
    s2, m2 = steps.step(steps.init(), b)
    np.testing.assert_array_equal(np.asarray(m1["losses"]), np.asarray(m2["losses"]))
