"""Slimmable, controllable multi-task networks (methods.md §4): one model, any width.

* :mod:`~mtl.nn.slimmable.widths` - width sets and :class:`WidthConfig` (encoder + per-task decoder widths)
* :mod:`~mtl.nn.slimmable.layers` - SlimDense, SlimConv, SwitchableNorm, SlimAttention, SlimMLPBlock
* :mod:`~mtl.nn.slimmable.encoders` / :mod:`~mtl.nn.slimmable.decoders` - MLP/CNN/ViT encoders, task decoders
* :mod:`~mtl.nn.slimmable.model` - :class:`SlimmableMultiTask` (``model(x, widths)``, ``model.at(widths)``)
* :mod:`~mtl.nn.slimmable.distill` - CIKD and in-place distillation losses
* :mod:`~mtl.nn.slimmable.sandwich` - the sandwich-rule sampler and loss combinator
* :mod:`~mtl.nn.slimmable.cost` - FLOPs (XLA cost analysis) and latency per configuration
"""
from mtl.nn.slimmable.widths import WIDTHS, WidthConfig, active, all_configs, check_widths
from mtl.nn.slimmable.layers import SlimAttention, SlimConv, SlimDense, SlimMLPBlock, SlimTransformerBlock, SwitchableNorm
from mtl.nn.slimmable.encoders import SLIM_ENCODERS, SlimCNN, SlimMLP, SlimViT, build_slim_encoder
from mtl.nn.slimmable.decoders import DenseDecoder, PooledDecoder, VectorDenseDecoder
from mtl.nn.slimmable.model import SlimForward, SlimmableMultiTask, SlimView, is_per_pixel, shared_channels
from mtl.nn.slimmable.distill import cikd_loss, inplace_distillation_loss
from mtl.nn.slimmable.sandwich import SandwichLosses, SandwichSampler, sandwich_losses
from mtl.nn.slimmable.cost import Cost, config_cost, flops, forward, latency

__all__ = [n for n in dir() if not n.startswith("_")]
