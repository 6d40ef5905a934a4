"""Loss-weighting methods: EW, RLW, UW, DWA, GradNorm, FAMO.

These choose w from losses (and, for GradNorm, the task-gradient norms in G).
Three of them learn parameters of a changed objective; each keeps them in its
aggregator state and updates them itself, so the trainer only follows the
protocol in :mod:`mtl.optim.base`:

- **UW**: learnable s_t, objective Σ exp(−s_t) L_t + s_t. ``weights`` returns
  w = exp(−s) for the model update and, in the same call, takes one optimizer
  step on s with ∂/∂s_t = 1 − exp(−s_t) L_t (the joint step of model and s).
  A trainer that prefers to hold s in its own parameters can use
  :func:`uw_objective` instead.
- **GradNorm**: learned w (init 1), updated inside ``weights`` from this step's
  G and losses (the paper's order: the model step uses w(t), then w(t+1) is
  computed and renormalised to Σ w = T).
- **FAMO**: logits ξ, z = softmax(ξ). ``weights`` returns w_t ∝ z_t / L_t (the
  gradient of Σ z_t log L_t, normalised to Σ w = 1) and remembers L. After the
  model step the trainer calls ``update(state, losses=L_after)`` with the
  losses of the updated model (ideally on the same batch; the next batch's
  losses are a cheaper approximation). ``agg.post_step`` is True for FAMO only.

Absent tasks (``present``) get weight 0; their learnable parameters get no
loss-driven update and their loss history is left unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl.optim.base import (Inputs, make_aggregator, make_optimizer, safe_div, task_norms)


def _masked_softmax(logits, mask):
    """softmax over the entries with mask > 0; zero elsewhere (and if none)."""
    on = mask > 0
    m = jnp.max(jnp.where(on, logits, -jnp.inf))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(on, jnp.exp(logits - m), 0.0)
    return safe_div(e, jnp.sum(e))


def ew():
    """Equal weighting: w = 1 (the sum of the losses)."""

    def core(state, x: Inputs):
        return jnp.ones((x.num_tasks,), x.dtype), state

    return make_aggregator("ew", (), core)


def rlw():
    """Random loss weighting: w = softmax(ε), ε ~ N(0, I) drawn from ``key``
    each step; Σ w = 1 over the present tasks (the RLW paper's convention)."""

    def core(state, x: Inputs):
        eps = jax.random.normal(x.key, (x.num_tasks,), x.dtype)
        return _masked_softmax(eps, x.mask), state

    return make_aggregator("rlw", ("key",), core)


def uw_objective(log_vars, losses):
    """Uncertainty weighting objective Σ_t exp(−s_t) L_t + s_t (s = log σ²)."""
    return jnp.sum(jnp.exp(-log_vars) * losses + log_vars)


def uw(lr: float = 1e-2, optimizer: str = "adam"):
    """Uncertainty weighting (Kendall et al.): w_t = exp(−s_t), s learned on
    Σ exp(−s_t) L_t + s_t with its own optimizer (``lr``; not in the spec, the
    paper trains s with the model's optimizer). State: (s, opt_state), s = 0."""
    opt = make_optimizer(optimizer, lr)

    def init(num_tasks):
        s = jnp.zeros((num_tasks,))
        return (s, opt.init(s))

    def core(state, x: Inputs):
        s, opt_state = state
        w = jnp.exp(-s)
        grad = (1.0 - w * x.losses.astype(s.dtype)) * x.mask.astype(s.dtype)
        upd, opt_state = opt.update(grad, opt_state, s)
        return w, (s + upd * x.mask.astype(s.dtype), opt_state)

    return make_aggregator("uw", ("losses",), core, init=init,
                           hparams=dict(lr=lr, optimizer=optimizer))


def dwa(temperature: float = 2.0, period: int = 1):
    """Dynamic weight average (Liu et al.): w_t = T·softmax(r_t/τ) with
    r_t = L̄_t(k−1)/L̄_t(k−2), τ = 2; w = 1 until two periods are complete.

    L̄(k) is the mean loss over period k of ``period`` calls to ``weights``
    (``period=1``: per step; set it to the steps per epoch for the paper's
    per-epoch version). With absent tasks the softmax runs over the present
    ones and is scaled to sum to their number. State: (hist (2, T) =
    [L̄(k−1), L̄(k−2)], running sum (T,), running count (T,), calls, periods).
    """
    if period < 1:
        raise ValueError(f"dwa: period must be >= 1, found {period}")

    def init(num_tasks):
        z = jnp.zeros((num_tasks,))
        return (jnp.zeros((2, num_tasks)), z, z, jnp.zeros((), jnp.int32),
                jnp.zeros((), jnp.int32))

    def core(state, x: Inputs):
        hist, acc, cnt, calls, periods = state
        r = safe_div(hist[0], hist[1])
        n = jnp.sum(x.mask)
        w = n * _masked_softmax(r / temperature, x.mask)
        w = jnp.where(periods >= 2, w, jnp.ones_like(w))
        m = x.mask.astype(acc.dtype)
        acc = acc + m * x.losses.astype(acc.dtype)
        cnt = cnt + m
        calls = calls + 1
        roll = calls % period == 0
        seen = cnt > 0
        mean = safe_div(acc, cnt)
        new_hist = jnp.stack([jnp.where(seen, mean, hist[0]), jnp.where(seen, hist[0], hist[1])])
        hist = jnp.where(roll, new_hist, hist)
        acc = jnp.where(roll, 0.0, acc)
        cnt = jnp.where(roll, 0.0, cnt)
        periods = periods + roll.astype(periods.dtype)
        return w, (hist, acc, cnt, calls, periods)

    return make_aggregator("dwa", ("losses",), core, init=init,
                           hparams=dict(temperature=temperature, period=period))


def gradnorm_grad(w, gram, losses, initial_losses, alpha, mask=None):
    """∂/∂w of the GradNorm loss Σ_t |w_t ‖g_t‖ − Ḡ·r_t^α| with the target
    Ḡ·r_t^α held constant (as in the paper), on the present tasks.

    ‖g_t‖ = sqrt(G_tt); Ḡ = mean_t w_t‖g_t‖; r_t = L̃_t / mean L̃, L̃_t = L_t/L_t(0).
    """
    mask = jnp.ones_like(w) if mask is None else mask
    n = jnp.sum(mask)
    norms = task_norms(gram)
    gw = w * norms
    g_bar = safe_div(jnp.sum(gw * mask), n)
    ratio = safe_div(losses, initial_losses)
    rel = safe_div(ratio, safe_div(jnp.sum(ratio * mask), n))
    target = g_bar * jnp.maximum(rel, 0.0) ** alpha
    return jnp.sign(gw - target) * norms * mask


def gradnorm(alpha: float = 1.5, lr: float = 0.025, optimizer: str = "adam"):
    """GradNorm (Chen et al.) on the Gramian: ‖w_t g_t‖ = w_t sqrt(G_tt).

    Build G on the last shared layer (the paper's choice, cheap) or on all
    shared parameters. w starts at 1; each call returns the current w and
    steps w with ``lr`` (its own optimizer; lr is not in the spec), clips it
    at 0 and renormalises to Σ w = T. L(0) is each task's first observed
    loss. State: (w, opt_state, L0, seen (T,) bool).
    """
    opt = make_optimizer(optimizer, lr)

    def init(num_tasks):
        w = jnp.ones((num_tasks,))
        return (w, opt.init(w), jnp.ones((num_tasks,)), jnp.zeros((num_tasks,), bool))

    def core(state, x: Inputs):
        w, opt_state, l0, seen = state
        on = x.mask > 0
        losses = x.losses.astype(w.dtype)
        l0 = jnp.where(on & ~seen, losses, l0)
        seen = seen | on
        grad = gradnorm_grad(w, x.gram.astype(w.dtype), losses, l0, alpha, x.mask.astype(w.dtype))
        upd, opt_state = opt.update(grad, opt_state, w)
        new_w = jnp.maximum(w + upd, 0.0)
        total = jnp.sum(new_w)
        t = x.num_tasks
        new_w = jnp.where(total > 0, safe_div(t * new_w, total), jnp.ones_like(new_w))
        return w, (new_w, opt_state, l0, seen)

    return make_aggregator("gradnorm", ("gram", "losses"), core, init=init,
                           hparams=dict(alpha=alpha, lr=lr, optimizer=optimizer))


FAMO_UPDATE_ON = ("same_batch", "next_batch")


def famo(lr: float = 0.025, gamma: float = 0.01, min_losses=0.0, eps: float = 1e-8,
         optimizer: str = "adam", update_on: str = "same_batch"):
    """FAMO (Liu et al. 2023). Logits ξ (init 0), z = softmax(ξ).

    ``weights``: w_t = (z_t/D_t) / Σ_s (z_s/D_s), D_t = L_t − min_t + eps (the
    gradient of Σ z_t log D_t scaled to Σ w = 1); remembers L.
    ``update(state, losses=L_after, present=None)``: δ_t = log D_t(before) −
    log D_t(after); ξ takes one ``optimizer`` step (Adam, lr 0.025, L2 weight
    decay γ = 0.01, as in the authors' code) along ∂(zᵀδ)/∂ξ = z ⊙ (δ − zᵀδ).
    Losses must exceed ``min_losses`` (default 0). State: (ξ, opt_state,
    L_before, present_before).

    ``update_on`` tells the trainer (``mtl.train``) which losses "after" are:
    ``"same_batch"`` (default; the authors' code) re-evaluates the step's own batch
    with the updated parameters, one extra forward pass per step; ``"next_batch"``
    uses the next step's losses on its own batch (no extra forward, but the
    batch-to-batch noise then swamps the one-step change). Used outside the
    trainer, ``update`` is simply called with whatever losses the caller passes.

    Scale property (not a bug; measured on MultiTab, experiments/results/mtl_optim.md):
    FAMO descends Σ z_t log L_t, so w_t ∝ z_t/L_t: at near-uniform z a task
    whose loss is k times smaller gets k times more weight, and driving an
    already small loss further down counts as much as halving a large one. ξ
    can offset a ratio k only by moving log k apart (≥ log k / lr Adam steps),
    and its signal, the difference between the tasks' rates of log-loss
    decrease, vanishes once every loss plateaus, whatever the levels. On
    MultiTab the linear tasks' training losses fall to ~0.005 (below the noise
    variance 0.01) while the quadratic tasks' stay ~0.5; in 400 steps of
    mtl.train the spread of ξ stays ≤ 0.45 (log 100 ≈ 4.6 would be needed),
    the two quadratic tasks get ~2% of the weight together, and their test
    MSE ends several times the single-task one (3–4× on ρ = 0.4, seed 0).
    lr = 0.25 or γ = 0 does not remove this, and the sum Σ w = 1 is not the
    cause (a common factor cancels in Adam). Noise matters too: mtl.train feeds ``update`` the next batch's
    losses, whose batch-to-batch noise swamps the one-step change; the
    authors' code re-evaluates the same batch after the step. On MultiTab
    that variant lets ξ spread ~1.0 and roughly halves the damage (mean
    relative test-MSE change over 3 datasets × 3 seeds: −72..−263% →
    −28..−145%; EW −9..−41%; ``experiments/mtl_optim_diagnose.py``) but does
    not remove it.
    """
    if update_on not in FAMO_UPDATE_ON:
        raise ValueError(f"famo: update_on must be one of {FAMO_UPDATE_ON}, found {update_on!r}")
    opt = make_optimizer(optimizer, lr, weight_decay=gamma)

    def init(num_tasks):
        xi = jnp.zeros((num_tasks,))
        return (xi, opt.init(xi), jnp.ones((num_tasks,)), jnp.zeros((num_tasks,)))

    def core(state, x: Inputs):
        xi, opt_state, _, _ = state
        z = _masked_softmax(xi, x.mask.astype(xi.dtype))
        d = jnp.maximum(x.losses.astype(xi.dtype) - min_losses, 0.0) + eps
        q = z / d
        w = safe_div(q, jnp.sum(q))
        return w, (xi, opt_state, x.losses.astype(xi.dtype), x.mask.astype(xi.dtype))

    def update(state, *, losses, present=None):
        xi, opt_state, before, mask = state
        losses = jnp.asarray(losses, xi.dtype)
        if losses.shape != xi.shape:
            raise ValueError(f"famo.update: losses must have shape {xi.shape}, found {losses.shape}")
        if present is not None:
            mask = mask * jnp.asarray(present).astype(xi.dtype)
        z = _masked_softmax(xi, mask)
        delta = (jnp.log(jnp.maximum(before - min_losses, 0.0) + eps)
                 - jnp.log(jnp.maximum(losses - min_losses, 0.0) + eps)) * mask
        grad = z * (delta - jnp.sum(z * delta)) * mask
        upd, new_opt = opt.update(grad, opt_state, xi)
        ok = jnp.all(jnp.isfinite(losses)) & jnp.all(jnp.isfinite(upd))
        new = (xi + upd, new_opt, before, state[3])
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)

    return make_aggregator("famo", ("losses",), core, init=init, update=update, post_step=True,
                           hparams=dict(lr=lr, gamma=gamma, min_losses=min_losses, eps=eps,
                                        optimizer=optimizer, update_on=update_on))
