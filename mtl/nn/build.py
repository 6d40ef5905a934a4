"""Build models from config: ``model.arch`` names how tasks share parameters.

``ARCHITECTURES[name](model_cfg, tasks, input_shape) -> factory(rngs) -> nnx.Module``.
Every architecture's model maps inputs to ``{task: prediction}`` and has ``.tasks``.
New architectures register one function here.
"""
from __future__ import annotations

from typing import Callable, Sequence

from flax import nnx

from mtl.nn.encoders import build_encoder, unknown_name_error
from mtl.nn.multitask import MultiTaskModel
from mtl.tasks import Task


def shared_factory(model_cfg, tasks: Sequence[Task], input_shape) -> Callable:
    """Hard sharing: ``model.encoder`` (+ ``encoder_kwargs``) and one head per task."""
    enc_kwargs = dict(model_cfg.get("encoder_kwargs", {}) or {})
    name = model_cfg.get("encoder", "mlp")

    def make(rngs: nnx.Rngs):
        return MultiTaskModel(build_encoder(name, input_shape, rngs=rngs, **enc_kwargs), tasks, rngs=rngs)

    return make


def moe_factory(name: str) -> Callable:
    """Multi-task MoE (``mtl.nn.moe``): optional ``model.encoder`` (``"none"`` = the flattened
    input), then the expert architecture with its ``arch_kwargs``, then the task heads."""

    def make_factory(model_cfg, tasks, input_shape):
        import math

        from mtl.nn.moe import build_moe_model

        enc_name = model_cfg.get("encoder", "none") or "none"
        enc_kwargs = dict(model_cfg.get("encoder_kwargs", {}) or {})
        arch_kwargs = dict(model_cfg.get("arch_kwargs", {}) or {})

        def make(rngs: nnx.Rngs):
            if enc_name == "none":
                return build_moe_model(name, tasks, int(math.prod(input_shape)), rngs=rngs, **arch_kwargs)
            enc = build_encoder(enc_name, input_shape, rngs=rngs, **enc_kwargs)
            return build_moe_model(name, tasks, encoder=enc, rngs=rngs, **arch_kwargs)

        return make

    return make_factory


def vision_moe_factory(name: str) -> Callable:
    """Token-routed MoE vision models that own their backbone (``m3vit``, ``taskexpert``):
    ``model.arch_kwargs`` are the model's options (``model.encoder`` is not used)."""

    def make_factory(model_cfg, tasks, input_shape):
        from mtl.nn import moe

        cls = {"m3vit": moe.M3ViT, "taskexpert": moe.TaskExpertViT}[name]
        arch_kwargs = dict(model_cfg.get("arch_kwargs", {}) or {})
        shape = tuple(input_shape) + ((1,) if len(input_shape) == 2 else ())

        def make(rngs: nnx.Rngs):
            return cls(shape, tasks, rngs=rngs, **arch_kwargs)

        return make

    return make_factory


def slimmable_factory(model_cfg, tasks, input_shape) -> Callable:
    """Slimmable encoder (``model.encoder``: mlp, cnn or vit; ``encoder_kwargs``) and one
    slimmable decoder per task (``mtl.nn.slimmable``). ``model.arch_kwargs``: ``widths``
    (the width set, default 0.25/0.5/0.75/1), ``decoder_channels``, ``decoder_hidden``,
    ``groups``, ``sandwich`` (training options, ``mtl.nn.slimmable.training``). Called without widths the model runs its widest configuration."""
    from mtl.nn.slimmable import SlimmableMultiTask, build_slim_encoder
    from mtl.nn.slimmable.widths import WIDTHS, check_widths

    enc_kwargs = dict(model_cfg.get("encoder_kwargs", {}) or {})
    arch_kwargs = dict(model_cfg.get("arch_kwargs", {}) or {})
    widths = check_widths(arch_kwargs.pop("widths", WIDTHS))
    allowed = ("decoder_channels", "decoder_hidden", "groups", "sandwich")
    bad = [k for k in arch_kwargs if k not in allowed]
    if bad:
        raise TypeError(f"model.arch='slimmable' has no arch_kwargs {bad}; its options are ['widths', {', '.join(map(repr, allowed))}]")
    name = model_cfg.get("encoder", "mlp")
    output_hw = tuple(input_shape[:2]) if len(input_shape) >= 2 else None

    def make(rngs: nnx.Rngs):
        enc = build_slim_encoder(name, input_shape, widths, rngs=rngs, **enc_kwargs)
        return SlimmableMultiTask(enc, tasks, output_hw=output_hw, widths=widths, rngs=rngs, **arch_kwargs)

    return make


