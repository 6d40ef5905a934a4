"""A model that defines its own training objective (``train_losses``): every route weights
its per-task losses and adds its auxiliary loss, against jax.grad of the same objective."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl.tasks import losses_from_outputs
from mtl.nn.encoders import build_encoder
from mtl.nn.multitask import MultiTaskModel
from mtl.train.step import Steps
from train_optim_test import TASKS, make_batch, one_device, sgd1


class OwnObjective(MultiTaskModel):
    """Per-task losses doubled; aux = mean squared representation."""

    def train_losses(self, batch, tasks):
        z = self.features(batch["inputs"])
        outs = self.heads_from_features(z)
        return 2.0 * losses_from_outputs(tasks, outs, batch), jnp.mean(z ** 2)


def factory(rngs):
    return OwnObjective(build_encoder("mlp", (6,), rngs=rngs, hidden=(8,)), TASKS, rngs=rngs)


@pytest.mark.parametrize("aggregator", ["ew", "rlw", "mgda"])
def test_routes_use_the_models_own_objective(aggregator):
    rng = np.random.default_rng(0)
    b = make_batch(rng, 16)
    steps = Steps(factory, TASKS, sgd1(), one_device(), optim=dict(aggregator=aggregator))
    state = steps.init()
    p0 = jax.device_get(state.params)
    state, m = steps.step(state, steps.put_batch(b))
    p1 = jax.device_get(state.params)
    w = np.asarray(m["weights"])
    model = steps.model(p0)
    bj = jax.tree.map(jnp.asarray, b)

    def objective(p, ws):
        mm = steps.model(p)
        losses, aux = mm.train_losses(bj, TASKS)
        return jnp.sum(ws * losses) + aux

    ref_losses, ref_aux = model.train_losses(bj, TASKS)
    np.testing.assert_allclose(np.asarray(m["losses"]), np.asarray(ref_losses), rtol=1e-5)
    np.testing.assert_allclose(float(m["aux_loss"]), float(ref_aux), rtol=1e-5)
    # the shared update follows Σ w_t L_t + aux (heads: their own, unweighted, for mgda)
    g = jax.grad(objective)(p0, jnp.asarray(w))
    for a, c, gg in zip(jax.tree.leaves(p0["encoder"]), jax.tree.leaves(p1["encoder"]),
                        jax.tree.leaves(g["encoder"])):
        np.testing.assert_allclose(np.asarray(c) - np.asarray(a), -np.asarray(gg), rtol=2e-3, atol=1e-6)
