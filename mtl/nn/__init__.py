"""flax.nnx modules: encoders, heads, hard sharing (MultiTaskModel), task experts (moe),
slimmable networks (slimmable).

Names load on first use (``mtl.tasks`` imports ``mtl.nn.heads``, which must not pull in
the model modules that themselves import ``mtl.tasks``).
"""
import importlib

_EXPORTS = {
    "heads": ("mtl.nn.heads", None), "moe": ("mtl.nn.moe", None),
    "ARCHITECTURES": ("mtl.nn.build", "ARCHITECTURES"), "model_factory": ("mtl.nn.build", "model_factory"),
    "MLP": ("mtl.nn.encoders", "MLP"), "CNN": ("mtl.nn.encoders", "CNN"), "ViT": ("mtl.nn.encoders", "ViT"),
    "ByteTransformer": ("mtl.nn.encoders", "ByteTransformer"), "ENCODERS": ("mtl.nn.encoders", "ENCODERS"),
    "build_encoder": ("mtl.nn.encoders", "build_encoder"),
    "Attention": ("mtl.nn.layers", "Attention"), "MLPBlock": ("mtl.nn.layers", "MLPBlock"),
    "TransformerBlock": ("mtl.nn.layers", "TransformerBlock"),
    "MultiTaskModel": ("mtl.nn.multitask", "MultiTaskModel"),
    "slimmable": ("mtl.nn.slimmable", None),
    "SlimmableMultiTask": ("mtl.nn.slimmable", "SlimmableMultiTask"), "WidthConfig": ("mtl.nn.slimmable", "WidthConfig"),
    "parscale": ("mtl.nn.parscale", None), "ParScale": ("mtl.nn.parscale", "ParScale"),
}


def __getattr__(name):
    if name in _EXPORTS:
        mod, attr = _EXPORTS[name]
        m = importlib.import_module(mod)
        return m if attr is None else getattr(m, attr)
    raise AttributeError(f"module 'mtl.nn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
