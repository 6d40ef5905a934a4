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
mask (``sparse_mask``; ``()`` when off; with ``optim.sparse_criterion="saliency"`` it is
chosen on the first step that trains, see ``Steps._sparse_mask``). Plain EW keeps the
original single-backward path (fixed ``train.loss_weights`` scale EW's weights, also on
the diagnostics step). FAMO's default same-batch update re-evaluates the step's batch after
the update (one extra forward pass).
A second jitted step, ``train_step_diag``, also returns gradient diagnostics (per-task
gradient norms, pairwise cosines, conflict fraction); the loop calls it every
``optim.diagnostics_every`` steps. Both compute the same update.

Gradient accumulation (``accum_steps=K`` / ``train.accum_steps``; 1 = off, the original
code path untouched). The global batch of B samples is split into K micro-batches of B/K,
processed one after another by a ``jax.lax.scan`` inside the one jitted step (activation
memory scales with B/K), gradients summed, then one optimizer update; B must be divisible
by K (else a ValueError naming both). Details:

* **Split.** Micro-batch m holds samples ``m, m+K, m+2K, ...`` (a strided split: reshape
  ``[B] -> [B/K, K]``, then transpose). The batch arrives sharded over the data axes in
  contiguous blocks, so when B is divisible by K x (number of batch shards) every device
  already holds B/(K·shards) samples of *every* micro-batch: the split moves no data and
  each micro-batch stays sharded over all devices (a contiguous ``[K, B/K]`` split would
  put each micro-batch on 1/K of the devices). Otherwise XLA reshards (correct, slower).
* **Partial labels: exact.** Task losses are masked means, so micro-batch m's loss of task
  t is weighted by ``n_t^m / n_t`` (its share of the task's labelled samples in the whole
  batch; no labels anywhere -> weight 0). The accumulated gradient, and the reported
  losses, then equal the full-batch ones whatever the split of labels (up to float
  rounding), not only when every micro-batch has the same label counts.
* **Auxiliary losses** (``aux["loss"]``, e.g. an MoE LBL) are averaged over micro-batches.
  A model with ``pools_routing_counts`` (M3ViT with ``lbl="global"``) gets the exact
  global-batch LBL: a first, forward-only scan over the micro-batches collects routing
  counts, and the gradient scan injects their sum (``forward_with_aux(x,
  routing_counts=...)``), so the loss is ``mean_m E sum_i f^pool_i p^m_i`` =
  ``accumulated_load_balancing_loss(pooled=True)``. Cost: one extra forward pass over the
  global batch per step (~1/3 more compute; XLA prunes what the counts do not need), only
  when K > 1. The counting pass must route as the gradient pass does (true for M3ViT,
  whose forward is deterministic). ``lbl="micro"`` keeps per-micro-batch f. Capacity-limited
  routing computes expert capacity per forward, i.e. per micro-batch, so with token drops
  later layers (and their routing) can differ from a full-batch step; with no capacity
  limit the pooled accumulated loss and gradient equal the full-batch ones.
* **Non-parameter state** (``rest``) is threaded through the micro-batches in order.
* **Aggregators: exact for every method** (``TaskGradients.accumulated`` in
  :mod:`mtl.train.aggregate` holds the passes; this module only dispatches). Plain EW
  (no diagnostics) is the single scan above. Other methods need the whole batch's losses or
  per-task gradients before they can weight anything, so they take more passes, each a
  ``lax.scan`` with one micro-batch's activation memory: loss-only methods (RLW, UW, DWA,
  FAMO) a forward-only scan for the full-batch losses (not for EW/RLW, whose weights do not
  read them), then the gradient scan of Σ_t w_t L_t with w fixed; Gramian methods on
  ``grad_on="params"`` one scan summing the label-share-scaled Jacobian rows (memory of
  one J, as ``jacobian="keep"`` at K = 1); on ``grad_on="representation"`` a scan
  accumulating G = Σ_m G_m (rows of Z of different micro-batches are disjoint) and a scan
  re-running the encoder to pull Σ_t w_t ∂L_t/∂Z back. The aggregator state advances once
  per step; FAMO's same-batch post update re-evaluates the whole batch by a forward-only
  scan; the saliency sparse mask is chosen from the whole batch's accumulated gradient.
  Weights, update and state equal the K = 1 step's up to float rounding. Refused at
  ``Steps`` construction (a ValueError naming the setting, before a workdir is written):
  F-MTL (``fmtl_rho > 0``: T more gradients at task-specific perturbed parameters),
  Rep-MTL (``rep_mtl > 0``: its InfoNCE couples every sample of the batch) and
  ``jacobian="stream"`` for Gramian methods or with diagnostics (G of a sum of
  micro-batch Jacobians is not the sum of their Gramians; use ``"keep"``).
* **Diagnostics** (``train_step_diag``) under accumulation come from the full-batch G (the
  accumulated Jacobian or representation Gramian), as at K = 1; the update is the same.
