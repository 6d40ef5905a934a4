"""The Gramian without the Jacobian (optim.jacobian="gram") against independent references:
G = J Jᵀ with J from jax.jacrev over the shared parameters (MLP, CNN, ViT, a model without
a shared representation), both per-layer contractions against numpy, the update equal to
the kept-Jacobian route's, sharded (8 devices) equal to single device, and the refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import sharding as shd
from mtl.nn import heads
from mtl.nn.build import model_factory
from mtl.tasks import Task, losses_from_outputs
from mtl.train.grad_tools import split_shared
from mtl.train.optimizer import make_optimizer
from mtl.train.routes.batch_gram import layer_gram
from mtl.train.step import Steps

import ml_collections

TASKS = [Task("cls", heads.Classification(4)), Task("reg", heads.Regression(2)), Task("c2", heads.Classification(3))]
ENCODERS = {
    "mlp": ((6,), dict(hidden=(16, 8))),
    "cnn": ((8, 8, 1), dict(widths=(4, 8), groups=2)),
    "vit": ((8, 8, 1), dict(patch=4, dim=16, depth=1, num_heads=2)),
}


def factory(encoder, arch="shared"):
    shape, kw = ENCODERS[encoder]
    cfg = {"arch": arch, "encoder": encoder, "encoder_kwargs": kw}
    if arch == "mmoe":
        cfg = {"arch": "mmoe", "arch_kwargs": {"num_experts": 2, "expert_dim": 8}}
    return model_factory(ml_collections.ConfigDict(cfg), TASKS, shape)


def batch(shape, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.normal(size=(n,) + shape).astype(np.float32),
            "labels": {"cls": rng.integers(0, 4, n).astype(np.int32), "reg": rng.normal(size=(n, 2)).astype(np.float32),
                       "c2": rng.integers(0, 3, n).astype(np.int32)},
            "masks": {"reg": rng.random(n) > 0.3}}


def one_device():
    return shd.make_mesh({"data": 1}, jax.devices()[:1])


def reference_gram(steps, state, b):
    """J over the shared parameters by jax.jacrev of the loss vector, then J Jᵀ (float64)."""
    shared, heads_p, layout = split_shared(state.params)
    from mtl.train.grad_tools import join

    def vec(s):
        model = steps.model(join(s, heads_p, layout), state.rest)
        return losses_from_outputs(TASKS, model(jnp.asarray(b["inputs"])), jax.tree.map(jnp.asarray, b))

    with steps.activate():
        jac = jax.jit(jax.jacrev(vec))(shared)
    rows = np.concatenate([np.asarray(a, np.float64).reshape(len(TASKS), -1) for a in jax.tree.leaves(jac)], 1)
    return rows @ rows.T


def step_once(fac, shape, jacobian, mesh=None, seed=0, aggregator="mgda"):
    steps = Steps(fac, TASKS, make_optimizer("sgd", 0.1, 10, schedule="constant"), mesh or one_device(),
                  optim=dict(aggregator=aggregator, jacobian=jacobian))
    state = steps.init()
    b = batch(shape, seed=seed)
    new, m = steps.step(state, steps.put_batch(b))
    return steps, state, b, jax.device_get(new.params), m


@pytest.mark.parametrize("encoder", ["mlp", "cnn", "vit"])
def test_gram_equals_jacobian_gramian(encoder):
    fac, shape = factory(encoder), ENCODERS[encoder][0]
    steps, state0, b, _, m = step_once(fac, shape, "gram")
    g_ref = reference_gram(steps, steps.init(), b)
    norms = np.sqrt(np.diag(g_ref))
    np.testing.assert_allclose(np.asarray(m["grad_norms"]), norms, rtol=2e-5)
    cos = g_ref / np.outer(norms, norms)
    np.testing.assert_allclose(np.asarray(m["cosines"]), cos, atol=2e-5)


@pytest.mark.parametrize("encoder,arch", [("mlp", "shared"), ("vit", "shared"), ("mlp", "mmoe")])
def test_gram_update_equals_kept_jacobian(encoder, arch):
    """Same weights and the same parameter update as jacobian='keep' (also for a model
    without a shared representation, where every task takes a pass through the whole net)."""
    fac, shape = factory(encoder, arch), ENCODERS[encoder][0]
    _, _, _, p_keep, m_keep = step_once(fac, shape, "keep", aggregator="upgrad")
    _, _, _, p_gram, m_gram = step_once(fac, shape, "gram", aggregator="upgrad")
    np.testing.assert_allclose(np.asarray(m_gram["weights"]), np.asarray(m_keep["weights"]), rtol=1e-4, atol=1e-6)
    for a, c in zip(jax.tree.leaves(p_keep), jax.tree.leaves(p_gram)):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("r,d_in,d_out", [(5, 7, 4), (4, 6, 9)])  # rows > / <= d_out: both batch forms
def test_layer_gram_contractions_match_numpy(r, d_in, d_out):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(r, d_in)).astype(np.float32)
    d = rng.normal(size=(3, r, d_out)).astype(np.float32)
    grads = np.einsum("ri,tro->tio", x.astype(np.float64), d.astype(np.float64)).reshape(3, -1)
    ref = grads @ grads.T
    for method in ("batch", "weight", None):
        np.testing.assert_allclose(np.asarray(layer_gram(jnp.asarray(x), jnp.asarray(d), method)), ref, rtol=1e-5)


def test_sharded_gram_step_equals_single_device():
    fac, shape = factory("mlp"), ENCODERS["mlp"][0]
    b = batch(shape, n=16, seed=4)

    def run_on(mesh):
        steps = Steps(fac, TASKS, make_optimizer("sgd", 0.1, 10, schedule="constant"), mesh,
                      optim=dict(aggregator="mgda", jacobian="gram"))
        state = steps.init()
        for _ in range(2):
            state, m = steps.step(state, steps.put_batch(b))
        return jax.device_get(state.params), np.asarray(m["weights"])

    p1, w1 = run_on(one_device())
    p8, w8 = run_on(shd.make_mesh({"data": 2, "fsdp": 4}, jax.devices()))
    np.testing.assert_allclose(w8, w1, rtol=1e-4, atol=1e-6)
    for a, c in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)


def test_gram_refuses_what_needs_the_jacobian():
    fac = factory("mlp")
    with pytest.raises(ValueError, match="sparse"):
        Steps(fac, TASKS, make_optimizer("sgd", 0.1, 10), one_device(),
              optim=dict(aggregator="mgda", jacobian="gram", sparse_fraction=0.5))
    with pytest.raises(ValueError, match="F-MTL"):
        Steps(fac, TASKS, make_optimizer("sgd", 0.1, 10), one_device(),
              optim=dict(aggregator="mgda", jacobian="gram", fmtl_rho=0.05))
    with pytest.raises(ValueError, match="accum"):
        Steps(fac, TASKS, make_optimizer("sgd", 0.1, 10), one_device(), accum_steps=2,
              optim=dict(aggregator="mgda", jacobian="gram"))
