"""Stacked experts: E experts whose parameters share a leading ``expert`` axis.

Every kernel has shape ``(E, d_in, d_out)`` and logical names ``("expert", "embed", "mlp")``
(or ``("expert", "mlp", "embed")`` for a down projection), so ``mtl.sharding`` splits the
expert axis over the mesh's ``expert`` axis. Experts are applied with einsum in three
layouts:

* ``__call__(x)``: every expert on the same input ``x [..., d_in] -> [..., E, d_out]``
  (dense MoE: MMoE and friends);
* ``per_expert(x)``: each expert on its own input ``x [E, N, d_in] -> [E, N, d_out]``
  (tokens dispatched to ``capacity`` slots per expert, or one input stream per expert
  as in PLE/HoME);
* ``forward(x, shared_input)`` returns ``(out [E, N, d_out], act [E, N, h])`` where ``act``
  is the post-nonlinearity activation used for the dead-unit diagnostic.

Two kinds: ``MLPExperts`` (Linear -> activation -> Linear, GELU by default) and
``LNSExperts`` (HoME: Linear -> LayerNorm -> Swish, so every expert's output has the same
scale).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.sharding import constrain, current_rules

ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "swish": jax.nn.swish, "silu": jax.nn.silu,
               "tanh": jnp.tanh}


def _activation(name):
    if callable(name):
        return name
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def expert_axis_size(mesh=None, rules=None) -> int:
    """How many ways the logical ``expert`` axis is split on ``mesh`` (default: the current
    mesh set by ``jax.set_mesh``; 1 when there is none)."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return 1
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))
    axes = None
    for name, a in (rules if rules is not None else current_rules()):
        if name == "expert":
            axes = a
            break
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(sizes.get(a, 1) for a in axes)


def check_expert_count(num_experts: int, mesh=None, rules=None, what: str = "experts") -> None:
    """Raise ``ValueError`` when ``num_experts`` cannot be split evenly over the mesh axes
    that the ``expert`` logical axis maps to. Unlike other logical axes (which
    ``mtl.sharding`` silently replicates when they do not divide), a replicated expert
    axis would silently turn expert parallelism off, so it is an error."""
    n = expert_axis_size(mesh, rules)
    if num_experts < 1:
        raise ValueError(f"need at least one expert; got num_experts={num_experts}")
    if num_experts % n:
        raise ValueError(f"{num_experts} {what} cannot be split over the mesh's expert axis of size {n}: "
                         f"use a multiple of {n} experts or a smaller 'expert' mesh axis")


def stacked_param(rngs: nnx.Rngs, init, shape, names) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape)))


def stacked_kernel_init(scale: float = 1.0):
    """LeCun-normal per expert: fan-in is the ``d_in`` axis, the leading axis is a batch axis."""
    return nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                             batch_axis=(0,))


_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


def _shared(x, w):
    """x [..., d], w [E, d, h] -> [E, N, h] with N = prod(leading dims of x)."""
    return jnp.einsum("nd,edh->enh", x.reshape(-1, x.shape[-1]), w)


def _per_expert(x, w):
    """x [E, N, d], w [E, d, h] -> [E, N, h]."""
    return jnp.einsum("end,edh->enh", x, w)


def _bias(b):
    return b[:, None, :]


class _ExpertsBase(nnx.Module):
    num_experts: int
    in_features: int
    out_features: int

    def forward(self, x, shared_input: bool):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x):
        """All experts on the same input: ``[..., d_in] -> [..., E, d_out]``."""
        lead = x.shape[:-1]
        out, _ = self.forward(x, shared_input=True)  # [E, N, d_out]
        return jnp.moveaxis(out, 0, -2).reshape(lead + (self.num_experts, self.out_features))

    def per_expert(self, x):
        """Each expert on its own inputs: ``[E, N, d_in] -> [E, N, d_out]`` (dispatched tokens)."""
        return self.forward(x, shared_input=False)[0]

    def _check(self, x, shared_input):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"experts expect inputs with {self.in_features} features; got shape {x.shape}")
        if not shared_input and (x.ndim != 3 or x.shape[0] != self.num_experts):
            raise ValueError(f"per-expert inputs must have shape [E={self.num_experts}, N, {self.in_features}]; "
                             f"got {x.shape}")


