"""Auxiliary router losses: load balancing (micro-batch and global-batch), CV², z-loss.

Definitions (N tokens, E experts, top-k routing, ``probs`` = router softmax over all E):

* **Load-balancing loss** (Switch): ``LBL = E * sum_i f_i p_i`` with
  ``f_i`` = fraction of the ``N*k`` token->expert assignments that go to expert i
  (``stop_gradient``; sums to 1) and ``p_i`` = mean router probability of expert i. It is 1
  when routing and probabilities are uniform.
* **Micro-batch vs global-batch LBL.** ``f`` is computed from some set of tokens:
  - ``load_balancing_loss(probs, indices)``: from the tokens it is given. Called on one
    micro-batch this is the micro-batch LBL. Called inside ``jax.jit`` on the *global*
    batch sharded over the data axis it is already the global-batch LBL over data
    parallelism: the sums over tokens are the all-reduce.
  - ``load_balancing_loss(..., axis_name="data")`` inside ``jax.shard_map``: the counts are
    summed over ``axis_name`` (an all-reduce) so ``f`` is global, while ``p`` stays local;
    the mean of the per-shard losses over the axis is the global-batch LBL (equal shards).
  - ``accumulated_load_balancing_loss(counts, mean_probs, pooled=...)``: per-micro-batch
    statistics stacked on a leading axis ``M`` (gradient accumulation, e.g. the outputs of a
    ``lax.scan`` over micro-batches). ``pooled=True`` uses f pooled over all micro-batches:
    ``mean_m E sum_i f^pool_i p^m_i``; ``pooled=False`` is the mean of the per-micro-batch
    LBLs ``mean_m E sum_i f^m_i p^m_i``. With ``M = 1`` they are equal.
  - ``micro_batch_load_balancing_loss(probs, indices, num_micro_batches)`` splits the tokens
    into contiguous chunks (e.g. the data shards) and averages their LBLs.
* **CV² loss** (Shazeer et al.): ``weight * (CV²(importance) + CV²(load))``, importance_i =
  sum over tokens of the gate values of expert i, load_i = number of tokens routed to
  expert i (or the smooth estimate ``smooth_load`` for noisy gating, which has gradients);
  ``CV²(x) = Var(x) / (mean(x)² + eps)`` with the population variance; weight 0.01.
* **Router z-loss**: ``mean_n logsumexp(logits_n)²``.

``mask`` arguments ([N] bool) leave padded tokens out of every statistic.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from mtl.nn.moe.routing import check_top_k


def _flat(probs, indices, mask):
    e = probs.shape[-1]
    probs = probs.reshape(-1, e)
    indices = indices.reshape(probs.shape[0], -1)
    if mask is None:
        mask = jnp.ones(probs.shape[:1], bool)
    else:
        mask = jnp.asarray(mask, bool).reshape(-1)
        if mask.shape[0] != probs.shape[0]:
            raise ValueError(f"mask has {mask.shape[0]} tokens but probs has {probs.shape[0]}")
    return probs, indices, mask


def expert_counts(indices, num_experts: int, mask=None):
    """Number of token->expert assignments per expert ``[E]`` (float); ``indices [..., k]``
    (a 1-D ``indices`` is top-1: one choice per token)."""
    if indices.ndim == 1:
        indices = indices[:, None]
    indices = indices.reshape(-1, indices.shape[-1])
    onehot = jax.nn.one_hot(indices, num_experts)                     # [N, k, E]
    if mask is not None:
        mask = jnp.asarray(mask, onehot.dtype).reshape(-1)
        if mask.shape[0] != indices.shape[0]:
            raise ValueError(f"mask has {mask.shape[0]} tokens but indices has {indices.shape[0]}")
        onehot = onehot * mask[:, None, None]
    return jnp.sum(onehot, axis=(0, 1))


def routing_stats(probs, indices, mask=None):
    """``(counts [E], mean_probs [E])`` of one micro-batch: the inputs of the pooled LBL."""
    probs, indices, mask = _flat(probs, indices, mask)
    counts = expert_counts(indices, probs.shape[-1], mask)
    m = mask.astype(probs.dtype)[:, None]
    mean_probs = jnp.sum(probs * m, axis=0) / jnp.maximum(jnp.sum(m), 1.0)
    return counts, mean_probs


def load_balancing_loss(probs, indices, *, mask=None, axis_name=None):
    """``E * sum_i f_i p_i`` over the given tokens (see the module docstring).

    ``probs [N, E]`` router softmax, ``indices [N, k]`` chosen experts. With ``axis_name``
    (only inside ``shard_map``/``pmap``) the assignment counts are all-reduced over that axis
    before ``f`` is formed; ``p`` stays local."""
    probs, indices, mask = _flat(probs, indices, mask)
    e = probs.shape[-1]
    counts, mean_probs = routing_stats(probs, indices, mask)
    if axis_name is not None:
        counts = jax.lax.psum(counts, axis_name)
    f = jax.lax.stop_gradient(counts / jnp.maximum(jnp.sum(counts), 1.0))
    return e * jnp.sum(f * mean_probs)


def accumulated_load_balancing_loss(counts, mean_probs, *, pooled: bool = True):
    """LBL from per-micro-batch statistics stacked on a leading axis: ``counts [M, E]``,
    ``mean_probs [M, E]`` (``routing_stats`` of each micro-batch).

    ``pooled=True``: global-batch LBL, ``f`` from the counts summed over all micro-batches.
    ``pooled=False``: the average of the M micro-batch LBLs."""
    counts = jax.lax.stop_gradient(jnp.asarray(counts))
    if counts.ndim != 2 or counts.shape != mean_probs.shape:
        raise ValueError(f"counts and mean_probs must both be [micro_batches, experts]; "
                         f"got {counts.shape} and {mean_probs.shape}")
    e = counts.shape[-1]
    if pooled:
        total = jnp.sum(counts, axis=0)
        f = (total / jnp.maximum(jnp.sum(total), 1.0))[None]
    else:
        f = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
    return jnp.mean(e * jnp.sum(f * mean_probs, axis=-1))


def micro_batch_load_balancing_loss(probs, indices, num_micro_batches: int, *, mask=None):
    """Mean of the LBLs of ``num_micro_batches`` contiguous chunks of the tokens (what each
    data-parallel shard computes when every shard balances only its own tokens)."""
    probs, indices, mask = _flat(probs, indices, mask)
    n = probs.shape[0]
    if n % num_micro_batches:
        raise ValueError(f"{n} tokens cannot be split into {num_micro_batches} equal micro-batches")
    split = lambda a: a.reshape((num_micro_batches, n // num_micro_batches) + a.shape[1:])
    counts, mean_probs = jax.vmap(routing_stats)(split(probs), split(indices), split(mask))
    return accumulated_load_balancing_loss(counts, mean_probs, pooled=False)


def cv_squared(x, eps: float = 1e-10):
    """Squared coefficient of variation ``Var(x) / (mean(x)² + eps)`` (population variance)."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.var(x) / (jnp.mean(x) ** 2 + eps)


