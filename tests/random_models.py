"""Test helper: nnx modules built abstractly and filled with random values (no init compiles)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def build(fn, seed=0, scale=0.5):
    """``fn()`` builds a module; return it with every variable drawn from N(0, scale²)
    (PRNG-key variables, e.g. a model's own ``nnx.Rngs``, get ``jax.random.key(seed)``)."""
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(fn))
    rng = np.random.default_rng(seed)
    def fill(s):
        if jnp.issubdtype(s.dtype, jax.dtypes.prng_key):
            return jnp.broadcast_to(jax.random.key(seed), s.shape)
        return jnp.asarray((rng.normal(size=s.shape) * scale).astype(s.dtype))

    state = jax.tree.map(fill, state)
    return nnx.merge(graphdef, state)