class MLPExperts(_ExpertsBase):
    """E experts, each Linear(d_in -> hidden) -> activation -> Linear(hidden -> d_out).

    ``out_activation`` (default None) is applied to the output too; classic MMoE experts
    end in a ReLU."""

    def __init__(self, num_experts: int, in_features: int, hidden_features: int, out_features: int, *,
                 activation="gelu", out_activation=None, rngs: nnx.Rngs):
        check_expert_count(num_experts)
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.hidden_features = hidden_features
        self.activation = activation
        self.out_activation = out_activation
        init = stacked_kernel_init()
        self.w_up = stacked_param(rngs, init, (num_experts, in_features, hidden_features), ("expert", "embed", "mlp"))
        self.b_up = stacked_param(rngs, _zeros, (num_experts, hidden_features), ("expert", "mlp"))
        self.w_down = stacked_param(rngs, init, (num_experts, hidden_features, out_features), ("expert", "mlp", "embed"))
        self.b_down = stacked_param(rngs, _zeros, (num_experts, out_features), ("expert", "embed"))

    def forward(self, x, shared_input: bool):
        """``(out [E, N, d_out], act)``: ``act`` is the hidden activation ``[E, N, hidden]``, or
        the output when ``out_activation`` is set."""
        self._check(x, shared_input)
        h = (_shared if shared_input else _per_expert)(x, self.w_up[...]) + _bias(self.b_up[...])
        h = constrain(_activation(self.activation)(h), ("expert", "batch", "mlp"))
        out = _per_expert(h, self.w_down[...]) + _bias(self.b_down[...])
        if self.out_activation is not None:
            out = _activation(self.out_activation)(out)
            h = out
        return constrain(out, ("expert", "batch", "embed")), h


class LNSExperts(_ExpertsBase):
    """HoME experts: Linear(d_in -> d_out) -> LayerNorm -> Swish (one layer each)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, eps: float = 1e-6,
                 rngs: nnx.Rngs):
        check_expert_count(num_experts)
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.eps = eps
        self.w = stacked_param(rngs, stacked_kernel_init(), (num_experts, in_features, out_features),
                               ("expert", "embed", "mlp"))
        self.b = stacked_param(rngs, _zeros, (num_experts, out_features), ("expert", "mlp"))
        self.scale = stacked_param(rngs, _ones, (num_experts, out_features), ("expert", "mlp"))
        self.shift = stacked_param(rngs, _zeros, (num_experts, out_features), ("expert", "mlp"))

    def forward(self, x, shared_input: bool):
        """``(out [E, N, d_out], out)``: the output is the post-nonlinearity activation."""
        self._check(x, shared_input)
        h = (_shared if shared_input else _per_expert)(x, self.w[...]) + _bias(self.b[...])
        mean = h.mean(-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), -1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps) * _bias(self.scale[...]) + _bias(self.shift[...])
        out = constrain(jax.nn.swish(h), ("expert", "batch", "mlp"))
        return out, out


EXPERTS = {"mlp": MLPExperts, "lns": LNSExperts}


def build_experts(kind: str, num_experts: int, in_features: int, out_features: int, *, hidden_features=None,
                  rngs: nnx.Rngs, **kwargs) -> _ExpertsBase:
    """``kind='mlp'`` (needs ``hidden_features``, default ``out_features``) or ``'lns'``."""
    if kind == "mlp":
        return MLPExperts(num_experts, in_features, int(hidden_features or out_features), out_features,
                          rngs=rngs, **kwargs)
    if kind == "lns":
        return LNSExperts(num_experts, in_features, out_features, rngs=rngs, **kwargs)
    raise ValueError(f"unknown expert kind {kind!r}; valid kinds: {', '.join(sorted(EXPERTS))}")
