"""Hugging Face checkpoints of ViT, CLIP's vision tower and GPT-2 as mtl encoders, and back.

    enc, src = mtl.io.hf.load_encoder("clip-vit-base-patch32/")      # an mtl ViT with the HF weights
    src = mtl.io.hf.HFSource("ft_sun397/", prefix="encoder/")         # a lazy merge source in mtl names
    mtl.io.hf.export("merged_vit.safetensors", params, "clip_vision", src.encoder_kwargs, "out_hf/")

A *layout* maps the tensors of one Hugging Face architecture (as its
``save_pretrained`` files name them; a leading ``vit.`` / ``vision_model.`` /
``transformer.`` is found and skipped) onto the parameters of an mtl encoder,
tensor by tensor, with the inverse for export:

========================  ==========================  ============================================
layout                    HF ``model_type``           mtl encoder and options
========================  ==========================  ============================================
``vit``                   ``vit``                     ``ViT(act="gelu", norm_eps=1e-12)``
``clip_vision``           ``clip_vision_model``,      ``ViT(act="quick_gelu", norm_eps=1e-5,
                          ``clip`` (vision part)      pre_norm=True)``, patch bias fixed at 0
``gpt2``                  ``gpt2``                    ``ByteTransformer(act="gelu_tanh", norm_eps=1e-5)``
========================  ==========================  ============================================

Separate q/k/v projections are fused into mtl's ``qkv`` ``[D, 3H, Dh]``
kernel; PyTorch ``Linear`` weights are transposed, GPT-2's ``Conv1D`` ones
are not; the patch ``Conv2d`` becomes a dense kernel over row-major
``(i, j, channel)`` patches.  Options the mtl encoders lack (GPT-2 attention
without scaling or with per-layer scaling, cross-attention, activations other
than the three above, a non-square image) raise ``ValueError`` naming the
difference.  Heads (ViT's pooler, CLIP's ``visual_projection``, GPT-2's LM
head) are not part of the encoder: they are listed in ``HFSource.unused``.
"""
from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Mapping

import numpy as np

from mtl.io.hf_layouts import LAYOUTS, Layout, Rule, hf_config, layout_from_config
from mtl.io.safetensors import SafetensorsSource, SafetensorsWriter, TensorSpec

__all__ = ["Layout", "LAYOUTS", "HFSource", "load_encoder", "export", "layout_from_config", "hf_config"]


def _read_config(path: str) -> dict:
    d = path if os.path.isdir(path) else os.path.dirname(path)
    f = os.path.join(d, "config.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{path}: no config.json beside the weights; pass config=... (the head count and"
                                " activation are not in the tensors)")
    with open(f) as fh:
        return json.load(fh)


class HFSource:
    """A Hugging Face checkpoint as a lazy merge source in mtl parameter names.

    ``paths()`` are the encoder's parameter paths (with ``prefix``, e.g.
    ``"encoder/"`` to match a :class:`mtl.nn.MultiTaskModel`); ``load``
    reads and converts the HF tensors of one parameter.  ``layout``,
    ``encoder_name``, ``encoder_kwargs``, ``input_shape`` describe the mtl
    encoder; ``unused`` lists the HF tensors that are not part of it.
    """

    def __init__(self, path: str, *, config: Mapping | None = None, layout: str | None = None, prefix: str = ""):
        self.path = os.path.abspath(path)
        self.config = dict(config) if config is not None else _read_config(self.path)
        self.layout = layout_from_config(self.config, layout)
        self.source = SafetensorsSource(self.path)
        names = self.source.paths()
        hits = [n for n in names if n == self.layout.anchor or n.endswith("." + self.layout.anchor)]
        if not hits:
            raise ValueError(f"{path}: no tensor named like {self.layout.anchor!r}; this is not a"
                             f" {self.layout.name} checkpoint (found e.g. {names[:3]})")
        self.hf_prefix = min(hits, key=len)[: -len(self.layout.anchor)]
        self.prefix = prefix
        self._rules = {prefix + r.ours: r for r in self.layout.rules}
        used = set()
        for r in self.layout.rules:
            for hn in r.hf:
                full = self.hf_prefix + hn
                if full not in self.source:
                    raise ValueError(f"{path}: {self.layout.name} layout expects tensor {full!r}, which is missing")
                used.add(full)
            self._check_shape(r)
        inside = [n for n in names if n.startswith(self.hf_prefix) and n not in used
                  and not any(fnmatch.fnmatchcase(n[len(self.hf_prefix):], g) for g in self.layout.ignored)]
        ignorable = ("pooler.", "visual_projection", "lm_head", "classifier", "text_", "logit_scale")
        unknown = [n for n in inside if not n[len(self.hf_prefix):].startswith(ignorable)]
        if unknown:
            raise ValueError(f"{path}: tensors {unknown[:5]} are not part of the supported {self.layout.name} layout"
                             " (the model differs from the standard architecture)")
        self.unused = [n for n in names if n not in used]

    def _check_shape(self, r: Rule) -> None:
        if not r.hf:
            return
        specs = [self.source.spec(self.hf_prefix + h) for h in r.hf]
        try:
            dummy = r.to_ours(*[np.zeros(s.shape, np.float32) for s in specs])
        except ValueError:
            dummy = None
        if dummy is None or tuple(dummy.shape) != r.shape:
            raise ValueError(f"{self.path}: tensor {self.hf_prefix + r.hf[0]!r} has shape {specs[0].shape},"
                             f" which does not fit {self.prefix + r.ours!r} {r.shape} of the config")

    encoder_name = property(lambda self: self.layout.encoder)
    encoder_kwargs = property(lambda self: self.layout.encoder_kwargs)
    input_shape = property(lambda self: self.layout.input_shape)

    def paths(self) -> list[str]:
        return list(self._rules)

    def spec(self, path: str) -> TensorSpec:
        r = self._rule(path)
        dtype = self.source.spec(self.hf_prefix + r.hf[0]).dtype if r.hf else \
            self.source.spec(self.hf_prefix + self.layout.anchor).dtype
        return TensorSpec(r.shape, dtype)

    def _rule(self, path: str) -> Rule:
        if path not in self._rules:
            raise KeyError(f"{self.path} ({self.layout.name}) has no mtl parameter {path!r}")
        return self._rules[path]

    def load(self, path: str) -> np.ndarray:
        r = self._rule(path)
        if not r.hf:
            return np.zeros(r.shape, self.spec(path).dtype)
        return r.to_ours(*[self.source.load(self.hf_prefix + h) for h in r.hf])


