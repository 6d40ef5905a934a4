"""Loss scalarisations and fixed weights: GLS, STCH, Constant.

Each returns w = ∂F/∂L for its scalarised objective F(L_1..L_T) at this step's
losses, so wᵀJ = ∇θ F (the chain rule; the trainer applies w as for any
weighting). Absent tasks (``present``) are left out of F and get weight 0.
"""
from __future__ import annotations

import jax.numpy as jnp

from mtl.optim.base import Inputs, make_aggregator, safe_div, tiny
from mtl.optim.weighting import _masked_softmax


def gls():
    """Geometric loss strategy (Chennupati et al., MultiNet++, CVPRW 2019):
    F = (Π_t L_t)^(1/n), so w_t = F/(n·L_t), n = number of present tasks.

    As LibMTL (``GLS.py``, whose backward is the gradient of this F; the
    weights it *returns* are a different expression, for logging only).
    Computed in log space, exp(mean log L − log L_t)/n, so a product of many
    small losses does not underflow. Losses must be positive: each is floored
    at sqrt(the smallest normal number) to keep the weights finite. T = 1: w = 1.
    """

    def core(state, x: Inputs):
        n = jnp.sum(x.mask)
        log_l = jnp.log(jnp.maximum(x.losses, tiny(x.dtype)))
        mean = safe_div(jnp.sum(log_l * x.mask), n)
        return safe_div(jnp.exp(mean - log_l), n), state

    return make_aggregator("gls", ("losses",), core)


def stch(mu: float = 1.0, warmup: int = 4, period: int = 1, eps: float = 1e-20):
    """Smooth Tchebycheff scalarisation (Lin et al., ICML 2024), in the form of
    the authors' MTL code and LibMTL's ``STCH.py``:

    - warm-up (the first ``warmup`` periods): F = Σ_t log(L_t + eps), w_t = 1/(L_t + eps);
    - the next period: the same, and the mean loss of each task over it is
      recorded as the reference ("nadir") point z;
    - afterwards: F = n·μ·log Σ_t exp(log(L_t/z_t + eps)/μ), so
      w_t = n·softmax_t(log(L_t/z_t + eps)/μ) / (L_t + eps·z_t).

    A period is ``period`` calls to ``weights``: LibMTL counts epochs (default
    warm-up 4 epochs), so set ``period`` to the steps per epoch to match it
    (the default 1 counts steps). μ = 1 as LibMTL. n = present tasks (LibMTL's
    task_num). A task absent for the whole averaging period gets z_t = 1.
    State: (calls, loss sum (T,), loss count (T,), z (T,)). T = 1: w = 1/(L + eps·z).
    """
    if mu <= 0:
        raise ValueError(f"stch: mu must be > 0, found {mu}")
    if warmup < 0 or period < 1:
        raise ValueError(f"stch: need warmup >= 0 and period >= 1, found warmup={warmup}, "
                         f"period={period}")
    start, stop = warmup * period, (warmup + 1) * period

    def init(num_tasks):
        z = jnp.zeros((num_tasks,))
        return (jnp.zeros((), jnp.int32), z, z, jnp.ones((num_tasks,)))

    def core(state, x: Inputs):
        calls, acc, cnt, z = state
        losses = x.losses
        averaging = (calls >= start) & (calls < stop)
        m = (x.mask * averaging).astype(acc.dtype)
        acc = acc + m * losses.astype(acc.dtype)
        cnt = cnt + m
        z = jnp.where(calls + 1 == stop, jnp.where(cnt > 0, safe_div(acc, cnt), 1.0), z)
        w_warm = 1.0 / (jnp.maximum(losses, 0.0) + eps)
        zz = z.astype(x.dtype)
        u = jnp.log(jnp.maximum(losses, 0.0) / zz + eps) / mu
        soft = _masked_softmax(u, x.mask)
        w_stch = jnp.sum(x.mask) * soft / (jnp.maximum(losses, 0.0) + eps * zz)
        w = jnp.where(calls >= stop, w_stch, w_warm)
        return w, (calls + 1, acc, cnt, z)

    return make_aggregator("stch", ("losses",), core, init=init,
                           hparams=dict(mu=mu, warmup=warmup, period=period, eps=eps))


def constant(weights=None):
    """Fixed user weights (TorchJD's ``Constant``): w = ``weights`` every step;
    absent tasks get 0 and the others keep theirs (no renormalisation).

    ``weights=None`` (not in TorchJD, which requires them) means all ones,
    i.e. EW, so the name alone is a valid configuration. ``init(T)`` raises a
    ValueError when len(weights) ≠ T."""
    fixed = None if weights is None else tuple(float(v) for v in weights)

    def init(num_tasks):
        if fixed is not None and len(fixed) != num_tasks:
            raise ValueError(f"constant: {len(fixed)} weights given for {num_tasks} tasks; "
                             f"pass weights= with one value per task")
        return ()

    def core(state, x: Inputs):
        if fixed is None:
            return jnp.ones((x.num_tasks,), x.dtype), state
        if len(fixed) != x.num_tasks:
            raise ValueError(f"constant: {len(fixed)} weights given for {x.num_tasks} tasks")
        return jnp.asarray(fixed, x.dtype), state

    return make_aggregator("constant", (), core, init=init, hparams=dict(weights=fixed))
