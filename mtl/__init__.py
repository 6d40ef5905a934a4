"""mtl: multi-task learning and model merging in JAX."""
__version__ = "0.1.0"
