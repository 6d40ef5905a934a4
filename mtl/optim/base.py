"""The aggregator protocol and the helpers every method shares.

An :class:`Aggregator` is a pair of pure, jittable functions, as in optax::

    state = agg.init(num_tasks)
    w, state = agg.weights(state, gram=G, losses=L, key=k, step=i, present=m)
    ... apply the update  d = wᵀJ  (= ∇ Σ_t w_t L_t, with w held constant) ...
    if agg.post_step:                       # only FAMO today
        state = agg.update(state, losses=L_after_step, present=m)

Inputs of ``weights`` (all keyword-only, all optional; pass what ``agg.needs``
names — passing more is harmless):

- ``gram``  (T, T): Gramian G = J Jᵀ of the per-task gradients on the shared
  parameters (``gramian(jac)`` builds it from a stacked pytree).
- ``jac``   (T, P) array or pytree with leading axis T: used only to build
  ``gram`` when ``gram`` is not given. No method of this protocol needs J
  itself (those that do are :class:`JacAggregator`, at the end of this module).
- ``losses`` (T,): this step's per-task losses (values, no gradient needed).
- ``key``: a PRNG key (RLW, PCGrad).
- ``step``: the global step; accepted for uniformity, every method keeps its
  own counters in ``state`` so none reads it today.
- ``present`` (T,) bool: tasks that have labels in this batch (partial
  labels). Absent tasks get weight exactly 0, and the method runs on the
  present tasks only (their rows/columns of G are dropped); ``None`` = all.

``agg.needs`` is a frozenset drawn from {"gram", "losses", "key"}; "gram" means
the trainer must compute G (or keep J). The trainer always has the losses, so
passing them costs nothing.

Non-finite inputs: if any input the method uses (G and/or losses, per
``needs``) holds NaN/inf, ``weights`` returns all-NaN weights and the state
*unchanged*, so the trainer can detect it with ``jnp.isfinite(w).all()`` and
skip the step without corrupting the aggregator. EW and RLW read neither
input and the Gramian methods read only G, so the trainer checks its losses
itself (it must anyway). Finite inputs, however degenerate (zero, parallel,
opposite or wildly scaled gradients), always give finite weights.

Call ``weights`` exactly once per training step: stateful methods (UW,
GradNorm, DWA, FAMO, Nash-MTL with update_every > 1) advance their state in it.
The weights multiply the task losses / shared-parameter gradients; whether
task-specific heads see the weighted or unweighted losses is the trainer's
choice (implementations differ: LibMTL gives the heads the unweighted
losses, the Nash-MTL and FAMO codes the weighted ones).

Scale of the weights: each method keeps its paper's convention and the
learning rate absorbs the difference:

==============  ============================================================
EW              w = 1 (Σ w = T, or the number of present tasks)
RLW             softmax of N(0, I): Σ w = 1
UW              w = exp(−s_t)
DWA             Σ w = T (number of present tasks)
GradNorm        learned, Σ w = T
FAMO            Σ w = 1
MGDA, IMTL-G    Σ w = 1 (MGDA with ``normalize``: Σ w_t n_t = 1)
PCGrad          sum of the projected gradients (EW's scale)
CAGrad          1/T + λ w* (the mean gradient's scale, plus the ball term)
Nash-MTL        solution on G/‖G‖_F (scale free)
Aligned-MTL     B·1 with singular values sqrt(λ_min) (see aligned_mtl)
UPGrad/DualProj mean gradient's scale (v ≥ 1/T)
==============  ============================================================

With Adam-type optimizers (the library's default is AdamW) a common factor
on all the weights cancels: on MultiTab, EW with w = 1/T and MGDA with
w × T give the same runs as EW and MGDA (test MSE equal to 4 digits). What
matters is the weights' ratios: MGDA's w_t ≈ 1/‖g_t‖² and FAMO's
w_t ∝ z_t/L_t can starve tasks with large gradients or losses (see their
docstrings).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

NEEDS = frozenset({"gram", "losses", "key"})


@dataclasses.dataclass(frozen=True, eq=False)
class Aggregator:
    """A gradient aggregation / loss weighting method (see module docstring).

    Hashable by identity (usable as a static argument of ``jax.jit``) and not
    a pytree, so it can be closed over or passed statically."""

    name: str
    needs: frozenset
    init: Callable[[int], Any]
    weights: Callable[..., tuple[jax.Array, Any]]
    update: Callable[..., Any]
    post_step: bool
    hparams: dict
    # weights_info(state, **same inputs as weights) -> (w, state, info): ``info`` is a
    # dict of scalars about the solve ({} for methods without a solver; for the
    # Gramian methods {"certificate", "iterations"}, see mtl.optim.solvers), NaN when
    # the inputs are non-finite. ``weights`` is this without ``info``.
    weights_info: Callable[..., tuple[jax.Array, Any, dict]] | None = None


class Inputs(NamedTuple):
    """What a method's core sees: validated inputs, ``mask`` is float (T,)."""

    num_tasks: int
    gram: jax.Array | None
    losses: jax.Array | None
    key: jax.Array | None
    step: Any
    mask: jax.Array
    dtype: Any


