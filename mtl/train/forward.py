"""The model side of the train step: pure functions of (params, rest, batch).

:class:`Forward` is everything a gradient route needs to know about the model: the
per-task losses (with the model's auxiliary loss, if any), and for models with a shared
representation (``features`` / ``heads_from_features`` / ``heads``, ``arch="shared"``)
the encoder and heads separately. Routes (:mod:`mtl.train.routes`) only call these; a
model-side extension (a wrapper module, a width sampler) changes what ``losses`` computes,
never the routes.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.tasks import Task, losses_from_outputs
from mtl.train.grad_tools import join

# key of a micro-batch dict holding routing counts pooled over the step's micro-batches
ROUTING_COUNTS = "_routing_counts"


class Forward:
    """Pure forward functions of one model definition ``graphdef`` on ``tasks``."""

    def __init__(self, graphdef, tasks: Sequence[Task], abstract_model):
        self.graphdef, self.tasks = graphdef, list(tasks)
        self.has_aux = hasattr(abstract_model, "forward_with_aux")
        self.has_features = all(hasattr(abstract_model, a) for a in ("features", "heads_from_features", "heads"))
        self.pools_routing_counts = bool(getattr(abstract_model, "pools_routing_counts", False))

    def model(self, params, rest):
        return nnx.merge(self.graphdef, params, rest)

    @staticmethod
    def rest_of(model):
        return nnx.split(model, nnx.Param, ...)[2]

    def losses(self, params, rest, batch):
        """(per-task losses [T], auxiliary loss scalar, updated non-parameter state).

        A model with ``forward_with_aux(x) -> (outputs, aux)`` may put an auxiliary
        objective (already weighted, e.g. an MoE load-balancing loss) in ``aux["loss"]``;
        it is added to the training objective as is, outside the per-task weighting.
        ``batch[ROUTING_COUNTS]`` (set by gradient accumulation only) is passed on as
        ``forward_with_aux(x, routing_counts=...)``.
        """
        return self.losses_of_model(self.model(params, rest), batch)

    def losses_of_model(self, model, batch):
        """:meth:`losses` of a merged ``model`` (the same triple)."""
        aux_loss = jnp.zeros((), jnp.float32)
        counts = batch.get(ROUTING_COUNTS) if isinstance(batch, dict) else None
        if counts is not None:  # pooled over a step's micro-batches (gradient accumulation)
            outputs, aux = model.forward_with_aux(batch["inputs"], routing_counts=counts)
            aux_loss = jnp.asarray(aux["loss"], jnp.float32)
        elif self.has_aux:
            outputs, aux = model.forward_with_aux(batch["inputs"])
            if isinstance(aux, dict) and "loss" in aux:
                aux_loss = jnp.asarray(aux["loss"], jnp.float32)
        else:
            outputs = model(batch["inputs"])
        losses = losses_from_outputs(self.tasks, outputs, batch)
        return losses, aux_loss, self.rest_of(model)

    def routing_counts(self, params, rest, inputs):
        """This batch's routing counts (no gradient), for pooling over micro-batches."""
        _, aux = self.model(params, rest).forward_with_aux(inputs)
        return jax.lax.stop_gradient(aux["routing_counts"])

    # ------------------------------------------------------------------ shared representation
    def head_losses(self, heads_params, shared, layout, rest, batch, zs):
        """Per-task losses when head t reads ``zs[t]`` (Z broadcast to T copies), so one
        backward pass of their sum gives every ∂L_t/∂Z (row t of the cotangent of ``zs``)
        and every head's own gradient. Returns (losses, new_rest)."""
        model = self.model(join(shared, heads_params, layout), rest)
        outs = {t.name: model.heads[t.name](zs[i]) for i, t in enumerate(self.tasks)}
        return losses_from_outputs(self.tasks, outs, batch), self.rest_of(model)

    def head_z_grads(self, shared, heads, layout, rest1, batch, zs):
        """All per-task gradients ∂L_t/∂Z in ONE backward pass through the heads (see
        :meth:`head_losses`): one forward and one backward of every head, instead of T
        backward passes through all heads. Returns (losses, jz [T, ...], head grads (plain),
        new_rest)."""
        def total(h, zz):
            losses, new_rest = self.head_losses(h, shared, layout, rest1, batch, zz)
            return jnp.sum(losses), (losses, new_rest)

        (_, (losses, new_rest)), (gh, jz) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(heads, zs)
        return losses, jz, gh, new_rest

    def scale_heads(self, gh, scale):
        """Multiply head ``t``'s gradient (``heads/<task name>/...``) by ``scale[t]``."""
        index = {t.name: i for i, t in enumerate(self.tasks)}

        def f(path, g):
            name = getattr(path[1], "key", getattr(path[1], "name", None)) if len(path) > 1 else None
            if name not in index:
                raise ValueError(f"head gradient at {jax.tree_util.keystr(path)} does not belong to a task")
            return g * scale[index[name]].astype(g.dtype)

        return jax.tree_util.tree_map_with_path(f, gh)
