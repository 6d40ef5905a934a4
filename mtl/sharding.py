"""Meshes, logical axis rules, and the one helper for in-graph sharding constraints.

Models name their array axes *logically* (``batch, embed, mlp, heads, kv, vocab,
expert, task, conv_in, conv_out, length``); a rule list maps logical names to *mesh*
axes (``data, fsdp, tensor, expert``). The rules live in config, so the same model
runs data-parallel, FSDP or tensor-parallel by changing two lines of config.

A logical axis is left unsharded (replicated) when its rule maps to no mesh axis,
when the mapped mesh axes have size 1, or when the array dimension is not
divisible by the mesh axes' total size (then it is silently replicated: sharding a
10-way classifier head over 4 devices is not worth an error).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# (logical name, mesh axis or tuple of mesh axes or None). The first rule for a name wins.
DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("task", None),
    ("length", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
)

_RULES: contextvars.ContextVar = contextvars.ContextVar("mtl_logical_rules", default=DEFAULT_RULES)


def normalize_rules(rules) -> tuple:
    """Rules from config (lists, ``None``/``"none"``) to a tuple of (name, axes)."""
    out = []
    for item in rules:
        if len(item) != 2:
            raise ValueError(f"a logical axis rule is a pair (logical_name, mesh_axes); got {item!r}")
        name, axes = item
        if isinstance(axes, str) and axes.lower() == "none":
            axes = None
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"rule {item!r} names mesh axis {a!r}; mesh axes are {MESH_AXES}")
        out.append((str(name), axes))
    return tuple(out)


@contextlib.contextmanager
def logical_rules(rules):
    """Use these logical->mesh rules inside the block (for ``constrain`` and ``spec_for``)."""
    token = _RULES.set(normalize_rules(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> tuple:
    return _RULES.get()


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh with axes ``(data, fsdp, tensor, expert)``.

    ``axes`` gives sizes; missing axes are 1 and one axis may be -1 (= all remaining
    devices). With no ``axes``, all devices go on ``data``. Axis types are Auto.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    axes = dict(axes or {"data": -1})
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = {a: int(axes.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1; got {free}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh axis sizes must be positive or -1; got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n % fixed:
            raise ValueError(f"mesh {sizes}: {n} devices are not divisible by the fixed axes' product {fixed}")
        sizes[free[0]] = n // fixed
    total = math.prod(sizes.values())
    if total != n:
        raise ValueError(f"mesh {sizes} needs {total} devices but {n} are available; "
                         "use -1 for one axis to take the rest")
    dev = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(dev, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axis_sizes(mesh) -> dict:
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return {}
    return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))


def spec_for(names: Iterable, shape: Sequence[int] | None = None, mesh=None, rules=None) -> P:
    """PartitionSpec for an array whose axes have these logical names.

    ``names`` entries may be None (replicated). A mesh axis is used at most once per
    array; axes of size 1 are dropped; non-divisible dims are replicated.
    """
    rules = normalize_rules(rules) if rules is not None else current_rules()
    sizes = _mesh_axis_sizes(mesh)
    lookup: dict = {}
    for name, axes in rules:
        lookup.setdefault(name, axes)
    used: set = set()
    out = []
    names = tuple(names)
    for i, name in enumerate(names):
        axes = lookup.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        axes = tuple(a for a in axes if a in sizes and sizes[a] > 1 and a not in used)
        if shape is not None and axes:
            # keep the longest prefix of axes whose product divides the dimension
            while axes and shape[i] % math.prod(sizes[a] for a in axes):
                axes = axes[:-1]
        if not axes:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def constrain(x, names):
    """The one in-graph sharding constraint: ``x`` laid out by logical axis ``names``.

    A no-op outside a mesh (plain single-device code keeps working).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(names, x.shape, mesh))


def logical_names(variable) -> tuple | None:
    """The logical axis names an nnx Variable was annotated with (or None)."""
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return None


def state_shardings(abstract_state, mesh: Mesh, rules=None):
    """NamedShardings (same tree as ``abstract_state``) for an nnx State of abstract Variables.

    Variables with logical names are sharded by the rules; everything else is replicated.
    """
    from flax import nnx

    def one(var):
        if isinstance(var, nnx.Variable):
            names = logical_names(var)
            shape = var.get_value().shape if hasattr(var, "get_value") else var[...].shape
            spec = spec_for(names, shape, mesh, rules) if names else P()
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1, rules=None) -> NamedSharding:
    """Sharding of a batch array: leading axis by the ``batch`` rule, the rest replicated."""
    return NamedSharding(mesh, spec_for(("batch",) + (None,) * (ndim - 1), None, mesh, rules))
