"""Multi-task MoE architectures for vector inputs ``[B, D]``: OneGateMoE, MMoE, CGC, PLE, HoME.

Each is a stack of ``GatedExpertLayer``s plus one tower per task and is called as
``arch(x) -> ({task: [B, out_features]}, aux)`` with ``aux = {"layers": [layer aux, ...]}``
(gate probabilities and expert activations per layer, see ``gated.py``). Layer l+1 reads
layer l's gate outputs as its input streams; the top layer has one gate per task (OneGateMoE:
one gate for all), ``task_gate[t]`` says which. The hard-sharing baseline is
``mtl.nn.MultiTaskModel``.

Expert pools are stacked into one expert axis; labels say who owns each expert:
``"shared:i"``, ``"group:<g>:i"``, ``"task:<name>:i"``. The pool size must divide by the
mesh's ``expert`` axis when built on a mesh.
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from mtl.nn.encoders import MLP
from mtl.nn.moe.gated import GatedExpertLayer


class _GatedArchitecture(nnx.Module):
    """Shared machinery: run the layers, pick each task's gate output, apply its tower."""

    def _finish(self, task_names, task_gate, expert_dim, tower_hidden, rngs):
        self.task_names = tuple(task_names)
        self.task_gate = tuple(task_gate)
        self.towers = nnx.Dict({t: MLP((expert_dim,), tuple(tower_hidden), rngs=rngs) for t in self.task_names})
        self.out_features = self.towers[self.task_names[0]].out_features

    def __call__(self, x):
        if x.ndim != 2:
            raise ValueError(f"{type(self).__name__} expects inputs [B, D]; got shape {x.shape}")
        aux, h = [], x
        for layer in self.layers:
            h, a = layer(h)
            aux.append(a)
        feats = {t: self.towers[t](h[self.task_gate[i]]) for i, t in enumerate(self.task_names)}
        return feats, {"layers": aux}


def _names(tasks) -> tuple:
    names = tuple(getattr(t, "name", t) for t in tasks)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"task names must be unique and non-empty; got {list(names)}")
    return names


def _layer_kwargs(expert_kind, expert_hidden, expert_kwargs):
    return dict(expert_kind=expert_kind, expert_hidden=expert_hidden, expert_kwargs=expert_kwargs)


class OneGateMoE(_GatedArchitecture):
    """E shared experts mixed by ONE softmax gate; every task's tower reads the same mixture."""

    def __init__(self, in_features: int, tasks: Sequence, *, num_experts: int = 4, expert_dim: int = 16,
                 expert_hidden: int | None = None, expert_kind: str = "mlp", tower_hidden: Sequence[int] = (),
                 expert_kwargs: dict | None = None, rngs: nnx.Rngs):
        names = _names(tasks)
        self.layers = nnx.List([GatedExpertLayer(
            in_features, expert_dim, expert_streams=(0,) * num_experts, gate_streams=(0,),
            visible=[[True] * num_experts], expert_labels=[f"shared:{i}" for i in range(num_experts)],
            gate_labels=["shared"], **_layer_kwargs(expert_kind, expert_hidden, expert_kwargs), rngs=rngs)])
        self._finish(names, (0,) * len(names), expert_dim, tower_hidden, rngs)


class MMoE(_GatedArchitecture):
    """Multi-gate MoE: E shared experts f_i, per-task gates softmax(W_t x), task t's tower
    reads ``sum_i g^t_i(x) f_i(x)``."""

    def __init__(self, in_features: int, tasks: Sequence, *, num_experts: int = 4, expert_dim: int = 16,
                 expert_hidden: int | None = None, expert_kind: str = "mlp", tower_hidden: Sequence[int] = (),
                 expert_kwargs: dict | None = None, rngs: nnx.Rngs):
        names = _names(tasks)
        self.layers = nnx.List([GatedExpertLayer(
            in_features, expert_dim, expert_streams=(0,) * num_experts, gate_streams=(0,) * len(names),
            visible=[[True] * num_experts] * len(names), expert_labels=[f"shared:{i}" for i in range(num_experts)],
            gate_labels=list(names), **_layer_kwargs(expert_kind, expert_hidden, expert_kwargs), rngs=rngs)])
        self._finish(names, range(len(names)), expert_dim, tower_hidden, rngs)


