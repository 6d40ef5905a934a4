"""Slimmable multi-task model: one slimmable encoder, one slimmable decoder per task.

    model = SlimmableMultiTask(SlimCNN((32, 32, 1), rngs=rngs), tasks, output_hw=(32, 32), rngs=rngs)
    model(x)                                                 # widest configuration: {task: pred}
    cfg = WidthConfig(encoder=0.5, decoders={"seg": 0.25})  # other decoders: full width
    model(x, widths=cfg)  ==  model.at(cfg)(x)
    out = model.forward(x, cfg)   # SlimForward: .outputs {task: pred}, .features (encoder, for CIKD)

Widths are static Python values: jit with ``widths`` static (each configuration one cached
program). A width outside the model's trained set raises ValueError. The trainer's
``features`` / ``heads_from_features`` / ``heads[task](z)`` calls run the widest configuration.

The encoder features at width ``w`` have ``ceil(w * C)`` channels, and channel ``i`` of
them is produced by the same filter as channel ``i`` at full width: the *shared channels*
of a sub-network are the leading ``features.shape[-1]`` ones (:func:`shared_channels`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from flax import nnx

from mtl.nn.multitask import TaskHeads
from mtl.nn.slimmable.decoders import DenseDecoder, PooledDecoder, VectorDenseDecoder
from mtl.nn.slimmable.widths import WIDTHS, WidthConfig, check_widths
from mtl.tasks import Task, TaskSet


def is_per_pixel(task: Task) -> bool:
    """Whether a task predicts one output per pixel (its head spec says ``per_pixel``)."""
    return bool(getattr(task.head, "per_pixel", False))


@dataclasses.dataclass(frozen=True)
class SlimForward:
    """What one configuration computes: the task outputs and the encoder features."""

    outputs: dict
    features: Any
    widths: WidthConfig


def shared_channels(feat_sub, feat_full):
    """``(feat_sub, feat_full[..., :c])`` with ``c = feat_sub.shape[-1]``: the channels a
    sub-network shares with the full-width network (same filters, leading channels)."""
    c = feat_sub.shape[-1]
    if feat_full.shape[:-1] != feat_sub.shape[:-1] or feat_full.shape[-1] < c:
        raise ValueError(f"features of shape {feat_sub.shape} are not a width slice of {feat_full.shape}")
    return feat_sub, feat_full[..., :c]


class SlimmableMultiTask(TaskHeads, nnx.Module):
    def __init__(self, encoder: nnx.Module, tasks: Sequence[Task], *, output_hw: Sequence[int] | None = None,
                 widths: Sequence[float] = WIDTHS, decoder_channels: int = 32, decoder_hidden: Sequence[int] = (64,),
                 groups: int = 8, sandwich=None, rngs: nnx.Rngs):
        from mtl.nn.slimmable.training import SandwichSpec

        self.task_specs = tuple(TaskSet(tasks))
        self.widths = check_widths(widths)
        enc_widths = getattr(encoder, "widths", self.widths)
        if tuple(enc_widths) != self.widths:
            raise ValueError(f"the encoder was built for widths {tuple(enc_widths)} but the model for {self.widths}")
        self.encoder = encoder
        heads = {}
        for t in self.task_specs:
            d = encoder.out_features
            if not is_per_pixel(t):
                heads[t.name] = PooledDecoder(d, t.head.out, tuple(t.head.hidden) or tuple(decoder_hidden), rngs=rngs)
                continue
            if output_hw is None:
                raise ValueError(f"task {t.name!r} is per-pixel: give output_hw=(H, W)")
            if getattr(encoder, "spatial", False):
                heads[t.name] = DenseDecoder(d, t.head.out, output_hw, decoder_channels, groups, self.widths, rngs=rngs)
            else:
                hidden = (tuple(t.head.hidden) or tuple(decoder_hidden))[0]
                heads[t.name] = VectorDenseDecoder(d, t.head.out, output_hw, hidden, rngs=rngs)
        self.heads = nnx.Dict(heads)
        # sandwich-rule training (mtl.nn.slimmable.training): its options (static)
        self.sandwich = SandwichSpec.from_kwargs(sandwich)

    # ------------------------------------------------------------------ configurations
    def config(self, widths=None) -> WidthConfig:
        """``None`` = widest; a float = that width everywhere; a WidthConfig is checked."""
        if widths is None:
            return WidthConfig.uniform(1.0, self.task_names)
        if isinstance(widths, (int, float)):
            widths = WidthConfig.uniform(float(widths), self.task_names)
        if not isinstance(widths, WidthConfig):
            raise TypeError(f"widths must be a WidthConfig, a float or None; got {widths!r}")
        return widths.validate(self.widths, self.task_names)

    @property
    def widest(self) -> WidthConfig:
        return WidthConfig.uniform(self.widths[-1], self.task_names)

    @property
    def narrowest(self) -> WidthConfig:
        return WidthConfig.uniform(self.widths[0], self.task_names)

    # ------------------------------------------------------------------ forward
    def features(self, x, widths=None):
        return self.encoder(x, self.config(widths).encoder)

    def heads_from_features(self, z, widths=None) -> dict:
        cfg = self.config(widths)
        return {t.name: self.heads[t.name](z, cfg.decoder(t.name)) for t in self.task_specs}

    def forward(self, x, widths=None) -> SlimForward:
        cfg = self.config(widths)
        z = self.encoder(x, cfg.encoder)
        return SlimForward(self.heads_from_features(z, cfg), z, cfg)

    def __call__(self, x, widths=None) -> dict:
        return self.forward(x, widths).outputs

    def train_losses(self, batch, tasks, variant: int = 0):
        """The train step's objective (``mtl.train.forward``): the sandwich rule,
        ``(label losses [T], distillation + CIKD)``; see :mod:`mtl.nn.slimmable.training`."""
        from mtl.nn.slimmable.training import train_losses

        return train_losses(self, batch, tasks, self.sandwich, variant)

    @property
    def train_variants(self) -> int:
        """Distinct step programs of the sandwich rule (one per group of random configurations):
        the train step draws one per step (:mod:`mtl.train.forward`)."""
        return self.sandwich.variants(self.widths, self.task_names)

    def inference_key(self) -> str:
        """A description of everything the forward depends on besides the parameters: two
        models with the same key compute the same function of their parameters (the training
        options, ``self.sandwich``, are left out; tasks compare by name, head and metrics)."""
        spec = self.sandwich
        self.sandwich = None
        try:
            return repr(nnx.graphdef(self))
        finally:
            self.sandwich = spec

    def at(self, widths) -> "SlimView":
        """This model fixed at one configuration (checked now): ``model.at(cfg)(x)``."""
        return SlimView(self, self.config(widths))


class SlimView:
    """A slimmable model at a fixed configuration, with the plain model interface."""

    def __init__(self, model: SlimmableMultiTask, widths: WidthConfig):
        self.model, self.widths = model, widths

    @property
    def tasks(self):
        return self.model.tasks

    def features(self, x):
        return self.model.features(x, self.widths)

    def heads_from_features(self, z):
        return self.model.heads_from_features(z, self.widths)

    def forward(self, x) -> SlimForward:
        return self.model.forward(x, self.widths)

    def __call__(self, x) -> dict:
        return self.model(x, self.widths)
