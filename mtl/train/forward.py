"""The model side of the train step: pure functions of (params, rest, batch).

:class:`Forward` is everything a gradient route needs to know about the model: the
per-task losses (with the model's auxiliary loss, if any), and for models with a shared
representation (``features`` / ``heads_from_features`` / ``heads``, ``arch="shared"``)
the encoder and heads separately. Routes (:mod:`mtl.train.routes`) only call these; a
model-side extension (a wrapper module, a width sampler) changes what ``losses`` computes,
never the routes.
"""
from __future__ import annotations

import contextlib
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
        # a model that defines its own training objective (e.g. the sandwich rule over widths)
        self.own_losses = hasattr(abstract_model, "train_losses")
        self.has_aux = hasattr(abstract_model, "forward_with_aux") or self.own_losses
        self.has_features = not self.own_losses and all(
            hasattr(abstract_model, a) for a in ("features", "heads_from_features", "heads"))
        self.pools_routing_counts = bool(getattr(abstract_model, "pools_routing_counts", False))
        # a model with its own objective may declare ``train_variants`` = G static variants of it
        # (e.g. the sandwich rule's groups of widths): the step draws one per step and traces its
        # whole gradient route once per variant (mtl.train.step); ``train_losses`` gets ``variant=``
        self.variants = int(getattr(abstract_model, "train_variants", 1)) if self.own_losses else 1
        if self.variants < 1:
            raise ValueError(f"{type(abstract_model).__name__}.train_variants must be >= 1; got {self.variants}")
        self._variant = 0

    @contextlib.contextmanager
    def at_variant(self, v: int):
        """Trace the model's objective at static variant ``v`` inside this block (default 0)."""
        old, self._variant = self._variant, int(v)
        try:
            yield
        finally:
            self._variant = old

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
        """:meth:`losses` of a merged ``model`` (the same triple).

        A model with ``train_losses(batch, tasks) -> (losses [T], aux_loss)`` defines its own
        training objective (a loss combinator, e.g. the sandwich rule over sampled widths with
        distillation as the auxiliary loss); its randomness lives in its own ``nnx.Rngs``
        (non-parameter state, threaded through the step and checkpointed). Every route then
        treats it like any model: the per-task losses are weighted, the aux loss added."""
        if self.own_losses:
            kw = {"variant": self._variant} if self.variants > 1 else {}
            losses, aux_loss = model.train_losses(batch, self.tasks, **kw)
            return jnp.asarray(losses, jnp.float32), jnp.asarray(aux_loss, jnp.float32), self.rest_of(model)
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
    def single_representation(self, params, rest, batch) -> bool:
        """The model has one shared representation Z = ``features(x)`` read by every head (not
        per-task features, as MMoE's, nor an auxiliary loss): per-task gradients can then
        backpropagate through the heads once (:meth:`head_z_grads`). Decided from shapes."""
        if not self.has_features or self.has_aux:
            return False
        z = jax.eval_shape(lambda p: self.model(p, rest).features(batch["inputs"]), params)
        return isinstance(z, jax.ShapeDtypeStruct)

    def encoder_vjp(self, shared, heads, layout, rest, inputs):
        """(Z, pullback of Z w.r.t. the shared parameters, the state after the encoder)."""
        def encode(s):
            model = self.model(join(s, heads, layout), rest)
            return model.features(inputs), self.rest_of(model)
        return jax.vjp(encode, shared, has_aux=True)

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

        # Differentiate w.r.t. T separate copies, not slices of one [T, ...] array: the
        # transpose of a slice pads its cotangent to the whole array, and summing those T
        # padded arrays cost ~T²·|Z| writes (128 ms of a 330 ms step at T = 40, measured).
        zz = tuple(zs[i] for i in range(zs.shape[0]))
        (_, (losses, new_rest)), (gh, jzs) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(heads, zz)
        return losses, jnp.stack(jzs), gh, new_rest

    def scale_heads(self, gh, scale):
        """Multiply head ``t``'s gradient (``heads/<task name>/...``) by ``scale[t]``."""
        index = {t.name: i for i, t in enumerate(self.tasks)}

        def f(path, g):
            name = getattr(path[1], "key", getattr(path[1], "name", None)) if len(path) > 1 else None
            if name not in index:
                raise ValueError(f"head gradient at {jax.tree_util.keystr(path)} does not belong to a task")
            return g * scale[index[name]].astype(g.dtype)

        return jax.tree_util.tree_map_with_path(f, gh)
