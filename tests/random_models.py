"""Test helper: nnx modules built abstractly and filled with random values (no init compiles)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def build(fn, seed=0, scale=0.5):
    """``fn()`` builds a module; return it with every variable drawn from N(0, scale²)."""
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(fn))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda s: jnp.asarray((rng.normal(size=s.shape) * scale).astype(s.dtype)), state)
    return nnx.merge(graphdef, state)