def _ple_layer_spec(names, num_shared, experts_per_task, top: bool, first: bool):
    """Pool [shared | task experts]; streams: task t -> t, shared -> T (all 0 on the first layer)."""
    t_count = len(names)
    shared_stream = 0 if first else t_count
    labels = [f"shared:{i}" for i in range(num_shared)]
    streams = [shared_stream] * num_shared
    owner = [None] * num_shared
    for t, name in enumerate(names):
        labels += [f"task:{name}:{i}" for i in range(experts_per_task)]
        streams += [0 if first else t] * experts_per_task
        owner += [t] * experts_per_task
    visible = [[o is None or o == t for o in owner] for t in range(t_count)]
    gate_streams = [0 if first else t for t in range(t_count)]
    gate_labels = list(names)
    if not top:
        visible.append([True] * len(owner))
        gate_streams.append(shared_stream)
        gate_labels.append("shared")
    return dict(expert_streams=streams, gate_streams=gate_streams, visible=visible, expert_labels=labels,
                gate_labels=gate_labels)


class PLE(_GatedArchitecture):
    """Progressive layered extraction: ``num_layers`` CGC layers. In each, task t's gate spans
    its own experts + the shared experts; below the top a shared gate mixes *all* experts
    and feeds the next layer's shared experts (task gates feed that task's experts)."""

    def __init__(self, in_features: int, tasks: Sequence, *, num_layers: int = 2, num_shared: int = 2,
                 experts_per_task: int = 1, expert_dim: int = 16, expert_hidden: int | None = None,
                 expert_kind: str = "mlp", tower_hidden: Sequence[int] = (), expert_kwargs: dict | None = None,
                 rngs: nnx.Rngs):
        names = _names(tasks)
        if num_layers < 1:
            raise ValueError(f"PLE needs num_layers >= 1; got {num_layers}")
        if num_shared < 0 or experts_per_task < 0 or num_shared + experts_per_task == 0:
            raise ValueError(f"need num_shared, experts_per_task >= 0 with at least one expert per gate; got "
                             f"num_shared={num_shared}, experts_per_task={experts_per_task}")
        layers = []
        for l in range(num_layers):
            spec = _ple_layer_spec(names, num_shared, experts_per_task, top=l == num_layers - 1, first=l == 0)
            layers.append(GatedExpertLayer(in_features if l == 0 else expert_dim, expert_dim, **spec,
                                           **_layer_kwargs(expert_kind, expert_hidden, expert_kwargs), rngs=rngs))
        self.layers = nnx.List(layers)
        self._finish(names, range(len(names)), expert_dim, tower_hidden, rngs)


class CGC(PLE):
    """Customized gate control: one PLE layer (task gates over own + shared experts)."""

    def __init__(self, in_features: int, tasks: Sequence, *, num_shared: int = 2, experts_per_task: int = 1,
                 **kwargs):
        super().__init__(in_features, tasks, num_layers=1, num_shared=num_shared,
                         experts_per_task=experts_per_task, **kwargs)


def check_task_groups(task_groups, names) -> tuple:
    """``task_groups`` (list of lists of task names) must partition the tasks."""
    groups = tuple(tuple(g) for g in task_groups)
    flat = [t for g in groups for t in g]
    if any(len(g) == 0 for g in groups):
        raise ValueError(f"task groups must be non-empty; got {[list(g) for g in groups]}")
    unknown = sorted(set(flat) - set(names))
    dup = sorted({t for t in flat if flat.count(t) > 1})
    missing = [t for t in names if t not in flat]
    if unknown or dup or missing:
        raise ValueError(f"task_groups must put every task in exactly one group; tasks {list(names)}, "
                         f"groups {[list(g) for g in groups]}: unknown {unknown}, in several groups {dup}, "
                         f"in no group {missing}")
    return groups


