"""Hugging Face architectures as tensor-by-tensor maps onto mtl encoders (see :mod:`mtl.io.hf`).

A :class:`Layout` is built from an HF ``config.json`` dict: the mtl encoder
name and options, and one :class:`Rule` per mtl parameter (which HF tensors,
how to convert them, and the inverse).  :func:`hf_config` is the inverse of
the config parsing, for export.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["Rule", "Layout", "LAYOUTS", "layout_from_config", "hf_config", "vit_layout", "clip_vision_layout",
           "gpt2_layout"]

# HF activation names <-> mtl.nn.layers.ACTIVATIONS
_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "quick_gelu": "quick_gelu"}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One mtl parameter from ``hf`` tensors (``to_ours``) and back (``to_hf`` returns one array per name)."""

    ours: str
    hf: tuple[str, ...]
    to_ours: Callable
    to_hf: Callable
    shape: tuple  # the mtl shape


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    encoder: str                     # name in mtl.nn.encoders.ENCODERS
    kwargs: dict                     # encoder options, with input_shape
    rules: tuple[Rule, ...]
    ignored: tuple[str, ...] = ()    # HF names (globs, after the prefix) that are not part of the encoder
    anchor: str = ""                 # a tensor name that locates the prefix

    @property
    def input_shape(self) -> tuple:
        return tuple(self.kwargs["input_shape"])

    @property
    def encoder_kwargs(self) -> dict:
        return {k: v for k, v in self.kwargs.items() if k != "input_shape"}


def _c(x):
    return np.ascontiguousarray(x)


def _copy(ours, hf, shape):
    return Rule(ours, (hf,), lambda a: _c(a), lambda x: (_c(x),), shape)


def _linear(ours, hf, shape):  # torch Linear [out, in] <-> kernel [in, out]
    return Rule(ours, (hf,), lambda w: _c(w.T), lambda k: (_c(k.T),), shape)


def _zero(ours, shape, why):
    def to_hf(x):
        if np.any(np.asarray(x, np.float32) != 0):
            raise ValueError(f"parameter {ours!r} is not zero, but {why}: this model cannot be exported to that layout")
        return ()
    return Rule(ours, (), lambda: None, to_hf, shape)


