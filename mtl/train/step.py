"""The train state and the jitted, sharded train / eval steps.

The model is kept functional inside ``jax.jit``: ``nnx.split`` once gives a graph
definition (static) and two states, parameters and the rest; each step merges them
into a model, computes the per-task losses, differentiates ``Σ_t w_t L_t`` and applies
the optimizer. The step has explicit in/out shardings (derived from the logical axis
rules) and donates the state.

A step whose losses or gradients are not finite applies no update: the state stays the
last good one, and ``nonfinite_count`` / ``first_nonfinite`` record what happened so
the loop can stop (naming step and task) or carry on, as configured.

Multi-task optimisation (``optim=`` / ``config.optim``): the per-task gradient machinery
lives in :mod:`mtl.train.aggregate`; the aggregator's state is part of ``TrainState``
(``agg_state``, checkpointed with everything else), and so is the fixed sparse-training
mask (``sparse_mask``; ``()`` when off). Plain EW keeps the original single-backward path.
A second jitted step, ``train_step_diag``, also returns gradient diagnostics (per-task
gradient norms, pairwise cosines, conflict fraction); the loop calls it every
``optim.diagnostics_every`` steps. Both compute the same update.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mtl import sharding as shd
from mtl.optim.sparse import apply_mask, topk_mask
from mtl.train.aggregate import OptimSpec, TaskGradients, join, split_shared
from mtl.tasks import Task, losses_from_outputs, metric_sums


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_count: jax.Array
    first_nonfinite: jax.Array  # (step, task index; -1 = a gradient only), or (-1, -1)
    agg_state: Any = ()
    sparse_mask: Any = ()


def task_losses(model, batch, tasks: Sequence[Task] | None = None):
    """Per-task masked mean losses ``[T]`` of ``model`` on ``batch`` (task order of the model)."""
    tasks = model.tasks if tasks is None else tasks
    return losses_from_outputs(tasks, model(batch["inputs"]), batch)


class Steps:
    """Everything needed to init, train and evaluate one model on one mesh.

    ``factory(rngs) -> model`` builds the model; ``tx`` is an optax optimizer.
    """

    def __init__(self, factory: Callable, tasks: Sequence[Task], tx: optax.GradientTransformation, mesh,
                 rules=None, loss_weights=None, seed: int = 0, optim=None):
        self.factory, self.tasks, self.tx, self.mesh = factory, list(tasks), tx, mesh
        self.optim = OptimSpec.from_config(optim)
        self.rules = shd.normalize_rules(rules if rules is not None else shd.DEFAULT_RULES)
        self.seed = int(seed)
        w = np.ones(len(self.tasks), np.float32) if loss_weights is None else np.asarray(loss_weights, np.float32)
        if w.shape != (len(self.tasks),):
            raise ValueError(f"loss_weights must have one entry per task ({len(self.tasks)}); got {w.shape}")
        self.loss_weights = w
        if loss_weights is not None and not self.optim.is_plain_ew:
            raise ValueError("train.loss_weights are fixed EW weights; with optim.aggregator="
                             f"{self.optim.aggregator!r} leave them empty")
        with nnx.use_eager_sharding(False):
            abstract_model = nnx.eval_shape(lambda: factory(nnx.Rngs(self.seed)))
        self.graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
        self.grads = TaskGradients(self.optim, self.tasks, self.graphdef, self._losses,
                                   has_aux=hasattr(abstract_model, "forward_with_aux"),
                                   has_features=all(hasattr(abstract_model, a) for a in
                                                    ("features", "heads_from_features", "heads")))
        self.param_shardings = shd.state_shardings(abs_params, mesh, self.rules)
        self._init = jax.jit(self._init_fn)
        with self.activate():
            self._init_compiled = self._init.lower().compile()
        self.state_shardings = self._init_compiled.output_shardings
        self.abstract_state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            jax.eval_shape(self._init_fn), self.state_shardings)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, None),
                                  out_shardings=(self.state_shardings, None), donate_argnums=(0,))
        self.train_step_diag = jax.jit(lambda s, b: self._train_step(s, b, diagnostics=True),
                                       in_shardings=(self.state_shardings, None),
                                       out_shardings=(self.state_shardings, None), donate_argnums=(0,))
        rep = NamedSharding(mesh, P())
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_shardings.params,
                                                                self.state_shardings.rest, None),
                                 out_shardings=rep)
        self.predict = jax.jit(self._predict, in_shardings=(self.state_shardings.params,
                                                            self.state_shardings.rest, None))

    # ------------------------------------------------------------------ helpers
    def activate(self):
        """Context: this mesh and these logical rules (for tracing and running the steps)."""
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(shd.logical_rules(self.rules))
        return stack

    def batch_sharding(self, ndim: int) -> NamedSharding:
        return shd.batch_sharding(self.mesh, ndim, self.rules)

    def model(self, params, rest=None):
        """A concrete ``nnx`` model with these parameters (e.g. ``steps.model(state.params)``)."""
        if rest is None:
            rest = self.abstract_state.rest
            if jax.tree.leaves(rest):
                raise ValueError("this model has non-parameter state; pass rest=state.rest")
        return nnx.merge(self.graphdef, params, rest)

    # ------------------------------------------------------------------ pure functions
    def _init_fn(self):
        with nnx.use_eager_sharding(False):
            model = self.factory(nnx.Rngs(self.seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        params = jax.lax.with_sharding_constraint(params, self.param_shardings)
        sparse = ()
        if self.optim.sparse_fraction > 0:
            shared = split_shared(params)[0]
            sparse = topk_mask(shared, self.optim.sparse_fraction, self.optim.sparse_criterion)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                          opt_state=self.tx.init(params),
                          rng=jax.random.key_data(jax.random.key(self.seed)),
                          nonfinite_count=jnp.zeros((), jnp.int32),
                          first_nonfinite=jnp.full((2,), -1, jnp.int32),
                          agg_state=self.grads.init_state(), sparse_mask=sparse)

    def _losses(self, params, rest, batch):
        """(per-task losses [T], auxiliary loss scalar, updated non-parameter state).

        A model with ``forward_with_aux(x) -> (outputs, aux)`` may put an auxiliary
        objective (already weighted, e.g. an MoE load-balancing loss) in ``aux["loss"]``;
        it is added to the training objective as is, outside the per-task weighting.
        """
        model = nnx.merge(self.graphdef, params, rest)
        aux_loss = jnp.zeros((), jnp.float32)
        if hasattr(model, "forward_with_aux"):
            outputs, aux = model.forward_with_aux(batch["inputs"])
            if isinstance(aux, dict) and "loss" in aux:
                aux_loss = jnp.asarray(aux["loss"], jnp.float32)
        else:
            outputs = model(batch["inputs"])
        losses = losses_from_outputs(self.tasks, outputs, batch)
        new_rest = nnx.split(model, nnx.Param, ...)[2]
        return losses, aux_loss, new_rest

    def _train_step(self, state: TrainState, batch, diagnostics: bool = False):
        agg_state, extras = state.agg_state, {}
        if self.optim.is_plain_ew and not diagnostics:
            w = jnp.asarray(self.loss_weights)

            def objective(params):
                losses, aux_loss, new_rest = self._losses(params, state.rest, batch)
                return jnp.sum(w * losses) + aux_loss, (losses, aux_loss, new_rest)

            (total, (losses, aux_loss, new_rest)), grads = jax.value_and_grad(objective, has_aux=True)(
                state.params)
        else:
            key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            mask = state.sparse_mask if self.optim.sparse_fraction > 0 else None
            grads, losses, aux_loss, new_rest, w, agg_state, extras = self.grads(
                state.params, state.rest, batch, state.agg_state, key, state.step,
                diagnostics=diagnostics, sparse_mask=mask)
            if self.optim.is_plain_ew:
                w = jnp.asarray(self.loss_weights) * w
            total = jnp.sum(jnp.where(jnp.isfinite(w), w, 0.0) * losses) + aux_loss
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        if self.optim.sparse_fraction > 0:  # only the masked shared entries (and the heads) move
            shared_u, heads_u, keys = split_shared(updates)
            updates = join(apply_mask(shared_u, state.sparse_mask), heads_u, keys)
        params = optax.apply_updates(state.params, updates)
        gnorm = optax.tree.norm(grads)
        finite_losses = jnp.isfinite(losses)
        ok = (jnp.all(finite_losses) & jnp.isfinite(gnorm) & jnp.isfinite(aux_loss)
              & jnp.all(jnp.isfinite(w)))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        bad_task = jnp.where(jnp.all(finite_losses), -1, jnp.argmin(finite_losses)).astype(jnp.int32)
        first = jnp.where((state.first_nonfinite[0] < 0) & ~ok,
                          jnp.stack([state.step, bad_task]), state.first_nonfinite)
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                               rest=keep(new_rest, state.rest), opt_state=keep(opt_state, state.opt_state),
                               rng=state.rng, nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
                               first_nonfinite=first, agg_state=keep(agg_state, state.agg_state),
                               sparse_mask=state.sparse_mask)
        metrics = {"loss": total, "losses": losses, "aux_loss": aux_loss, "grad_norm": gnorm, "ok": ok,
                   "weights": jnp.broadcast_to(w, losses.shape), **extras}
        return new_state, metrics

    def _eval_step(self, params, rest, batch):
        model = nnx.merge(self.graphdef, params, rest)
        return metric_sums(self.tasks, model(batch["inputs"]), batch)

    def _predict(self, params, rest, inputs):
        return nnx.merge(self.graphdef, params, rest)(inputs)

    # ------------------------------------------------------------------ public API
    def init(self) -> TrainState:
        with self.activate():
            return self._init_compiled()

    def put_batch(self, batch):
        """Host numpy batch (whole global batch, single process) -> sharded device arrays."""
        return jax.tree.map(lambda x: jax.device_put(np.asarray(x), self.batch_sharding(np.ndim(x))), batch)

    def step(self, state: TrainState, batch, diagnostics: bool = False):
        """One train step; ``diagnostics=True`` also returns ``cosines`` (T, T),
        ``conflict_fraction`` and ``grad_norms`` (T,) of the per-task gradients (on the
        shared parameters or representation, per ``optim.grad_on``)."""
        with self.activate():
            # methods on the Jacobian path already return the diagnostics: no second compile
            diag = diagnostics and not self.grads.always_jacobian
            return (self.train_step_diag if diag else self.train_step)(state, batch)

    def evaluate(self, state: TrainState, batches) -> dict:
        """``{task: {metric: value}}`` (incl. ``loss``) over all ``batches`` (masked rows ignored)."""
        total = None
        with self.activate():
            for b in batches:
                s = self.eval_step(state.params, state.rest, b)
                total = s if total is None else jax.tree.map(jnp.add, total, s)
        if total is None:
            raise ValueError("evaluation got no batches")
        total = jax.device_get(total)
        return {t: {m: float(sc[0] / max(sc[1], 1.0)) for m, sc in d.items()} for t, d in total.items()}