class HoME(_GatedArchitecture):
    """Hierarchy of multi-gate experts (Kuaishou). All experts are Linear -> LayerNorm -> Swish.

    Meta layer (``meta_layer=True``): global shared experts + ``experts_per_group`` experts per
    task group; one gate per group (sees shared + its group's experts) and one global gate
    (sees all). Task layer: global shared experts (reading the global output), group experts
    (reading their group's output), ``experts_per_task`` experts per task (reading its
    group's output); task t's gate sees exactly the shared experts, its group's experts and
    its own experts (masked softmax: exact zeros elsewhere). ``self_gate``: a second softmax
    over a gate's own experts (task experts; group experts in the meta layer) is added as a
    residual. ``feature_gate_rank > 0``: each expert's input is ``x * 2 sigmoid(x B A)``.
    """

    def __init__(self, in_features: int, tasks: Sequence, task_groups: Sequence[Sequence[str]], *,
                 num_shared: int = 1, experts_per_group: int = 1, experts_per_task: int = 1,
                 expert_dim: int = 16, feature_gate_rank: int = 4, self_gate: bool = True, meta_layer: bool = True,
                 tower_hidden: Sequence[int] = (), expert_kind: str = "lns", expert_hidden: int | None = None,
                 expert_kwargs: dict | None = None, rngs: nnx.Rngs):
        names = _names(tasks)
        groups = check_task_groups(task_groups, names)
        n_groups = len(groups)
        group_of = {t: g for g, members in enumerate(groups) for t in members}
        if min(num_shared, experts_per_group, experts_per_task) < 0 or num_shared + experts_per_group == 0:
            raise ValueError("HoME needs num_shared, experts_per_group, experts_per_task >= 0 and at least one "
                             f"shared or group expert; got {num_shared}, {experts_per_group}, {experts_per_task}")
        common = dict(feature_gate_rank=feature_gate_rank, **_layer_kwargs(expert_kind, expert_hidden, expert_kwargs))
        shared_labels = [f"shared:{i}" for i in range(num_shared)]
        layers = []
        d = in_features
        if meta_layer:
            labels, owner = list(shared_labels), [None] * num_shared
            for g in range(n_groups):
                labels += [f"group:{g}:{i}" for i in range(experts_per_group)]
                owner += [g] * experts_per_group
            visible = [[o is None or o == g for o in owner] for g in range(n_groups)] + [[True] * len(owner)]
            own = [[o == g for o in owner] for g in range(n_groups)] + [[False] * len(owner)]
            layers.append(GatedExpertLayer(
                d, expert_dim, expert_streams=[0] * len(owner), gate_streams=[0] * (n_groups + 1), visible=visible,
                own=own if self_gate else None, expert_labels=labels,
                gate_labels=[f"group:{g}" for g in range(n_groups)] + ["shared"], rngs=rngs, **common))
            d = expert_dim
        stream = (lambda g: g) if meta_layer else (lambda g: 0)
        glob = n_groups if meta_layer else 0
        labels, owner, streams = list(shared_labels), [("shared",)] * num_shared, [glob] * num_shared
        for g in range(n_groups):
            labels += [f"group:{g}:{i}" for i in range(experts_per_group)]
            owner += [("group", g)] * experts_per_group
            streams += [stream(g)] * experts_per_group
        for t in names:
            labels += [f"task:{t}:{i}" for i in range(experts_per_task)]
            owner += [("task", t)] * experts_per_task
            streams += [stream(group_of[t])] * experts_per_task
        visible = [[o == ("shared",) or o == ("group", group_of[t]) or o == ("task", t) for o in owner] for t in names]
        own = [[o == ("task", t) for o in owner] for t in names]
        layers.append(GatedExpertLayer(
            d, expert_dim, expert_streams=streams, gate_streams=[stream(group_of[t]) for t in names], visible=visible,
            own=own if self_gate else None, expert_labels=labels, gate_labels=list(names), rngs=rngs, **common))
        self.task_groups = groups
        self.layers = nnx.List(layers)
        self._finish(names, range(len(names)), expert_dim, tower_hidden, rngs)


ARCHITECTURES = {"one_gate_moe": OneGateMoE, "mmoe": MMoE, "cgc": CGC, "ple": PLE, "home": HoME}


def build_architecture(name: str, in_features: int, tasks: Sequence, *, rngs: nnx.Rngs, **kwargs):
    """Build a registered architecture by name (kwargs are its hyper-parameters)."""
    if name not in ARCHITECTURES:
        from mtl.nn.encoders import unknown_name_error
        raise unknown_name_error("MoE architecture", name, ARCHITECTURES)
    return ARCHITECTURES[name](int(in_features), tasks, rngs=rngs, **kwargs)
