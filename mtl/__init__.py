"""mtl: multi-task learning and model merging in JAX (flax.nnx).

    import mtl
    task = mtl.Task("digit", mtl.heads.Classification(10))
    model = mtl.nn.MultiTaskModel(mtl.nn.MLP((784,), rngs=rngs), [task], rngs=rngs)
    losses = mtl.train.task_losses(model, batch)            # [T], masked, NaN-free

Subpackages load on first use (importing ``mtl`` itself does no JAX work):
``mtl.nn`` (encoders, heads, MultiTaskModel, MoE), ``mtl.data`` (datasets, batching),
``mtl.train`` (steps, loop, Δm), ``mtl.optim`` (gradient aggregation), ``mtl.merging``,
``mtl.sharding``, ``mtl.checkpoint``, ``mtl.artifact``, ``mtl.config``, ``mtl.distributed``.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = {"nn", "data", "train", "optim", "merging", "sharding", "checkpoint", "artifact", "config",
               "distributed", "losses", "metrics", "tasks", "flops", "cli"}
_ALIASES = {"heads": "mtl.nn.heads", "Task": ("mtl.tasks", "Task"), "TaskSet": ("mtl.tasks", "TaskSet")}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"mtl.{name}")
    if name in _ALIASES:
        target = _ALIASES[name]
        if isinstance(target, tuple):
            return getattr(importlib.import_module(target[0]), target[1])
        return importlib.import_module(target)
    raise AttributeError(f"module 'mtl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES | set(_ALIASES))