def load_encoder(path: str, *, config: Mapping | None = None, layout: str | None = None, **overrides):
    """``(encoder, source)``: the mtl encoder built for an HF checkpoint, holding its weights.

    ``overrides`` change encoder options that do not affect the weights (e.g.
    ``pool=None``); parameters take the encoder's dtype (float32), whatever
    the file's.
    """
    import jax.numpy as jnp
    from flax import nnx

    from mtl.merging.tree import flatten
    from mtl.nn.encoders import build_encoder

    src = HFSource(path, config=config, layout=layout)
    kwargs = {**src.encoder_kwargs, **overrides}
    with nnx.use_eager_sharding(False):
        enc = nnx.eval_shape(lambda: build_encoder(src.encoder_name, src.input_shape, rngs=nnx.Rngs(0), **kwargs))
    graphdef, state, *rest = nnx.split(enc, nnx.Param, ...)
    pure = nnx.to_pure_dict(state)
    want = flatten(pure)
    if sorted(want) != sorted(src.paths()):
        diff = sorted(set(want) ^ set(src.paths()))
        raise ValueError(f"{path}: the mtl encoder's parameters and the {src.layout.name} layout differ at {diff[:5]}")
    values = {p: jnp.asarray(src.load(p)).astype(want[p].dtype) for p in want}  # e.g. bf16 files -> f32 encoder

    def fill(node, prefix=""):
        return {k: fill(v, f"{prefix}{k}/") if isinstance(v, dict) else values[f"{prefix}{k}"]
                for k, v in node.items()}

    nnx.replace_by_pure_dict(state, fill(pure))
    return nnx.merge(graphdef, state, *rest), src


def export(params, layout: str, encoder_kwargs: Mapping, input_shape, out: str, *, prefix: str = "",
           overwrite: bool = False, max_shard_bytes: int | None = None) -> str:
    """Write mtl encoder parameters as a Hugging Face checkpoint directory (safetensors + config.json).

    ``params``: a source or a flat ``{path: array}`` mapping in mtl names
    (``prefix`` is stripped, e.g. ``"encoder/"``); read one parameter at a time.
    """
    from mtl.merging.sources import as_source

    src = as_source(params)
    cfg = hf_config(layout, encoder_kwargs, input_shape)
    lay = layout_from_config(cfg, layout)
    specs, plan = {}, []
    have = set(src.paths())
    for r in lay.rules:
        if prefix + r.ours not in have:
            raise ValueError(f"export to {layout}: the parameters lack {prefix + r.ours!r}")
        s = src.spec(prefix + r.ours) if hasattr(src, "spec") else np.asarray(src.load(prefix + r.ours))
        if tuple(s.shape) != r.shape:
            raise ValueError(f"export to {layout}: {prefix + r.ours!r} has shape {tuple(s.shape)}, the config"
                             f" implies {r.shape}")
        outs = r.to_hf(np.zeros(r.shape, np.float32))
        for name, a in zip(r.hf, outs):
            specs[name] = TensorSpec(tuple(a.shape), np.dtype(s.dtype))
        plan.append(r)
    with SafetensorsWriter(out, specs, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"},
                           overwrite=overwrite, extra_files={"config.json": json.dumps(cfg, indent=2)}) as writer:
        for r in plan:
            for name, a in zip(r.hf, r.to_hf(np.asarray(src.load(prefix + r.ours)))):
                writer(name, a)
    return writer.out
