"""Taps on dense layers: the inputs X and output cotangents D that a per-task Gramian needs.

For a dense layer ``y = x W + b`` (any leading axes, flattened to rows), task t's weight
gradient is ``Xᵀ D_t`` with ``D_t = ∂L_t/∂y``, and its bias gradient ``1ᵀ D_t``. A
per-task Gramian over the layer's parameters then needs only X and the D_t
(``mtl.train.routes.gramian_route``), never a weight gradient per task.

:class:`Linear` and :class:`LinearGeneral` are ``nnx.Linear`` / ``nnx.LinearGeneral``
that, while a :func:`recording` context is active (inside a traced function), append
their input to the recorder and add the recorder's zero perturbation ``eps[i]`` to their
output, so that the cotangent of ``eps[i]`` is D. Outside a recording they are exactly
the flax layers. The library's :func:`mtl.nn.layers.dense` and attention projections are
built from them; conv layers, norms and embeddings are not tapped (their parameters take
the per-parameter route).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

from flax import nnx

_ACTIVE: list = []


@dataclasses.dataclass
class Recorder:
    """Collects ``(module, x_rows, y_shape)`` per tapped call, in call order; with ``eps``
    (one array per call, the shape of that call's output) it perturbs the outputs."""
    eps: Any = None
    calls: list = dataclasses.field(default_factory=list)
    untapped: list = dataclasses.field(default_factory=list)  # modules called in a layout not tapped

    def tap(self, module, x, y, in_ndim: int):
        i = len(self.calls)
        rows = x.reshape((-1, math.prod(x.shape[x.ndim - in_ndim:])))
        self.calls.append((module, rows, y.shape))
        if self.eps is not None:
            y = y + self.eps[i].astype(y.dtype)
        return y


@contextlib.contextmanager
def recording(eps=None):
    """Record (and, with ``eps``, perturb) every tapped layer call made inside."""
    rec = Recorder(eps=eps)
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.pop()


def _tap(module, x, y, in_ndim: int):
    return _ACTIVE[-1].tap(module, x, y, in_ndim) if _ACTIVE else y


class Linear(nnx.Linear):
    """``nnx.Linear`` with a tap (see the module docstring)."""

    def __call__(self, inputs):
        return _tap(self, inputs, super().__call__(inputs), 1)


class LinearGeneral(nnx.LinearGeneral):
    """``nnx.LinearGeneral`` with a tap, for contractions over trailing input axes and no
    batch axes (the attention projections); other layouts are not tapped."""

    def __call__(self, inputs):
        y = super().__call__(inputs)
        n_in = len(self.in_features)
        axes = tuple(a % inputs.ndim for a in self.axis)
        if self.batch_axis or axes != tuple(range(inputs.ndim - n_in, inputs.ndim)):
            if _ACTIVE:
                _ACTIVE[-1].untapped.append(self)
            return y
        return _tap(self, inputs, y, n_in)