def lm_factory(model_cfg, tasks: Sequence[Task], input_shape) -> Callable:
    """Causal LM with parallel scaling (``mtl.nn.parscale``): ``model.encoder`` (a decoder
    accepting ``kv_prefixes``, e.g. ``byte_transformer``) + the LM task's head, wrapped in
    ``ParScale`` with the options in ``model.parscale`` (``P``, default 1 = the plain LM;
    ``prefix_len``, ``reparam``, ``prefix_dim``, ``prefix_hidden``, ``smoothing``, ``prefix_gate``)
    and the trainer's two-stage options (``init_from``, ``freeze_backbone``;
    :class:`~mtl.nn.parscale.TwoStage`). ``prefix_gate`` unset (or None) means on exactly when
    ``init_from`` is set."""
    import inspect

    from mtl.nn.parscale import TRAINER_OPTIONS, ParScale, TwoStage, _check_P

    enc_kwargs = dict(model_cfg.get("encoder_kwargs", {}) or {})
    name = model_cfg.get("encoder", "byte_transformer")
    opts = dict(model_cfg.get("parscale", {}) or {})
    P = _check_P(opts.pop("P", 1))
    valid = [k for k in inspect.signature(ParScale.__init__).parameters if k not in ("self", "model", "P", "rngs")]
    bad = sorted(set(opts) - set(valid) - set(TRAINER_OPTIONS))
    if bad:
        raise TypeError(f"model.parscale has unknown option(s) {bad}; its options are ['P'] + {valid} + "
                        f"{list(TRAINER_OPTIONS)}")
    two_stage = TwoStage.from_options(opts, P)
    for k in TRAINER_OPTIONS:
        opts.pop(k, None)
    if opts.get("prefix_gate") is None:
        opts["prefix_gate"] = bool(two_stage.init_from)

    def make(rngs: nnx.Rngs):
        model = MultiTaskModel(build_encoder(name, input_shape, rngs=rngs, **enc_kwargs), tasks, rngs=rngs)
        return ParScale(model, P, rngs=rngs, **opts)

    return make


def stagewise_factory(name: str) -> Callable:
    """Per-task representations over the stages of ``model.encoder`` (``mlp``, ``cnn`` or ``vit``, with
    ``encoder_kwargs``): ``cross_stitch`` and ``ltb`` build one column per task, ``mtan`` one
    shared backbone with per-task attention (:mod:`mtl.nn.soft_sharing`, :mod:`mtl.nn.branching`);
    ``model.arch_kwargs`` are the architecture's options."""

    def make_factory(model_cfg, tasks, input_shape):
        from mtl.nn.branching import LearnToBranch
        from mtl.nn.pertask import PerTaskFeaturesModel, PerTaskModel
        from mtl.nn.soft_sharing import MTAN, CrossStitch

        enc_name = model_cfg.get("encoder", "mlp")
        enc_kwargs = dict(model_cfg.get("encoder_kwargs", {}) or {})
        arch_kwargs = dict(model_cfg.get("arch_kwargs", {}) or {})
        names = [t.name for t in tasks]

        def make_encoder(rngs):
            return build_encoder(enc_name, input_shape, rngs=rngs, **enc_kwargs)

        def make(rngs: nnx.Rngs):
            if name == "mtan":
                return PerTaskFeaturesModel(MTAN(make_encoder(rngs), names, rngs=rngs, **arch_kwargs), tasks, rngs=rngs)
            if name == "cross_stitch":
                return PerTaskFeaturesModel(CrossStitch(make_encoder, names, rngs=rngs, **arch_kwargs), tasks,
                                            rngs=rngs)
            return PerTaskModel(LearnToBranch(make_encoder, names, rngs=rngs, **arch_kwargs), tasks, rngs=rngs)

        return make

    return make_factory


def dselect_factory(model_cfg, tasks, input_shape) -> Callable:
    """DSelect-k (:mod:`mtl.nn.moe.dselect`) on ``model.encoder``'s features (``"none"``, the
    default: the flattened input), ``model.arch_kwargs`` its options, then the task heads."""
    import math

    from mtl.nn.moe.dselect import DSelectK
    from mtl.nn.moe.model import MoEMultiTaskModel

    enc_name = model_cfg.get("encoder", "none") or "none"
    enc_kwargs = dict(model_cfg.get("encoder_kwargs", {}) or {})
    arch_kwargs = dict(model_cfg.get("arch_kwargs", {}) or {})

    def make(rngs: nnx.Rngs):
        enc = None if enc_name == "none" else build_encoder(enc_name, input_shape, rngs=rngs, **enc_kwargs)
        d = int(math.prod(input_shape)) if enc is None else enc.out_features
        arch = DSelectK(d, [t.name for t in tasks], rngs=rngs, **arch_kwargs)
        return MoEMultiTaskModel(arch, tasks, encoder=enc, rngs=rngs)

    return make


ARCHITECTURES: dict[str, Callable] = {"shared": shared_factory, "slimmable": slimmable_factory}
ARCHITECTURES["lm"] = lm_factory
for _name in ("one_gate_moe", "mmoe", "cgc", "ple", "home"):
    ARCHITECTURES[_name] = moe_factory(_name)
for _name in ("m3vit", "taskexpert"):
    ARCHITECTURES[_name] = vision_moe_factory(_name)
for _name in ("cross_stitch", "mtan", "ltb"):
    ARCHITECTURES[_name] = stagewise_factory(_name)
ARCHITECTURES["dselect_k"] = dselect_factory


def model_factory(model_cfg, tasks: Sequence[Task], input_shape) -> Callable:
    arch = model_cfg.get("arch", "shared")
    if arch not in ARCHITECTURES:
        raise unknown_name_error("architecture", arch, ARCHITECTURES)
    factory = ARCHITECTURES[arch](model_cfg, tasks, tuple(input_shape))
    # build once abstractly so bad options fail here, with the encoder's message
    with nnx.use_eager_sharding(False):
        nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    return factory
