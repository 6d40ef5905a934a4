"""Stochastic multi-objective methods with a persistent λ: MoDo, SDMGrad.

Both were designed for *double sampling*: the λ update reads the product of
task gradients from two independent mini-batches, G_ab = J_a J_bᵀ (an
unbiased estimate of the full-data Gramian's products; not symmetric), and the
update applies the weights to the gradients J_c of a third batch. In this
protocol the trainer passes that cross-Gramian as ``gram`` and applies w to
J_c; passed the ordinary G of one batch (what ``mtl.train`` computes), they
are the single-sample variants (biased, as MGDA's). LibMTL draws the three
batches and, for MoDo, gives the task heads the mean of the three batches'
head gradients.

Absent tasks: λ runs on the present tasks only (λ of the present tasks,
renormalised to sum 1, is updated and projected on their simplex); absent
tasks' λ entries are kept in the state for their return.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl.optim import solvers
from mtl.optim.base import Inputs, make_aggregator, masked_gram, safe_div


def _present_start(lam, mask):
    """λ restricted to the present tasks and renormalised (uniform if it sums to 0)."""
    lam = lam * mask
    total = jnp.sum(lam)
    return jnp.where(total > 0, safe_div(lam, total), solvers.uniform(mask))


def modo(gamma: float = 1e-3, rho: float = 0.1):
    """MoDo (Chen et al., NeurIPS 2023, 'Three-way trade-off ...'), as
    LibMTL's ``MoDo.py``: λ ← Π_Δ(λ − γ(G_ab λ + ρλ)) (one projected step per
    call, λ₀ = 1/T), w = the new λ (Σ w = 1). γ = 1e-3, ρ = 0.1 as LibMTL.
    G is used as given (no normalisation: γ is relative to the gradients'
    scale, as in the paper). State: λ (T,). T = 1: w = 1."""
    if gamma < 0 or rho < 0:
        raise ValueError(f"modo: gamma and rho must be >= 0, found gamma={gamma}, rho={rho}")

    def init(num_tasks):
        return jnp.full((num_tasks,), 1.0 / num_tasks)

    def core(state, x: Inputs):
        lam = _present_start(state.astype(x.dtype), x.mask)
        g = masked_gram(x.gram, x.mask)
        new = solvers.project_simplex(lam - gamma * (g @ lam + rho * lam), x.mask)
        return new, jnp.where(x.mask > 0, new, state).astype(state.dtype)

    return make_aggregator("modo", ("gram",), core, init=init, hparams=dict(gamma=gamma, rho=rho))


def sdmgrad(lamda: float = 0.3, niter: int = 20, lr: float = 5.0, momentum: float = 0.5):
    """SDMGrad (Xiao et al., NeurIPS 2023, 'Direction-oriented multi-objective
    learning'), as LibMTL's ``SDMGrad.py`` (from the authors' code).

    Ĝ = G_ab/(s² + 1e-8), s = mean_t sqrt(max(G_tt, 0)); w (kept across
    steps, w₀ = 1/T) takes ``niter`` = 20 steps of SGD (lr 5, momentum 0.5,
    momentum buffer restarted every call, as the reference re-creates its
    optimizer) on ½wᵀĜw + λ wᵀĜ1/n — gradient Ĝw + λ·mean_s Ĝ_ts — each
    followed by the projection onto the simplex. The direction is
    (J_cᵀw + λ·mean_t g_t)/(1 + λ): weights (w + λ/n)/(1 + λ), Σ = 1.
    λ = ``lamda`` = 0.3 as LibMTL. State: w (T,). T = 1: w = 1."""
    if lamda < 0 or niter < 0:
        raise ValueError(f"sdmgrad: lamda and niter must be >= 0, found lamda={lamda}, "
                         f"niter={niter}")

    def init(num_tasks):
        return jnp.full((num_tasks,), 1.0 / num_tasks)

    def core(state, x: Inputs):
        g = masked_gram(x.gram, x.mask)
        n = jnp.sum(x.mask)
        s = safe_div(jnp.sum(jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0)) * x.mask), n)
        g = g / (s * s + 1e-8)
        gg = safe_div(g @ x.mask, n)

        def body(_, carry):
            w, buf, first = carry
            grad = g @ w + lamda * gg
            buf = jnp.where(first, grad, momentum * buf + grad)
            w = solvers.project_simplex(w - lr * buf, x.mask)
            return w, buf, jnp.asarray(False)

        w0 = _present_start(state.astype(x.dtype), x.mask)
        w, _, _ = jax.lax.fori_loop(0, niter, body, (w0, jnp.zeros_like(w0), jnp.asarray(True)))
        out = (w + lamda * solvers.uniform(x.mask)) / (1.0 + lamda)
        return out, jnp.where(x.mask > 0, w, state).astype(state.dtype)

    return make_aggregator("sdmgrad", ("gram",), core, init=init,
                           hparams=dict(lamda=lamda, niter=niter, lr=lr, momentum=momentum))
