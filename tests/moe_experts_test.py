"""Stacked experts vs numpy: all experts on one input, and per-expert (dispatched) inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl.nn.moe.experts import LNSExperts, MLPExperts, build_experts
from random_models import build




def np_expert(ex, e, x):
    p = lambda v: np.asarray(v[...])[e]
    if isinstance(ex, MLPExperts):
        h = np.maximum(x @ p(ex.w_up) + p(ex.b_up), 0)
        return h @ p(ex.w_down) + p(ex.b_down)
    h = x @ p(ex.w) + p(ex.b)
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + ex.eps) * p(ex.scale) + p(ex.shift)
    return h / (1 + np.exp(-h))


@pytest.mark.parametrize("kind", ["mlp", "lns"])
def test_experts_dense_and_per_expert_match_numpy(kind):
    kw = {"hidden_features": 5, "activation": "relu"} if kind == "mlp" else {}
    ex = build(lambda: build_experts(kind, 3, 4, 2, rngs=nnx.Rngs(0), **kw))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    y = nnx.jit(lambda m, x: m(x))(ex, jnp.asarray(x))
    assert y.shape == (2, 3, 3, 2)
    for e in range(3):
        np.testing.assert_allclose(y[..., e, :], np_expert(ex, e, x), rtol=1e-4, atol=1e-5)
    xd = rng.normal(size=(3, 6, 4)).astype(np.float32)                 # [E, capacity, d]
    yd = nnx.jit(lambda m, x: m.per_expert(x))(ex, jnp.asarray(xd))
    for e in range(3):
        np.testing.assert_allclose(yd[e], np_expert(ex, e, xd[e]), rtol=1e-4, atol=1e-5)


def test_expert_input_errors():
    ex = build(lambda: LNSExperts(3, 4, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="4 features"):
        ex(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"\[E=3, N, 4\]"):
        ex.per_expert(jnp.ones((2, 6, 4)))
    with pytest.raises(ValueError, match="valid kinds: lns, mlp"):
        build_experts("moe", 3, 4, 2, rngs=nnx.Rngs(0))