def _qkv_linear(ours, q, k, v, d, h):  # three torch Linears -> [D, 3H, Dh]
    def to_ours(wq, wk, wv):
        return _c(np.concatenate([wq.T, wk.T, wv.T], axis=1).reshape(d, 3 * h, d // h))

    def to_hf(kern):
        return tuple(_c(p.T) for p in np.split(kern.reshape(d, 3 * d), 3, axis=1))
    return Rule(ours, (q, k, v), to_ours, to_hf, (d, 3 * h, d // h))


def _qkv_bias(ours, q, k, v, d, h):
    return Rule(ours, (q, k, v), lambda bq, bk, bv: _c(np.concatenate([bq, bk, bv]).reshape(3 * h, d // h)),
                lambda b: tuple(_c(p) for p in np.split(b.reshape(3 * d), 3)), (3 * h, d // h))


def _out_linear(ours, hf, d, h):  # torch Linear [D, H*Dh] -> [H, Dh, D]
    return Rule(ours, (hf,), lambda w: _c(w.T.reshape(h, d // h, d)), lambda k: (_c(k.reshape(d, d).T),),
                (h, d // h, d))


def _patch(ours, hf, p, c, d):  # Conv2d [D, C, p, p] -> dense [(i, j, c), D] (mtl.nn.encoders.patchify order)
    return Rule(ours, (hf,), lambda w: _c(w.transpose(2, 3, 1, 0).reshape(p * p * c, d)),
                lambda k: (_c(k.reshape(p, p, c, d).transpose(3, 2, 0, 1)),), (p * p * c, d))


def _reshape(ours, hf, shape, hf_shape):
    return Rule(ours, (hf,), lambda a: _c(a.reshape(shape)), lambda x: (_c(x.reshape(hf_shape)),), shape)


def _get(cfg, key, what):
    if key not in cfg:
        raise ValueError(f"{what} config lacks {key!r}")
    return cfg[key]


def _square(cfg, what):
    size = _get(cfg, "image_size", what)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{what}: image_size {size} is not square; mtl.io.hf imports square images only")
        size = size[0]
    return int(size)


def _mlp_ratio(d, inter, what):
    ratio = inter / d
    if int(d * ratio) != inter:
        raise ValueError(f"{what}: intermediate size {inter} is not reproducible as int({d} * {ratio})")
    return ratio


def _act(name, what):
    if name not in _ACT_IN:
        raise ValueError(f"{what}: activation {name!r} has no mtl equivalent; supported: {', '.join(_ACT_IN)}")
    return _ACT_IN[name]


def _block_rules(i, d, h, inter, names) -> list[Rule]:
    """Rules of transformer block ``i``; ``names`` maps roles to the HF tensor-name stems."""
    o = f"blocks/{i}/"
    r = [_copy(o + "norm1/scale", names["ln1"] + ".weight", (d,)), _copy(o + "norm1/bias", names["ln1"] + ".bias", (d,)),
         _copy(o + "norm2/scale", names["ln2"] + ".weight", (d,)), _copy(o + "norm2/bias", names["ln2"] + ".bias", (d,))]
    if "qkv" in names:  # GPT-2: one Conv1D [D, 3D], columns q | k | v
        r += [Rule(o + "attn/qkv/kernel", (names["qkv"] + ".weight",), lambda w: _c(w.reshape(d, 3 * h, d // h)),
                   lambda k: (_c(k.reshape(d, 3 * d)),), (d, 3 * h, d // h)),
              _reshape(o + "attn/qkv/bias", names["qkv"] + ".bias", (3 * h, d // h), (3 * d,)),
              _reshape(o + "attn/out/kernel", names["out"] + ".weight", (h, d // h, d), (d, d)),
              _copy(o + "attn/out/bias", names["out"] + ".bias", (d,)),
              _copy(o + "mlp/up/kernel", names["fc1"] + ".weight", (d, inter)),
              _copy(o + "mlp/down/kernel", names["fc2"] + ".weight", (inter, d))]
    else:
        q, k, v = (names[x] for x in "qkv")
        r += [_qkv_linear(o + "attn/qkv/kernel", q + ".weight", k + ".weight", v + ".weight", d, h)]
        r += [_qkv_bias(o + "attn/qkv/bias", q + ".bias", k + ".bias", v + ".bias", d, h) if names.get("qkv_bias", True)
              else _zero(o + "attn/qkv/bias", (3 * h, d // h), "the HF config has qkv_bias=False")]
        r += [_out_linear(o + "attn/out/kernel", names["out"] + ".weight", d, h),
              _copy(o + "attn/out/bias", names["out"] + ".bias", (d,)),
              _linear(o + "mlp/up/kernel", names["fc1"] + ".weight", (d, inter)),
              _linear(o + "mlp/down/kernel", names["fc2"] + ".weight", (inter, d))]
    r += [_copy(o + "mlp/up/bias", names["fc1"] + ".bias", (inter,)),
          _copy(o + "mlp/down/bias", names["fc2"] + ".bias", (d,))]
    return r


def vit_layout(cfg: Mapping) -> Layout:
    what = "HF ViT"
    d, depth, h = (int(_get(cfg, k, what)) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    inter, p, c = int(_get(cfg, "intermediate_size", what)), int(_get(cfg, "patch_size", what)), int(cfg.get("num_channels", 3))
    size = _square(cfg, what)
    n = (size // p) ** 2
    qkv_bias = bool(cfg.get("qkv_bias", True))
    rules = [_patch("embed/kernel", "embeddings.patch_embeddings.projection.weight", p, c, d),
             _copy("embed/bias", "embeddings.patch_embeddings.projection.bias", (d,)),
             _reshape("cls", "embeddings.cls_token", (d,), (1, 1, d)),
             _reshape("pos", "embeddings.position_embeddings", (n + 1, d), (1, n + 1, d))]
    for i in range(depth):
        s = f"encoder.layer.{i}."
        rules += _block_rules(i, d, h, inter, {
            "ln1": s + "layernorm_before", "ln2": s + "layernorm_after", "q": s + "attention.attention.query",
            "k": s + "attention.attention.key", "v": s + "attention.attention.value", "qkv_bias": qkv_bias,
            "out": s + "attention.output.dense", "fc1": s + "intermediate.dense", "fc2": s + "output.dense"})
    rules += [_copy("norm/scale", "layernorm.weight", (d,)), _copy("norm/bias", "layernorm.bias", (d,))]
    kw = {"input_shape": (size, size, c), "patch": p, "dim": d, "depth": depth, "num_heads": h,
          "mlp_ratio": _mlp_ratio(d, inter, what), "act": _act(cfg.get("hidden_act", "gelu"), what),
          "norm_eps": float(cfg.get("layer_norm_eps", 1e-12)), "pre_norm": False}
    return Layout("vit", "vit", kw, tuple(rules), ignored=("pooler.*",),
                  anchor="embeddings.patch_embeddings.projection.weight")


def clip_vision_layout(cfg: Mapping) -> Layout:
    what = "HF CLIP vision"
    d, depth, h = (int(_get(cfg, k, what)) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    inter, p, c = int(_get(cfg, "intermediate_size", what)), int(_get(cfg, "patch_size", what)), int(cfg.get("num_channels", 3))
    size = _square(cfg, what)
    n = (size // p) ** 2
    rules = [_patch("embed/kernel", "embeddings.patch_embedding.weight", p, c, d),
             _zero("embed/bias", (d,), "CLIP's patch embedding has no bias"),
             _copy("cls", "embeddings.class_embedding", (d,)),
             _copy("pos", "embeddings.position_embedding.weight", (n + 1, d)),
             _copy("pre_norm/scale", "pre_layrnorm.weight", (d,)), _copy("pre_norm/bias", "pre_layrnorm.bias", (d,))]
    for i in range(depth):
        s = f"encoder.layers.{i}."
        rules += _block_rules(i, d, h, inter, {
            "ln1": s + "layer_norm1", "ln2": s + "layer_norm2", "q": s + "self_attn.q_proj", "k": s + "self_attn.k_proj",
            "v": s + "self_attn.v_proj", "out": s + "self_attn.out_proj", "fc1": s + "mlp.fc1", "fc2": s + "mlp.fc2"})
    rules += [_copy("norm/scale", "post_layernorm.weight", (d,)), _copy("norm/bias", "post_layernorm.bias", (d,))]
    kw = {"input_shape": (size, size, c), "patch": p, "dim": d, "depth": depth, "num_heads": h,
          "mlp_ratio": _mlp_ratio(d, inter, what), "act": _act(cfg.get("hidden_act", "quick_gelu"), what),
          "norm_eps": float(cfg.get("layer_norm_eps", 1e-5)), "pre_norm": True}
    return Layout("clip_vision", "vit", kw, tuple(rules), ignored=("embeddings.position_ids",),
                  anchor="embeddings.patch_embedding.weight")


def gpt2_layout(cfg: Mapping) -> Layout:
    what = "HF GPT-2"
    for key, ok, why in (("scale_attn_weights", True, "mtl attention always scales by 1/sqrt(head_dim)"),
                         ("scale_attn_by_inverse_layer_idx", False, "mtl attention has no per-layer scaling"),
                         ("add_cross_attention", False, "mtl's ByteTransformer has no cross-attention")):
        if bool(cfg.get(key, ok)) != ok:
            raise ValueError(f"{what}: {key}={cfg.get(key)!r} is not supported ({why})")
    d, depth, h = (int(_get(cfg, k, what)) for k in ("n_embd", "n_layer", "n_head"))
    inter = int(cfg.get("n_inner") or 4 * d)
    vocab, npos = int(_get(cfg, "vocab_size", what)), int(_get(cfg, "n_positions", what))
    rules = [_copy("tok/embedding", "wte.weight", (vocab, d)), _copy("pos", "wpe.weight", (npos, d))]
    for i in range(depth):
        s = f"h.{i}."
        rules += _block_rules(i, d, h, inter, {"ln1": s + "ln_1", "ln2": s + "ln_2", "qkv": s + "attn.c_attn",
                                               "out": s + "attn.c_proj", "fc1": s + "mlp.c_fc", "fc2": s + "mlp.c_proj"})
    rules += [_copy("norm/scale", "ln_f.weight", (d,)), _copy("norm/bias", "ln_f.bias", (d,))]
    kw = {"input_shape": (npos,), "vocab_size": vocab, "dim": d, "depth": depth, "num_heads": h,
          "mlp_ratio": _mlp_ratio(d, inter, what), "act": _act(cfg.get("activation_function", "gelu_new"), what),
          "norm_eps": float(cfg.get("layer_norm_epsilon", 1e-5))}
    return Layout("gpt2", "byte_transformer", kw, tuple(rules), ignored=("h.*.attn.bias", "h.*.attn.masked_bias"),
                  anchor="wte.weight")


LAYOUTS: dict[str, Callable[[Mapping], Layout]] = {"vit": vit_layout, "clip_vision": clip_vision_layout,
                                                   "gpt2": gpt2_layout}
_MODEL_TYPES = {"vit": "vit", "clip_vision_model": "clip_vision", "clip": "clip_vision", "gpt2": "gpt2"}


def layout_from_config(cfg: Mapping, layout: str | None = None) -> Layout:
    """The layout for an HF ``config.json`` dict (by ``model_type`` unless ``layout`` is given)."""
    mt = cfg.get("model_type")
    name = layout or _MODEL_TYPES.get(mt)
    if name not in LAYOUTS:
        raise ValueError(f"unknown Hugging Face layout (model_type {mt!r}, layout {layout!r}); supported layouts:"
                         f" {', '.join(LAYOUTS)} (model_type {', '.join(_MODEL_TYPES)})")
    if mt == "clip" and "vision_config" in cfg:
        cfg = cfg["vision_config"]
    return LAYOUTS[name](cfg)


def hf_config(layout: str, encoder_kwargs: Mapping, input_shape) -> dict:
    """The HF ``config.json`` of an mtl encoder exported to ``layout`` (``ValueError`` where it cannot be)."""
    kw = dict(encoder_kwargs)
    act = kw.get("act", "gelu_tanh")
    if act not in _ACT_OUT:
        raise ValueError(f"activation {act!r} has no Hugging Face name")
    d, ratio = int(kw.get("dim", 128)), float(kw.get("mlp_ratio", 4.0))
    common = {"hidden_size": d, "num_hidden_layers": int(kw.get("depth", 4)), "num_attention_heads": int(kw.get("num_heads", 4)),
              "intermediate_size": int(d * ratio), "hidden_act": _ACT_OUT[act],
              "layer_norm_eps": float(kw.get("norm_eps", 1e-6)), "attention_dropout": 0.0}
    if layout in ("vit", "clip_vision"):
        h, w, c = (int(s) for s in input_shape)
        if h != w:
            raise ValueError(f"input {h}x{w} is not square: Hugging Face {layout} configs hold one image_size")
        if kw.get("pool", "cls") == "mean":
            raise ValueError("pool='mean' has no Hugging Face equivalent (its models pool the class token)")
        pre = bool(kw.get("pre_norm", False))
        if layout == "vit" and pre:
            raise ValueError("HF ViT has no layer norm before the first block: this encoder has pre_norm=True;"
                             " export it as 'clip_vision'")
        if layout == "clip_vision" and not pre:
            raise ValueError("CLIP's vision tower normalises the tokens before the first block (pre_layrnorm);"
                             " this encoder has pre_norm=False: export it as 'vit'")
        base = {"image_size": h, "patch_size": int(kw.get("patch", 4)), "num_channels": c, **common}
        if layout == "vit":
            return {"model_type": "vit", "architectures": ["ViTModel"], "qkv_bias": True,
                    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **base}
        return {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"], **base}
    if layout == "gpt2":
        (npos,) = (int(s) for s in input_shape)
        return {"model_type": "gpt2", "architectures": ["GPT2Model"], "vocab_size": int(kw.get("vocab_size", 256)),
                "n_positions": npos, "n_embd": d, "n_layer": common["num_hidden_layers"],
                "n_head": common["num_attention_heads"], "n_inner": common["intermediate_size"],
                "activation_function": _ACT_OUT[act], "layer_norm_epsilon": common["layer_norm_eps"],
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    raise ValueError(f"unknown Hugging Face layout {layout!r}; supported: {', '.join(LAYOUTS)}")
