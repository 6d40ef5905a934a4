"""The train state and the jitted, sharded train / eval steps.

The model is kept functional inside ``jax.jit``: ``nnx.split`` once gives a graph
definition (static) and two states, parameters and the rest. The step has explicit in/out
shardings (derived from the logical axis rules) and donates the state. It is one pipeline,
composed in :meth:`Steps._train_step`::

    batch ──► route ──► (losses, G or per-task signals, aux) ──► weigh ──► w
                                                                   │
    params ◄── apply_update (optax) ◄── gradient of Σ w_t L_t (or wᵀJ) ◄┘

* :mod:`mtl.train.forward` — the model's pure functions (losses, encoder, heads);
* :mod:`mtl.train.routes` — one module per way of taking the gradients (plain EW,
  loss-only, parameter Jacobian kept or streamed, representation), each
  ``route(StepInputs, weigh) -> RouteOut``;
* :mod:`mtl.train.weigh` — the aggregator stage (``config.optim.aggregator``);
* :mod:`mtl.train.accumulate` — gradient accumulation (``train.accum_steps = K > 1``),
  a wrapper around any route: the same update, weights, losses and aggregator state as
  the full-batch step up to float rounding, with one micro-batch's activation memory;
  refused at construction (before a workdir is written) where it cannot be exact;
* :mod:`mtl.train.update` — the optimizer update, guarded: a step whose losses or
  gradients are not finite applies no update, and ``nonfinite_count`` /
  ``first_nonfinite`` record what happened.

The aggregator's state is part of ``TrainState`` (``agg_state``, checkpointed with
everything else), and so is the fixed sparse-training mask (``sparse_mask``; ``()`` when
off; with ``optim.sparse_criterion="saliency"`` it is chosen on the first step that
trains, see ``Steps._sparse_mask``). FAMO's default same-batch update re-evaluates the
step's batch after the update (one extra forward pass). A second jitted step,
``train_step_diag``, also returns gradient diagnostics (per-task gradient norms, pairwise
cosines, conflict fraction) through the route that builds G; the loop calls it every
``optim.diagnostics_every`` steps. Both compute the same update.

A model with its own objective may declare ``train_variants = G > 1`` static variants
of it (the sandwich rule's groups of widths): the step is then G programs, one per
variant (compiled on first use), and :meth:`Steps.step` runs the one
:meth:`Steps.variant_of` picks for the step number (uniform, a function of the seed and
the step, so resume is exact). Host-side, not a ``lax.switch``: XLA:CPU runs
convolutions inside a conditional several times slower than outside one.
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
from mtl.optim.sparse import topk_mask
from mtl.tasks import Task, losses_from_outputs, metric_sums
from mtl.train.accumulate import Accumulated, Splitter, WholeBatch
from mtl.train.forward import ROUTING_COUNTS, Forward  # noqa: F401  (re-exported)
from mtl.train.grad_tools import present_mask, split_shared
from mtl.train.routes import StepInputs, builds_gram, make_route
from mtl.train.spec import OptimSpec
from mtl.train.update import apply_update
from mtl.train.weigh import Weigh

VARIANT_SALT = 0x5A4D  # seeds the host draw of a model's train variant per step (Steps.variant_of)


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

    ``factory(rngs) -> model`` builds the model; ``tx`` is an optax optimizer. The step is
    composed here from the pieces of :mod:`mtl.train`: ``forward`` (the model's pure
    functions), ``weigh`` (the aggregator stage), ``route`` / ``diag_route`` (how the
    gradients are taken on ordinary / diagnostics steps, wrapped by accumulation when
    ``accum_steps > 1``) and :func:`~mtl.train.update.apply_update`.
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
        self.graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)

        # the step's parts: model functions, aggregator stage, gradient routes
        self.forward = Forward(self.graphdef, self.tasks, abstract_model)
        self.weigh = Weigh(self.optim, len(self.tasks), None if loss_weights is None else self.loss_weights)
        self.splitter = Splitter(self.accum_steps, self.forward, mesh, self.batch_sharding)
        self.route = make_route(self.optim, self.weigh, self.forward, loss_weights=self.loss_weights)
        self.diag_route = make_route(self.optim, self.weigh, self.forward, diagnostics=True)
        Accumulated.check(self.route, self.accum_steps)   # what cannot be exact is refused here
        if self.optim.diagnostics_every > 0:
            Accumulated.check(self.diag_route, self.accum_steps)
        if self.accum_steps > 1:
            self.route = Accumulated(self.route, self.splitter)
            self.diag_route = Accumulated(self.diag_route, self.splitter)

        self.param_shardings = shd.state_shardings(abs_params, mesh, self.rules)
        self._init = jax.jit(self._init_fn)
        with self.activate():
            self._init_compiled = self._init.lower().compile()
        self.state_shardings = self._init_compiled.output_shardings
        self.abstract_state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            jax.eval_shape(self._init_fn), self.state_shardings)
        # one program per train variant of the model (compiled on first use), as both steps
        jit_step = lambda diag, v: jax.jit(  # noqa: E731
            lambda s, b: self._train_step(s, b, diagnostics=diag, variant=v),
            in_shardings=(self.state_shardings, None), out_shardings=(self.state_shardings, None),
            donate_argnums=(0,))
        self._variant_steps = {(d, v): jit_step(d, v) for d in (False, True) for v in range(self.forward.variants)}
        self.train_step, self.train_step_diag = self._variant_steps[False, 0], self._variant_steps[True, 0]
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

    @property
    def pool_routing(self) -> bool:
        """Gradient accumulation pools the model's routing counts over the micro-batches."""
        return self.splitter.pool_routing

    def split_micro_batches(self, batch):
        """``[B, ...] -> [K, B/K, ...]`` (K = ``accum_steps``, strided; :class:`Splitter`)."""
        return self.splitter.split(batch)

    def _whole(self, params, rest, batch):
        """The whole batch for the passes outside the route (one at a time when accumulating)."""
        if self.accum_steps > 1:
            return self.splitter(params, rest, batch, pool=False)
        return WholeBatch(batch, self.forward)

    # ------------------------------------------------------------------ pure functions
    def _init_fn(self, base=None):
        with nnx.use_eager_sharding(False):
            model = self.factory(nnx.Rngs(self.seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        if base is not None:  # warm start: these entries come from a trained model (checked by the caller)
            nnx.replace_by_pure_dict(params, base)
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
                          agg_state=self.weigh.init_state(like=split_shared(params)[0]), sparse_mask=sparse)

    def _losses(self, params, rest, batch):
        """(per-task losses [T], auxiliary loss, updated non-parameter state): :meth:`Forward.losses`."""
        return self.forward.losses(params, rest, batch)

    def _train_step(self, state: TrainState, batch, diagnostics: bool = False, variant: int = 0):
        """route -> aggregator -> update, with the sparse mask and FAMO's post-step update."""
        sparse = self.optim.sparse_fraction > 0
        prev_mask = state.sparse_mask
        if sparse:
            state = state.replace(sparse_mask=self._sparse_mask(state, batch))
        inp = StepInputs(params=state.params, rest=state.rest, batch=batch, agg_state=state.agg_state,
                         key=jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
                         step=state.step, present=present_mask(self.tasks, batch),
                         sparse_mask=state.sparse_mask if sparse else None)
        out = self._run_route(self.diag_route if diagnostics else self.route, inp, variant)
        post = None
        if self.weigh.same_batch_update:  # FAMO: this batch again, with the updated parameters
            post = lambda params, rest, agg: self.weigh.post_update(  # noqa: E731
                agg, self._whole(params, rest, batch).losses(params, rest), inp.present)
        new_state, metrics = apply_update(self.tx, state, out, sparse=sparse, post=post)
        if sparse:  # a non-finite step keeps the previous mask too
            new_state = new_state.replace(sparse_mask=jax.tree.map(
                lambda a, b: jnp.where(metrics["ok"], a, b), new_state.sparse_mask, prev_mask))
        return new_state, metrics

    def variant_of(self, step: int) -> int:
        """The model's train variant at ``step`` (0 when it has one): uniform over
        ``train_variants``, a pure function of the run's seed and the step number, so a
        resumed run uses the same variants as an uninterrupted one."""
        G = self.forward.variants
        if G == 1:
            return 0
        return int(np.random.default_rng([self.seed, VARIANT_SALT, int(step)]).integers(G))

    def _run_route(self, route, inp, variant: int):
        """``route(inp)`` with the model's objective at static ``variant``."""
        with self.forward.at_variant(variant):
            return route(inp, self.weigh)

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
            g = self._whole(state.params, state.rest, batch).sum_grad(state.params, state.rest)
            shared, g_shared = split_shared(state.params)[0], split_shared(g)[0]
            return topk_mask(shared, self.optim.sparse_fraction, "saliency", grads=g_shared)

        return jax.lax.cond(state.step == state.nonfinite_count, choose, lambda: state.sparse_mask)

    def _eval_step(self, params, rest, batch):
        model = nnx.merge(self.graphdef, params, rest)
        return metric_sums(self.tasks, model(batch["inputs"]), batch)

    def _predict(self, params, rest, inputs):
        return nnx.merge(self.graphdef, params, rest)(inputs)

    def accumulated_gradients(self, params, rest, batch):
        """(grads, losses [T], aux_loss, new_rest) of the EW objective ``Σ_t w_t L_t + aux``
        on ``batch``, accumulated over ``accum_steps`` micro-batches (exact label-count
        weighting; ``aux`` the micro-batch mean, pooled LBL when the model pools routing counts)."""
        from mtl.train.routes import FixedWeights

        inp = StepInputs(params=params, rest=rest, batch=batch, agg_state=(), key=None, step=None,
                         present=None)
        out = FixedWeights(self.forward, self.loss_weights).accumulate(inp, self.splitter(params, rest, batch),
                                                                       None)
        return out.grads, out.losses, out.aux_loss, out.rest

    # ------------------------------------------------------------------ public API
    def init(self, base=None) -> TrainState:
        """A fresh state. ``base`` (a nested dict of arrays for some of the parameters, e.g.
        ParScale's backbone from a P = 1 run, shapes already checked) replaces those freshly
        initialised values; everything else (the optimizer state too) is initialised as usual."""
        with self.activate():
            if base is None:
                return self._init_compiled()
            return jax.jit(self._init_fn, out_shardings=self.state_shardings)(base)

    def put_batch(self, batch):
        """Host numpy batch (whole global batch, single process) -> sharded device arrays."""
        return jax.tree.map(lambda x: jax.device_put(np.asarray(x), self.batch_sharding(np.ndim(x))), batch)

    def step(self, state: TrainState, batch, diagnostics: bool = False, step: int | None = None):
        """One train step; ``diagnostics=True`` also returns ``cosines`` (T, T),
        ``conflict_fraction`` and ``grad_norms`` (T,) of the per-task gradients (on the
        shared parameters or representation, per ``optim.grad_on``). ``step`` (the state's
        step number, which the loop knows) picks a multi-variant model's program without
        reading it back from the device."""
        with self.activate():
            # routes that build G on every step already return the diagnostics: no second compile
            diag = diagnostics and not builds_gram(self.optim, self.weigh)
            v = 0
            if self.forward.variants > 1:
                v = self.variant_of(int(jax.device_get(state.step)) if step is None else step)
            return self._variant_steps[diag, v](state, batch)

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