def _stateless_init(num_tasks: int):
    del num_tasks
    return ()


def _identity_update(state, **_):
    return state


def gramian(jac) -> jax.Array:
    """G = J Jᵀ from a (T, P) array or a pytree whose leaves have leading axis T."""
    leaves = jax.tree.leaves(jac)
    if not leaves:
        raise ValueError("gramian: jac has no array leaves")
    t = leaves[0].shape[0]
    g = 0.0
    for leaf in leaves:
        if leaf.shape[:1] != (t,):
            raise ValueError(
                f"gramian: every leaf needs leading axis T={t}, found shape {leaf.shape}")
        flat = jnp.reshape(leaf, (t, -1))
        g = g + flat @ flat.T
    return g


def aggregate(w: jax.Array, jac):
    """wᵀJ for a (T, P) array or a pytree with leading task axis."""
    return jax.tree.map(lambda leaf: jnp.tensordot(w.astype(leaf.dtype), leaf, axes=1), jac)


def _infer_num_tasks(name, gram, losses, present):
    for label, arr in (("gram", gram), ("losses", losses), ("present", present)):
        if arr is not None:
            return int(jnp.shape(arr)[0])
    raise ValueError(
        f"{name}: cannot tell the number of tasks; pass losses= (T,), gram= (T, T) or present= (T,)")


def _check_shape(name, label, arr, shape):
    if arr is not None and tuple(jnp.shape(arr)) != shape:
        raise ValueError(f"{name}: {label} must have shape {shape}, found {tuple(jnp.shape(arr))}")


def _all_finite(*arrays):
    ok = jnp.array(True)
    for a in arrays:
        if a is not None:
            ok = ok & jnp.all(jnp.isfinite(a))
    return ok


def make_aggregator(name: str, needs, core, *, init=None, update=None,
                    post_step: bool = False, hparams=None) -> Aggregator:
    """Wrap ``core(state, inputs: Inputs) -> (w, new_state)`` (or ``(w, new_state,
    info)``, info a dict of scalars, see :attr:`Aggregator.weights_info`) in the
    public protocol.

    The wrapper builds G from J when needed, validates shapes, turns ``present``
    into a float mask, zeroes absent tasks' weights, and applies the non-finite
    guard described in the module docstring.
    """
    needs = frozenset(needs)
    if not needs <= NEEDS:
        raise ValueError(f"{name}: unknown needs {sorted(needs - NEEDS)}")

    def weights_info(state, *, gram=None, jac=None, losses=None, key=None, step=None,
                     present=None):
        if gram is None and jac is not None:
            gram = gramian(jac)
        if "gram" in needs and gram is None:
            raise ValueError(f"{name}: needs the Gramian; pass gram= (T, T) or jac=")
        if "losses" in needs and losses is None:
            raise ValueError(f"{name}: needs the per-task losses; pass losses= (T,)")
        if "key" in needs and key is None:
            raise ValueError(f"{name}: needs a PRNG key; pass key=")
        t = _infer_num_tasks(name, gram, losses, present)
        given = {k: v for k, v in (("gram", gram), ("losses", losses), ("present", present))
                 if v is not None}
        if any(jnp.shape(v)[:1] != (t,) for v in given.values()):
            shapes = ", ".join(f"{k} {tuple(jnp.shape(v))}" for k, v in given.items())
            raise ValueError(f"{name}: inputs disagree on the number of tasks: {shapes}")
        _check_shape(name, "gram", gram, (t, t))
        _check_shape(name, "losses", losses, (t,))
        _check_shape(name, "present", present, (t,))
        gram = None if gram is None else jnp.asarray(gram)
        losses = None if losses is None else jnp.asarray(losses)
        floats = [a.dtype for a in (gram, losses) if a is not None
                  and jnp.issubdtype(a.dtype, jnp.floating)]
        dtype = jnp.result_type(*floats) if floats else jnp.zeros(()).dtype
        mask = (jnp.ones((t,), dtype) if present is None
                else jnp.asarray(present).astype(bool).astype(dtype))
        gram = None if gram is None else gram.astype(dtype)
        losses = None if losses is None else losses.astype(dtype)
        inputs = Inputs(t, gram, losses, key, step, mask, dtype)
        out = core(state, inputs)
        w, new_state = out[:2]
        info = out[2] if len(out) > 2 else {}
        w = jnp.asarray(w, dtype) * mask
        used = [gram if "gram" in needs else None, losses if "losses" in needs else None]
        ok = _all_finite(*used)
        w = jnp.where(ok, w, jnp.nan)
        new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
        info = {k: jnp.where(ok, v, jnp.nan) if jnp.issubdtype(jnp.result_type(v), jnp.floating)
                else v for k, v in info.items()}
        return w, new_state, info

    def weights(state, **inputs):
        w, new_state, _ = weights_info(state, **inputs)
        return w, new_state

    weights.__name__ = f"{name}_weights"
    weights_info.__name__ = f"{name}_weights_info"
    return Aggregator(name=name, needs=needs, init=init or _stateless_init, weights=weights,
                      update=update or _identity_update, post_step=post_step,
                      hparams=dict(hparams or {}), weights_info=weights_info)