def importance(gates, mask=None):
    """Sum of gate values per expert ``[E]``; ``gates [N, E]`` are the values the layer combines
    with (dense softmax probabilities, or top-k weights scattered with ``scatter_gates``)."""
    gates = gates.reshape(-1, gates.shape[-1])
    if mask is not None:
        gates = gates * jnp.asarray(mask, gates.dtype).reshape(-1, 1)
    return jnp.sum(gates, axis=0)


def smooth_load(clean_logits, noisy_logits, noise_std, k: int):
    """Shazeer et al.'s differentiable load estimate for noisy top-k gating: the sum over
    tokens of P(expert i is in the top k | a fresh noise draw for i only)
    ``= Phi((clean_i - threshold_i) / noise_std_i)``, threshold_i = the k-th largest noisy
    logit among the *other* experts. Needs ``k < E``."""
    e = clean_logits.shape[-1]
    if not 1 <= k < e:
        raise ValueError(f"smooth_load needs 1 <= k < num_experts; got k={k} with num_experts={e}")
    top = jax.lax.top_k(noisy_logits, k + 1)[0]
    in_top = noisy_logits > top[..., k:k + 1]
    threshold = jnp.where(in_top, top[..., k:k + 1], top[..., k - 1:k])
    prob = norm.cdf((clean_logits - threshold) / noise_std)
    return jnp.sum(prob.reshape(-1, e), axis=0)


def importance_load_loss(gates, indices=None, *, load=None, weight: float = 0.01, mask=None):
    """``weight * (CV²(importance) + CV²(load))``. ``load`` defaults to the token counts per
    expert from ``indices`` (no gradient); pass ``smooth_load(...)`` for a differentiable one."""
    imp = importance(gates, mask)
    if load is None:
        if indices is None:
            raise ValueError("importance_load_loss needs indices (to count the load) or an explicit load")
        check_top_k(indices.shape[-1], gates.shape[-1])
        load = expert_counts(indices, gates.shape[-1], mask)
    return weight * (cv_squared(imp) + cv_squared(load))


def router_z_loss(logits, mask=None):
    """``mean_n logsumexp(logits_n)²`` (ST-MoE); keeps router logits small."""
    z = jax.nn.logsumexp(logits.reshape(-1, logits.shape[-1]).astype(jnp.float32), axis=-1) ** 2
    if mask is None:
        return jnp.mean(z)
    m = jnp.asarray(mask, z.dtype).reshape(-1)
    return jnp.sum(z * m) / jnp.maximum(jnp.sum(m), 1.0)