* Non-finite checks see the accumulated losses, aux loss and gradient: a NaN/inf in any
  micro-batch marks the whole step bad (no update), as without accumulation.
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
from mtl.train.accumulate import scan_grads
from mtl.train.aggregate import OptimSpec, TaskGradients
from mtl.train.grad_tools import join, label_shares, present_mask, split_shared
from mtl.tasks import Task, losses_from_outputs, metric_sums

# key of a micro-batch dict holding routing counts pooled over the step's micro-batches
ROUTING_COUNTS = "_routing_counts"


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
                 rules=None, loss_weights=None, seed: int = 0, optim=None, accum_steps: int = 1):
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
        self.accum_steps = int(accum_steps)
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps (train.accum_steps) must be >= 1; got {accum_steps}")
        with nnx.use_eager_sharding(False):
            abstract_model = nnx.eval_shape(lambda: factory(nnx.Rngs(self.seed)))
        # pooled global-batch LBL under accumulation (see the module docstring)
        self.pool_routing = self.accum_steps > 1 and bool(getattr(abstract_model, "pools_routing_counts", False))
        self.graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
        self.grads = TaskGradients(self.optim, self.tasks, self.graphdef, self._losses,
                                   has_aux=hasattr(abstract_model, "forward_with_aux"),
                                   has_features=all(hasattr(abstract_model, a) for a in
                                                    ("features", "heads_from_features", "heads")),
                                   loss_weights=None if loss_weights is None else self.loss_weights)
        self.grads.check_accumulation(self.accum_steps)   # what cannot be exact is refused here
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
            if self.optim.sparse_criterion == "saliency":  # chosen on the first good step
                sparse = jax.tree.map(lambda p: jnp.ones(p.shape, bool), shared)
            else:
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
        ``batch[ROUTING_COUNTS]`` (set by the accumulation step only) is passed on as
        ``forward_with_aux(x, routing_counts=...)``.
        """
        model = nnx.merge(self.graphdef, params, rest)
        aux_loss = jnp.zeros((), jnp.float32)
        counts = batch.get(ROUTING_COUNTS) if isinstance(batch, dict) else None
        if counts is not None:  # pooled over a step's micro-batches (gradient accumulation)
            outputs, aux = model.forward_with_aux(batch["inputs"], routing_counts=counts)
            aux_loss = jnp.asarray(aux["loss"], jnp.float32)
        elif hasattr(model, "forward_with_aux"):
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
        k = self.accum_steps
        if self.optim.is_plain_ew and not diagnostics:
            w = jnp.asarray(self.loss_weights)
            if k > 1:
                grads, losses, aux_loss, new_rest = self.accumulated_gradients(state.params, state.rest, batch)
                total = jnp.sum(w * losses) + aux_loss
                return self._apply(state, grads, losses, aux_loss, new_rest, w, agg_state, extras, total)

            def objective(params):
                losses, aux_loss, new_rest = self._losses(params, state.rest, batch)
                return jnp.sum(w * losses) + aux_loss, (losses, aux_loss, new_rest)

            (total, (losses, aux_loss, new_rest)), grads = jax.value_and_grad(objective, has_aux=True)(
                state.params)
            return self._apply(state, grads, losses, aux_loss, new_rest, w, agg_state, extras, total, batch)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        mask, prev_mask = None, state.sparse_mask
        if self.optim.sparse_fraction > 0:
            state = state.replace(sparse_mask=self._sparse_mask(state, batch))
            mask = state.sparse_mask
        if k > 1:  # the aggregator's accumulated step (mtl.train.aggregate.TaskGradients.accumulated)
            micro = self.split_micro_batches(batch)
            grads, losses, aux_loss, new_rest, w, agg_state, extras = self.grads.accumulated(
                state.params, state.rest, micro, state.agg_state, key, state.step,
                prepare=self._micro_prepare(state.params, state.rest, micro), diagnostics=diagnostics,
                sparse_mask=mask)
        else:
            grads, losses, aux_loss, new_rest, w, agg_state, extras = self.grads(
                state.params, state.rest, batch, state.agg_state, key, state.step,
                diagnostics=diagnostics, sparse_mask=mask)
        total = jnp.sum(jnp.where(jnp.isfinite(w), w, 0.0) * losses) + aux_loss
        new_state, metrics = self._apply(state, grads, losses, aux_loss, new_rest, w, agg_state, extras,
                                         total, batch)
        if mask is not None:  # a non-finite step keeps the previous mask too
            new_state = new_state.replace(sparse_mask=jax.tree.map(
                lambda a, b: jnp.where(metrics["ok"], a, b), new_state.sparse_mask, prev_mask))
        return new_state, metrics

    def _sparse_mask(self, state, batch):
        """The sparse-training mask for this step. ``"magnitude"``: fixed at init.
        ``"saliency"``: top ``sparse_fraction`` of the shared entries by |θ ⊙ ∇_θ Σ_t L_t|
        (SNIP-style), from the first step that trains (every earlier step was non-finite,
        so none was kept: ``step == nonfinite_count``), on that step's batch; one more
        forward and backward pass, only then. Fixed from there on (it is in the state, so
        resume keeps it)."""
        if self.optim.sparse_criterion != "saliency":
            return state.sparse_mask

        def choose():
            if self.accum_steps > 1:  # the whole batch's gradient, accumulated over micro-batches
                g = self.grads.accumulated_sum_grad(state.params, state.rest, self.split_micro_batches(batch),
                                                    self._micro_constrain)
            else:
                g = jax.grad(lambda p: jnp.sum(self._losses(p, state.rest, batch)[0]))(state.params)
            shared, g_shared = split_shared(state.params)[0], split_shared(g)[0]
            return topk_mask(shared, self.optim.sparse_fraction, "saliency", grads=g_shared)

        return jax.lax.cond(state.step == state.nonfinite_count, choose, lambda: state.sparse_mask)

    def _apply(self, state, grads, losses, aux_loss, new_rest, w, agg_state, extras, total, batch=None):
        """The optimizer update (or none, for a non-finite step) and the step's metrics.

        ``batch`` (the step's own) is re-evaluated with the updated parameters when the
        aggregator's post-step update wants it (FAMO with ``update_on="same_batch"``)."""
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        if self.optim.sparse_fraction > 0:  # only the masked shared entries (and the heads) move
            shared_u, heads_u, keys = split_shared(updates)
            updates = join(apply_mask(shared_u, state.sparse_mask), heads_u, keys)
        params = optax.apply_updates(state.params, updates)
        if batch is not None and self.grads.same_batch_update:
            if self.accum_steps > 1:  # the whole batch again, forward only, one micro-batch at a time
                after = self.grads.accumulated_losses(params, new_rest, self.split_micro_batches(batch),
                                                      self._micro_constrain)
            else:
                after, _, _ = self._losses(params, new_rest, batch)
            agg_state = self.grads.post_update(agg_state, after, present_mask(self.tasks, batch))
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

    # ------------------------------------------------------------------ gradient accumulation
    def split_micro_batches(self, batch):
        """``[B, ...] -> [K, B/K, ...]`` for every array of ``batch`` (K = ``accum_steps``):
        micro-batch m holds samples ``m, m+K, ...`` (strided, so each micro-batch stays
        spread over all batch shards; see the module docstring)."""
        k = self.accum_steps
        sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(batch)}
        if len(sizes) != 1:
            raise ValueError(f"batch arrays have different leading sizes {sorted(sizes)}")
        (b,) = sizes
        if b % k:
            raise ValueError(f"the batch of {b} samples cannot be split into accum_steps={k} equal micro-batches "
                             f"({b} is not divisible by {k}); make train.batch_size a multiple of "
                             "train.accum_steps")

        def split(x):
            y = jnp.swapaxes(jnp.reshape(x, (b // k, k) + tuple(x.shape[1:])), 0, 1)
            spec = self.batch_sharding(x.ndim).spec
            return jax.lax.with_sharding_constraint(y, NamedSharding(self.mesh, P(None, *spec)))

        return jax.tree.map(split, batch)

    def _micro_constrain(self, mb):
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.batch_sharding(x.ndim)), mb)

    def _micro_prepare(self, params, rest, micro):
        """What every micro-batch goes through inside the accumulation scans: the batch
        sharding constraint, and the pooled routing counts when the model pools them."""
        if not self.pool_routing:
            return self._micro_constrain
        pooled = self.pooled_routing_counts(params, rest, micro)
        return lambda mb: {**self._micro_constrain(mb), ROUTING_COUNTS: pooled}

    def pooled_routing_counts(self, params, rest, micro):
        """Routing counts summed over the micro-batches ``micro`` ([K, B/K, ...]): a
        forward-only scan (no gradient) reading ``aux["routing_counts"]``."""
        def count(_, mb):
            model = nnx.merge(self.graphdef, params, rest)
            _, aux = model.forward_with_aux(self._micro_constrain(mb)["inputs"])
            return None, jax.lax.stop_gradient(aux["routing_counts"])

        _, counts = jax.lax.scan(count, None, {"inputs": micro["inputs"]})
        return jnp.sum(counts, axis=0)

    def accumulated_gradients(self, params, rest, batch):
        """(grads, losses [T], aux_loss, new_rest) of the EW objective ``Σ_t w_t L_t + aux``
        on ``batch``, accumulated over ``accum_steps`` micro-batches (module docstring):
        equal to the full-batch values for masked-mean task losses, with exact
        label-count weighting; ``aux`` is the mean over micro-batches (pooled LBL when the
        model pools routing counts)."""
        k = self.accum_steps
        micro = self.split_micro_batches(batch)
        scale, _ = label_shares(self.tasks, micro)
        prepare = self._micro_prepare(params, rest, micro)
        w = jnp.asarray(self.loss_weights)

        def objective(p, rest_m, mb, c):
            losses, aux_loss, new_rest = self._losses(p, rest_m, mb)
            return jnp.sum(w * c * losses) + aux_loss / k, (losses, aux_loss, new_rest)

        grads, losses_m, aux_m, new_rest = scan_grads(objective, params, rest, micro, scale, prepare)
        return grads, jnp.sum(scale * losses_m, axis=0), jnp.mean(aux_m), new_rest

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
