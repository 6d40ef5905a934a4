"""Routing diagnostics: pure functions on the routing arrays a forward returns
(``SparseMoE`` aux, ``M3ViT`` ``aux["routing"][task][layer]``; dense gated layers use
``model.gate_diagnostics``, which also counts zero activations per expert).

* ``expert_load(indices, num_experts, kept=None)`` — fraction of (kept) token->expert
  assignments per expert ``[E]`` (sums to 1);
* ``router_entropy(probs)`` — mean over tokens of the entropy (nats) of the router softmax;
  ``load_entropy(load)`` — entropy of the load distribution (``log E`` = perfectly balanced);
* ``task_expert_share(probs_by_task)`` — ``[T, E]``: each task's share of every expert's
  total gate mass (columns sum to 1);
* ``domain_routing(indices, domains, num_domains, num_experts, kept=None)`` — ``[D, E]``:
  per-domain routing distribution (row d = expert_load of domain d's tokens);
* ``domain_expert_mutual_information(routing, domain_weights=None)`` — I(domain; expert)
  in nats from per-domain distributions: 0 = experts ignore the domain, ``log D`` = every
  expert serves one domain only (full specialisation);
* ``zero_fraction(activations)`` — ``[E]`` fraction of exactly-zero activations per expert
  from ``[E, N, h]`` activations.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_load(indices, num_experts: int, kept=None):
    onehot = jax.nn.one_hot(jnp.asarray(indices).reshape(-1), num_experts)
    if kept is not None:
        onehot = onehot * jnp.asarray(kept, onehot.dtype).reshape(-1, 1)
    counts = onehot.sum(0)
    return counts / jnp.maximum(counts.sum(), 1.0)


def _entropy(p, axis=-1):
    p = jnp.asarray(p, jnp.float32)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def router_entropy(probs):
    probs = jnp.asarray(probs)
    return jnp.mean(_entropy(probs.reshape(-1, probs.shape[-1])))


def load_entropy(load):
    return _entropy(load)


def task_expert_share(probs_by_task):
    """``probs_by_task``: ``[T, ..., E]`` (or a list of per-task ``[..., E]`` arrays)."""
    p = jnp.stack([jnp.asarray(a).reshape(-1, jnp.shape(a)[-1]) for a in probs_by_task])
    mass = p.sum(1)                                               # [T, E]
    total = mass.sum(0, keepdims=True)
    return jnp.where(total > 0, mass / jnp.where(total > 0, total, 1.0), 0.0)


def domain_routing(indices, domains, num_domains: int, num_experts: int, kept=None):
    """``indices [B, ..., k]`` with one domain id per example ``domains [B]``."""
    indices = jnp.asarray(indices)
    b = indices.shape[0]
    per = indices.reshape(b, -1)                                  # [B, L*k]
    onehot = jax.nn.one_hot(per, num_experts)                     # [B, L*k, E]
    if kept is not None:
        onehot = onehot * jnp.asarray(kept, onehot.dtype).reshape(b, -1, 1)
    dom = jax.nn.one_hot(jnp.asarray(domains), num_domains)       # [B, D]
    counts = jnp.einsum("bd,bme->de", dom, onehot)
    return counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)


def domain_expert_mutual_information(routing, domain_weights=None):
    """I(domain; expert) from ``routing [D, E]`` (rows: per-domain distributions) and the
    domains' weights (default uniform)."""
    routing = jnp.asarray(routing, jnp.float32)
    d = routing.shape[0]
    w = jnp.full((d,), 1.0 / d) if domain_weights is None else jnp.asarray(domain_weights, jnp.float32)
    w = w / w.sum()
    marginal = jnp.einsum("d,de->e", w, routing)
    return _entropy(marginal) - jnp.sum(w * _entropy(routing))


def zero_fraction(activations):
    a = jnp.asarray(activations)
    return jnp.mean((a == 0).reshape(a.shape[0], -1), axis=1)
