"""``MoEMultiTaskModel``: an MoE architecture plus one head per task, called like
``mtl.nn.MultiTaskModel`` (``model(x) -> {task: prediction}``), with gate diagnostics."""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from mtl.nn.moe.architectures import build_architecture
from mtl.nn.multitask import TaskHeads, build_heads
from mtl.tasks import Task, TaskSet


class MoEMultiTaskModel(TaskHeads, nnx.Module):
    """``architecture``: an instance from ``mtl.nn.moe.architectures`` (or any module with
    ``task_names``, ``out_features`` and ``__call__(x) -> ({task: features}, aux)``).
    ``encoder`` (optional) maps raw inputs to ``[B, D]`` first; without one, inputs are
    flattened to ``[B, D]``.

    * ``model(x) -> {task: prediction}``
    * ``model.features(x) -> {task: [B, h]}``; ``model.heads_from_features(feats)``
    * ``model.forward_with_aux(x) -> (predictions, aux)`` (gate probabilities per layer)
    * ``model.gates(x)`` -> diagnostics (see ``gate_diagnostics``)
    """

    def __init__(self, architecture: nnx.Module, tasks: Sequence[Task], *, encoder: nnx.Module | None = None,
                 rngs: nnx.Rngs):
        # a plain tuple: a TaskSet (tuple subclass) attribute breaks nnx.jit's graph traversal
        self.task_specs = tuple(TaskSet(tasks))
        if tuple(architecture.task_names) != tuple(self.tasks.names):
            raise ValueError(f"the architecture was built for tasks {list(architecture.task_names)} "
                             f"but the model gets tasks {self.tasks.names} (same names, same order)")
        self.encoder = encoder
        self.architecture = architecture
        d = architecture.out_features
        self.heads = build_heads(self.task_specs, d, rngs)

    def _inputs(self, x):
        if self.encoder is not None:
            return self.encoder(x)
        return x.reshape(x.shape[0], -1)

    def features_with_aux(self, x):
        return self.architecture(self._inputs(x))

    def features(self, x) -> dict:
        return self.features_with_aux(x)[0]

    def heads_from_features(self, feats: dict) -> dict:
        return {t.name: self.heads[t.name](feats[t.name]) for t in self.tasks}

    def forward_with_aux(self, x):
        feats, aux = self.features_with_aux(x)
        return self.heads_from_features(feats), aux

    def __call__(self, x) -> dict:
        return self.forward_with_aux(x)[0]

    def gates(self, x) -> dict:
        return gate_diagnostics(self.architecture, self.features_with_aux(x)[1])


def gate_diagnostics(architecture, aux) -> dict:
    """Diagnostics from one forward's ``aux`` (all arrays, keyed by name):

    * ``task_gate_probs[task]``: ``[B, E]`` probabilities of the top-layer gate the task reads;
    * ``shared_expert_share[task]``: ``[S]`` for each shared expert (label ``shared:i``) of the
      top layer, the task's fraction of that expert's total gate mass over the batch (the
      column sums over tasks are 1);
    * ``zero_fraction[f"layer{l}"]``: ``[E]`` fraction of exactly-zero post-nonlinearity
      activations per expert (dead units);
    * ``gate_probs[f"layer{l}"][gate_label]``: ``[B, E]`` every gate's probabilities.

    Expert order is ``architecture.layers[l].expert_labels``.
    """
    layers = architecture.layers
    top, top_aux = layers[-1], aux["layers"][-1]
    names = tuple(architecture.task_names)
    task_probs = {t: top_aux["gate_probs"][architecture.task_gate[i]] for i, t in enumerate(names)}
    shared = [i for i, lab in enumerate(top.expert_labels) if lab.startswith("shared")]
    share = {}
    if shared:
        mass = jnp.stack([task_probs[t][:, shared].sum(0) for t in names])   # [T, S]
        total = mass.sum(0, keepdims=True)
        frac = jnp.where(total > 0, mass / jnp.where(total > 0, total, 1.0), 0.0)
        share = {t: frac[i] for i, t in enumerate(names)}
    zero = {f"layer{l}": jnp.mean(a["activations"] == 0, axis=(1, 2)) for l, a in enumerate(aux["layers"])}
    probs = {f"layer{l}": {lab: a["gate_probs"][g] for g, lab in enumerate(layer.gate_labels)}
             for l, (layer, a) in enumerate(zip(layers, aux["layers"]))}
    return {"task_gate_probs": task_probs, "shared_expert_share": share, "zero_fraction": zero, "gate_probs": probs}


def build_moe_model(name: str, tasks: Sequence[Task], in_features: int | None = None, *,
                    encoder: nnx.Module | None = None, rngs: nnx.Rngs, **kwargs) -> MoEMultiTaskModel:
    """``build_moe_model("mmoe", tasks, in_features=32, rngs=..., num_experts=4)``; with an
    ``encoder`` the architecture's input size is the encoder's ``out_features``."""
    if in_features is None:
        if encoder is None:
            raise ValueError("build_moe_model needs in_features (or an encoder with out_features)")
        in_features = encoder.out_features
    tasks = TaskSet(tasks)
    arch = build_architecture(name, in_features, tasks.names, rngs=rngs, **kwargs)
    return MoEMultiTaskModel(arch, tasks, encoder=encoder, rngs=rngs)