# ----------------------------------------------------------------- numerics --

def tiny(dtype) -> float:
    """A safe floor for divisions: sqrt of the smallest normal number."""
    return float(jnp.finfo(dtype).tiny) ** 0.5


def safe_div(a, b, eps=None):
    """a / b where |b| > eps, else 0 (no NaN, no inf)."""
    b = jnp.asarray(b)
    eps = tiny(b.dtype) if eps is None else eps
    ok = jnp.abs(b) > eps
    return jnp.where(ok, a / jnp.where(ok, b, 1.0), 0.0)


def masked_gram(gram, mask):
    """G with absent tasks' rows and columns zeroed."""
    return gram * mask[:, None] * mask[None, :]


def normalize_gram(gram):
    """G / (mean diagonal); all the Gramian methods are scale invariant, this
    only keeps float32 well inside its range. Zero G stays zero."""
    t = gram.shape[0]
    scale = jnp.trace(gram) / t
    return safe_div(gram, scale)


def task_norms(gram):
    """‖g_t‖ = sqrt(G_tt), safe for tiny negative round-off."""
    return jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))


def make_optimizer(name: str, lr: float, weight_decay: float = 0.0):
    """The small optimizer a learnable-weight method uses for its own parameters."""
    import optax

    if name == "adam":
        opt = optax.adam(lr)
    elif name == "sgd":
        opt = optax.sgd(lr)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', found {name!r}")
    if weight_decay:
        opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
    return opt


# ------------------------------------------------ methods that need J itself --
#
# A few methods read the Jacobian element by element (per coordinate or per
# activation), or keep per-task gradients in their state (momentum, AdaGrad-
# style accumulators); no (T, T) summary of J is enough for them. They follow a
# second, additive protocol; every method above is untouched::
#
#     state = agg.init(num_tasks, like=shared_params)   # like: one task's gradient shapes
#     d, state = agg.combine(state, jac=J, losses=L, key=k, present=m)
#     ... apply d (a pytree shaped like ONE task's gradient, no leading T) as the
#         shared parameters' (or the representation's) gradient ...
#
# ``"jac" in agg.needs`` tells the trainer which protocol a method follows.
# ``jac``: a pytree whose leaves have leading axis T (task t's gradient in row
# t), on the shared parameters or, for GradDrop, on a shared representation
# (then d is that representation's cotangent, to backpropagate through the
# encoder). ``like``: a pytree of arrays or ``jax.ShapeDtypeStruct`` shaped like
# one row of J (the shared parameters themselves will do); only methods whose
# state holds per-task gradients read it. ``activation``: optional, the
# representation itself (same shapes as one row of J; GradDrop only).
# Same rules as above: absent tasks (``present``) contribute nothing and keep
# their state; a non-finite value in a present task's row of J (or its loss,
# when "losses" is needed, or the activation when given) gives an all-NaN
# direction and the state unchanged; ``combine`` is called once per step.

JAC_NEEDS = frozenset({"jac", "losses", "key"})


@dataclasses.dataclass(frozen=True, eq=False)
class JacAggregator:
    """A method that combines the Jacobian itself (see the comment above).

    ``init(num_tasks, like=None)`` raises ValueError for a number of tasks the
    method cannot handle; ``combine(state, *, jac, losses=None, key=None,
    step=None, present=None, activation=None) -> (direction, state)``."""

    name: str
    needs: frozenset
    init: Callable[..., Any]
    combine: Callable[..., tuple[Any, Any]]
    hparams: dict
    post_step: bool = False


