"""The jitted train step: sharded on 8 devices equals single device; EW gradient is the
sum of per-task gradients; non-finite steps apply no update."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import sharding as shd
from mtl.nn import heads
from mtl.nn.encoders import build_encoder
from mtl.nn.multitask import MultiTaskModel
from mtl.tasks import Task
from mtl.train.optimizer import make_optimizer
from mtl.train.step import Steps

TASKS = [Task("cls", heads.Classification(4)), Task("reg", heads.Regression(2))]


def factory_for(encoder, input_shape, **kw):
    def make(rngs):
        return MultiTaskModel(build_encoder(encoder, input_shape, rngs=rngs, **kw), TASKS, rngs=rngs)
    return make


def make_batch(rng, n, input_shape, partial=True):
    return {
        "inputs": rng.normal(size=(n,) + input_shape).astype(np.float32),
        "labels": {"cls": rng.integers(0, 4, n).astype(np.int32), "reg": rng.normal(size=(n, 2)).astype(np.float32)},
        "masks": {"cls": np.ones(n, bool), "reg": (rng.random(n) > 0.3) if partial else np.ones(n, bool)},
    }


def run_steps(factory, axes, devices, batches, lr=0.05):
    # SGD with momentum: Adam would amplify float noise in gradients that are exactly 0 in
    # exact arithmetic (e.g. attention key biases), which is not what this test is about.
    mesh = shd.make_mesh(axes, devices)
    steps = Steps(factory, TASKS, make_optimizer("sgd", lr, 10, schedule="constant"), mesh)
    state = steps.init()
    losses = []
    for b in batches:
        state, m = steps.step(state, steps.put_batch(b))
        losses.append(np.asarray(m["losses"]))
    return steps, state, np.stack(losses)


@pytest.mark.parametrize("encoder,input_shape,kw,axes", [
    ("mlp", (16,), {"hidden": (64, 32)}, {"data": 2, "fsdp": 4}),
    ("cnn", (8, 8, 1), {"widths": (8, 16), "groups": 4}, {"data": 4, "fsdp": 2}),
    ("vit", (8, 8, 1), {"patch": 4, "dim": 32, "depth": 1, "num_heads": 2}, {"data": 2, "fsdp": 2, "tensor": 2}),
])
def test_sharded_step_equals_single_device(encoder, input_shape, kw, axes):
    rng = np.random.default_rng(0)
    batches = [make_batch(rng, 32, input_shape) for _ in range(3)]
    factory = factory_for(encoder, input_shape, **kw)
    _, s1, l1 = run_steps(factory, {"data": 1}, jax.devices()[:1], batches)
    steps8, s8, l8 = run_steps(factory, axes, jax.devices(), batches)
    # the sharded run really is sharded: some parameter is split over fsdp
    specs = [x.sharding.spec for x in jax.tree.leaves(s8.params)]
    assert any("fsdp" in str(s) for s in specs), specs
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.device_get(s1.params)), jax.tree.leaves(jax.device_get(s8.params))):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_step_gradient_is_sum_of_task_gradients():
    """With SGD (lr 1, no momentum) the update equals -(g_cls + g_reg), computed separately."""
    rng = np.random.default_rng(1)
    b = make_batch(rng, 16, (6,))
    factory = factory_for("mlp", (6,), hidden=(8,))
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    steps = Steps(factory, TASKS, make_optimizer("sgd", 1.0, 10, schedule="constant", momentum=0.0), mesh)
    state = steps.init()
    p0 = jax.device_get(state.params)
    model = steps.model(state.params)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def task_loss(params, t):
        m = nnx.merge(graphdef, params, rest)
        out = m(jnp.asarray(b["inputs"]))[TASKS[t].name]
        if t == 0:
            logp = jax.nn.log_softmax(out)
            return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(b["labels"]["cls"])[:, None], 1))
        mask = jnp.asarray(b["masks"]["reg"])
        per = jnp.mean((out - jnp.asarray(b["labels"]["reg"])) ** 2, axis=1)
        return jnp.sum(per * mask) / mask.sum()

    g = jax.tree.map(lambda a, c: a + c, jax.grad(task_loss)(params, 0), jax.grad(task_loss)(params, 1))
    state, _ = steps.step(state, steps.put_batch(b))
    p1 = jax.device_get(state.params)
    for a0, a1, gg in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), jax.tree.leaves(g)):
        np.testing.assert_allclose(a1, a0 - np.asarray(gg), rtol=1e-5, atol=1e-6)


def test_task_with_no_labels_contributes_zero():
    rng = np.random.default_rng(2)
    b = make_batch(rng, 16, (6,))
    b["masks"]["reg"][:] = False
    b["labels"]["reg"][:] = np.nan  # placeholders of missing labels must not matter
    factory = factory_for("mlp", (6,), hidden=(8,))
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    steps = Steps(factory, TASKS, make_optimizer("adam", 1e-2, 10), mesh)
    state, m = steps.step(steps.init(), steps.put_batch(b))
    assert float(m["losses"][1]) == 0.0
    assert bool(m["ok"])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def test_nonfinite_step_applies_no_update_and_records_task():
    rng = np.random.default_rng(3)
    b = make_batch(rng, 16, (6,), partial=False)
    b["labels"]["reg"][3, 0] = np.inf  # a labelled sample with a non-finite label
    factory = factory_for("mlp", (6,), hidden=(8,))
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    steps = Steps(factory, TASKS, make_optimizer("adam", 1e-2, 10), mesh)
    state = steps.init()
    p0 = jax.device_get(state.params)
    state, m = steps.step(state, steps.put_batch(b))
    assert not bool(m["ok"])
    assert int(state.nonfinite_count) == 1
    assert list(np.asarray(state.first_nonfinite)) == [0, 1]  # step 0, task index 1 ("reg")
    for a, c in zip(jax.tree.leaves(p0), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, c)


class WithAux(nnx.Module):
    """A model whose forward_with_aux adds c * sum(w^2) of its first kernel as an auxiliary loss."""

    def __init__(self, rngs, c=0.5):
        self.inner = factory_for("mlp", (6,), hidden=(8,))(rngs)
        self.c = c

    @property
    def tasks(self):
        return self.inner.tasks

    def forward_with_aux(self, x):
        k = self.inner.encoder.layers[0].kernel[...]
        return self.inner(x), {"loss": self.c * jnp.sum(k ** 2), "other": jnp.ones(())}

    def __call__(self, x):
        return self.forward_with_aux(x)[0]


def test_auxiliary_loss_is_added_to_the_objective():
    rng = np.random.default_rng(4)
    b = make_batch(rng, 16, (6,))
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    sgd = lambda: make_optimizer("sgd", 1.0, 10, schedule="constant", momentum=0.0)
    plain = Steps(factory_for("mlp", (6,), hidden=(8,)), TASKS, sgd(), mesh)
    aux = Steps(lambda rngs: WithAux(rngs), TASKS, sgd(), mesh)
    s0 = plain.init()
    k0 = np.asarray(jax.device_get(s0.params["encoder"]["layers"][0]["kernel"][...]))
    s_plain, m_plain = plain.step(s0, plain.put_batch(b))
    s_aux, m_aux = aux.step(aux.init(), aux.put_batch(b))
    np.testing.assert_allclose(float(m_aux["aux_loss"]), 0.5 * np.sum(k0 ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(m_aux["loss"]), float(m_plain["loss"]) + 0.5 * np.sum(k0 ** 2), rtol=1e-5)
    # the extra gradient of 0.5*|k|^2 is k: the aux run's kernel is lower by exactly k0 (lr 1)
    k_plain = np.asarray(jax.device_get(s_plain.params["encoder"]["layers"][0]["kernel"][...]))
    k_aux = np.asarray(jax.device_get(s_aux.params["inner"]["encoder"]["layers"][0]["kernel"][...]))
    np.testing.assert_allclose(k_aux, k_plain - k0, rtol=1e-5, atol=1e-6)