class JacInputs(NamedTuple):
    """What a J-method's core sees: absent tasks' rows of ``jac`` are zeroed,
    ``mask`` is float (T,)."""

    num_tasks: int
    jac: Any
    losses: jax.Array | None
    key: jax.Array | None
    step: Any
    mask: jax.Array
    activation: Any


def tree_zeros_rows(num_tasks: int, like):
    """Zeros with a leading task axis T for every leaf of ``like`` (arrays or
    ShapeDtypeStructs shaped like one task's gradient)."""
    return jax.tree.map(lambda a: jnp.zeros((num_tasks,) + tuple(a.shape), a.dtype), like)


def row_mask(mask, leaf):
    """mask (T,) broadcast against a leaf with leading axis T."""
    return jnp.reshape(mask, (-1,) + (1,) * (jnp.ndim(leaf) - 1)).astype(leaf.dtype)


def make_jac_aggregator(name: str, needs, core, *, init=None, min_tasks: int = 1,
                        hparams=None) -> JacAggregator:
    """Wrap ``core(state, inputs: JacInputs) -> (direction, new_state)``.

    ``init(num_tasks, like)`` builds the state (default: ()); the wrapper first
    checks ``num_tasks >= min_tasks``. ``combine`` validates the shapes, zeroes
    absent rows, and applies the non-finite guard."""
    needs = frozenset(needs) | {"jac"}
    if not needs <= JAC_NEEDS:
        raise ValueError(f"{name}: unknown needs {sorted(needs - JAC_NEEDS)}")

    def init_(num_tasks: int, like=None):
        if int(num_tasks) < min_tasks:
            raise ValueError(f"{name} needs at least {min_tasks} tasks, found num_tasks="
                             f"{num_tasks}; use another method (e.g. 'ew') or change its "
                             f"hyper-parameters ({dict(hparams or {})})")
        return () if init is None else init(int(num_tasks), like)

    def combine(state, *, jac, losses=None, key=None, step=None, present=None, activation=None):
        leaves = jax.tree.leaves(jac)
        if not leaves:
            raise ValueError(f"{name}: jac has no array leaves; pass the per-task gradients "
                             "as a pytree whose leaves have leading axis T")
        t = int(jnp.shape(leaves[0])[0])
        for leaf in leaves:
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != t:
                raise ValueError(f"{name}: every leaf of jac needs leading axis T={t}, "
                                 f"found shape {tuple(jnp.shape(leaf))}")
        if "losses" in needs and losses is None:
            raise ValueError(f"{name}: needs the per-task losses; pass losses= (T,)")
        if "key" in needs and key is None:
            raise ValueError(f"{name}: needs a PRNG key; pass key=")
        _check_shape(name, "losses", losses, (t,))
        _check_shape(name, "present", present, (t,))
        if activation is not None:
            row = jax.tree.map(lambda a: tuple(jnp.shape(a))[1:], jac)
            got = jax.tree.map(lambda a: tuple(jnp.shape(a)), activation)
            if jax.tree.structure(row) != jax.tree.structure(got) or jax.tree.leaves(
                    row, is_leaf=lambda x: isinstance(x, tuple)) != jax.tree.leaves(
                    got, is_leaf=lambda x: isinstance(x, tuple)):
                raise ValueError(f"{name}: activation must be shaped like one row of jac")
        floats = [jnp.result_type(leaf) for leaf in leaves
                  if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
        dtype = jnp.result_type(*floats) if floats else jnp.zeros(()).dtype
        mask = (jnp.ones((t,), dtype) if present is None
                else jnp.asarray(present).astype(bool).astype(dtype))
        on = mask > 0
        jac = jax.tree.map(lambda a: jnp.where(row_mask(on, a) > 0, a, jnp.zeros((), a.dtype)),
                           jac)
        losses = None if losses is None else jnp.asarray(losses).astype(dtype)
        ok = jnp.array(True)
        for leaf in jax.tree.leaves(jac):
            ok = ok & jnp.all(jnp.isfinite(leaf))
        if "losses" in needs:
            ok = ok & jnp.all(jnp.isfinite(jnp.where(on, losses, 0.0)))
            losses = jnp.where(on, losses, 0.0)
        if activation is not None:
            for leaf in jax.tree.leaves(activation):
                ok = ok & jnp.all(jnp.isfinite(leaf))
        d, new_state = core(state, JacInputs(t, jac, losses, key, step, mask, activation))
        d = jax.tree.map(lambda a: jnp.where(ok, a, jnp.nan), d)
        new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
        return d, new_state

    combine.__name__ = f"{name}_combine"
    return JacAggregator(name=name, needs=needs, init=init_, combine=combine,
                         hparams=dict(hparams or {}))
