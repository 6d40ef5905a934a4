"""Expert-parallel MoE: ``jax.shard_map`` with all-to-all and grouped matmuls, plus a
capacity-buffer dispatch whose compiled FLOPs reflect sparsity.

Both replace the ``dispatch -> experts.per_expert -> combine`` part of ``SparseMoE`` (the
dense one-hot einsum reference in ``layer.py``) and follow the *same* overflow policy
(``routing.py``): a (token, choice) assignment's slot is its position among all
assignments to its expert in global priority order (choice-major, then token order over
the whole, un-sharded token sequence); slots ``>= capacity`` are dropped. So the three
implementations give the same outputs and gradients, drops included (tested on 8
simulated devices, mesh ``data=2, expert=4``).

``expert_parallel_ffn`` (``impl="shard_map"``), per device, with S token shards (the mesh
axes named in ``token_axes``) and X expert shards (``expert_axis``), ``E_l = E / X`` local
experts:

1. count the local assignments per (choice, expert) and ``all_gather`` the counts over the
   token shards (a [S, k, E] integer array): with them every shard computes the *global*
   slot of each of its assignments, hence exactly the reference's drops;
2. pack each kept assignment's token into a send buffer ``[X, B, d]`` by destination shard
   (``B = min(n_local * k, E_l * capacity)``: no second source of drops) and exchange with
   ``jax.lax.all_to_all`` over ``expert_axis``;
3. sort the received rows by local expert and run the experts as grouped matmuls
   (``jax.lax.ragged_dot``), unsort, ``all_to_all`` back, and combine with the gate weights.

Any token count works: when ``N`` is not a multiple of S the tokens are padded at the end
(``padded_tokens``) with rows routed to no expert (index ``E``, gate weight 0), which take
no capacity slot, are never sent, and are cut from the outputs; routing statistics are
computed by the caller on the real tokens only. Without a mesh (or with one token shard and
one expert shard) the same code runs locally with no collectives. On CPU/GPU ``ragged_dot`` lowers to a dense masked product (XLA's
cost analysis then counts all E groups for every row); ``capacity_ffn`` (``impl="capacity"``)
scatters tokens into ``[E, capacity, d]`` buffers and gathers them back, so its FLOPs are
``E * capacity`` expert evaluations: the one to measure sparse compute with.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mtl.nn.moe.experts import _activation
from mtl.nn.moe.routing import assignment_slots


def _mesh_sizes(mesh) -> dict:
    return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))


def check_expert_parallel(num_experts: int, num_tokens: int, mesh, token_axes, expert_axis: str) -> tuple:
    """``(S, X)``: the number of token shards and expert shards; ValueError naming the numbers
    when the experts do not split evenly over the expert axis. Any ``num_tokens >= 1`` works:
    ``expert_parallel_ffn`` pads the tokens to a multiple of S (see ``padded_tokens``)."""
    sizes = _mesh_sizes(mesh)
    if expert_axis not in sizes:
        raise ValueError(f"the mesh has no axis {expert_axis!r} for the experts; its axes are {tuple(sizes)}")
    x = sizes[expert_axis]
    s = math.prod(sizes[a] for a in token_axes)
    if num_experts % x:
        raise ValueError(f"{num_experts} experts cannot be split over the mesh's {expert_axis!r} axis of size {x}: "
                         f"use a multiple of {x} experts or a smaller {expert_axis!r} mesh axis")
    if num_tokens < 1:
        raise ValueError(f"expert-parallel MoE got {num_tokens} tokens; it needs at least one")
    return s, x


def padded_tokens(num_tokens: int, num_shards: int) -> int:
    """The token count ``expert_parallel_ffn`` runs on: ``num_tokens`` rounded up to a multiple
    of the ``num_shards`` token shards. Padding tokens get no expert (index ``E``): they take
    no capacity slot, are never sent, come back as zeros and are cut off before returning."""
    return -(-int(num_tokens) // int(num_shards)) * int(num_shards)


def default_token_axes(mesh, expert_axis: str = "expert") -> tuple:
    """Mesh axes the tokens are split over: ``data``, ``fsdp`` and the expert axis (the
    ``batch`` rule of ``mtl.sharding.DEFAULT_RULES``), those of size > 1 in mesh order."""
    sizes = _mesh_sizes(mesh)
    return tuple(a for a in mesh.axis_names if a in ("data", "fsdp", expert_axis) and sizes[a] > 1)


# ----------------------------------------------------------------------------- local pieces

def _ffn_sorted(rows, expert_ids, valid, params, activation, num_local: int):
    """Run rows ``[M, d]`` through their local experts with grouped matmuls.

    Invalid rows are sorted last, fall outside every group and come back as 0."""
    key = jnp.where(valid, expert_ids, num_local)
    order = jnp.argsort(key, stable=True)
    inv = jnp.argsort(order)
    xs, ks = rows[order], key[order]
    sizes = jnp.sum(jax.nn.one_hot(key, num_local + 1, dtype=jnp.int32), axis=0)[:num_local]
    kid = jnp.minimum(ks, num_local - 1)
    h = jax.lax.ragged_dot(xs, params["w_up"], sizes) + params["b_up"][kid]
    h = _activation(activation)(h)
    out = jax.lax.ragged_dot(h, params["w_down"], sizes) + params["b_down"][kid]
    out = jnp.where((ks < num_local)[:, None], out, 0.0)
    return out[inv]


def _local_slots(indices, num_experts, token_axes, num_shards):
    """Global slots ``[n, k]`` of this shard's assignments (the reference's priority order)."""
    n, k = indices.shape
    onehot = jax.nn.one_hot(indices, num_experts, dtype=jnp.int32)           # [n, k, E]
    local_pos = jnp.cumsum(onehot, axis=0) - onehot                          # exclusive over tokens
    counts = jnp.sum(onehot, axis=0)                                          # [k, E]
    if num_shards > 1:
        every = jax.lax.all_gather(counts, token_axes)                       # [S, k, E]
        me = jax.lax.axis_index(token_axes)
        before_shard = jnp.sum(jnp.where((jnp.arange(num_shards) < me)[:, None, None], every, 0), axis=0)
        total = jnp.sum(every, axis=0)
    else:
        before_shard, total = jnp.zeros_like(counts), counts
    before_choice = jnp.cumsum(total, axis=0) - total                         # exclusive over choices
    base = before_choice + before_shard                                       # [k, E]
    return jnp.sum(onehot * (local_pos + base[None]), axis=-1)               # [n, k]


def _ep_local(x, weights, indices, params, *, num_experts, capacity, activation, token_axes, expert_axis,
              num_shards, num_expert_shards):
    n, k = indices.shape
    d = x.shape[-1]
    x_shards = num_expert_shards
    num_local = num_experts // x_shards
    slots = _local_slots(indices, num_experts, token_axes, num_shards)
    kept = (slots < capacity) & (indices < num_experts)    # index E = a padding token: no expert
    dest = (indices // num_local).reshape(-1)                                 # [n*k]
    local_id = (indices % num_local).reshape(-1)
    keptf = kept.reshape(-1)
    buf = min(n * k, num_local * capacity)
    dest_1h = jax.nn.one_hot(dest, x_shards, dtype=jnp.int32) * keptf[:, None].astype(jnp.int32)
    rank = jnp.sum((jnp.cumsum(dest_1h, axis=0) - dest_1h) * dest_1h, axis=-1)
    pos = jnp.where(keptf, dest * buf + rank, x_shards * buf)                 # out of bounds = not sent
    token = jnp.repeat(jnp.arange(n), k)
    send_x = jnp.zeros((x_shards * buf, d), x.dtype).at[pos].set(x[token], mode="drop")
    send_id = jnp.zeros((x_shards * buf,), jnp.int32).at[pos].set(local_id, mode="drop")
    send_ok = jnp.zeros((x_shards * buf,), bool).at[pos].set(True, mode="drop")
    if x_shards > 1:
        a2a = functools.partial(jax.lax.all_to_all, axis_name=expert_axis, split_axis=0, concat_axis=0, tiled=True)
        recv_x, recv_id, recv_ok = a2a(send_x), a2a(send_id), a2a(send_ok)
    else:
        recv_x, recv_id, recv_ok = send_x, send_id, send_ok
    out = _ffn_sorted(recv_x, recv_id, recv_ok, params, activation, num_local)
    if x_shards > 1:
        out = a2a(out)
    gathered = out.at[pos].get(mode="fill", fill_value=0).reshape(n, k, d)
    w = jnp.where(kept, weights, 0.0).astype(x.dtype)
    return jnp.einsum("nk,nkd->nd", w, gathered), kept


def expert_parallel_ffn(x, weights, indices, params: dict, *, num_experts: int, capacity: int,
                        activation="gelu", mesh=None, token_axes=None, expert_axis: str = "expert"):
    """MoE expert computation for tokens ``x [N, d]`` routed to ``indices [N, k]`` with gate
    ``weights [N, k]``: ``(y [N, d], kept [N, k])``.

    ``params``: ``w_up [E, d, h], b_up [E, h], w_down [E, h, d], b_down [E, d]``. ``mesh``:
    default the current mesh (``jax.set_mesh``); none (or one device) runs locally. The
    tokens are split over ``token_axes`` (default ``default_token_axes``; padded to a multiple
    of the token shards when needed), the experts over ``expert_axis``."""
    n = x.shape[0]
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        mesh = None if mesh.empty else mesh
    local = functools.partial(_ep_local, num_experts=num_experts, capacity=capacity, activation=activation,
                              expert_axis=expert_axis)
    if mesh is None:
        return local(x, weights, indices, params, token_axes=(), num_shards=1, num_expert_shards=1)
    if expert_axis not in mesh.axis_names:
        raise ValueError(f"the mesh has no axis {expert_axis!r} for the experts; its axes are {mesh.axis_names}")
    token_axes = default_token_axes(mesh, expert_axis) if token_axes is None else tuple(token_axes)
    s, xs = check_expert_parallel(num_experts, n, mesh, token_axes, expert_axis)
    if s == 1 and xs == 1:
        return local(x, weights, indices, params, token_axes=(), num_shards=1, num_expert_shards=1)
    pad = padded_tokens(n, s) - n
    if pad:   # padding tokens at the end, routed to no expert: the real tokens keep their slots
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        indices = jnp.pad(indices, ((0, pad), (0, 0)), constant_values=num_experts)
    tok = jax.P(token_axes if token_axes else None)
    exp = jax.P(expert_axis if xs > 1 else None)
    fn = jax.shard_map(functools.partial(local, token_axes=token_axes, num_shards=s, num_expert_shards=xs),
                       mesh=mesh, in_specs=(tok, tok, tok, {k: exp for k in params}), out_specs=(tok, tok),
                       check_vma=False)
    y, kept = fn(x, weights, indices, params)
    return (y[:n], kept[:n]) if pad else (y, kept)


def capacity_ffn(x, weights, indices, experts, *, capacity: int, valid=None):
    """Scatter tokens into ``[E, capacity, d]`` buffers (same slots and drops as the
    reference), run ``experts.per_expert`` and gather back: ``(y [N, d], kept [N, k])``.

    ``valid [N, k]`` (optional): assignments marked False (an index of ``E``: an expert
    pruned away) take no slot and contribute nothing."""
    n, k = indices.shape
    e = experts.num_experts
    slots = assignment_slots(indices, e)       # an index of E one-hots to zeros: takes no slot
    kept = slots < capacity if valid is None else (slots < capacity) & valid
    flat = jnp.where(kept, indices * capacity + slots, e * capacity).reshape(-1)
    token = jnp.repeat(jnp.arange(n), k)
    buf = jnp.zeros((e * capacity, x.shape[-1]), x.dtype).at[flat].set(x[token], mode="drop")
    out = experts.per_expert(buf.reshape(e, capacity, -1)).reshape(e * capacity, -1)
    gathered = out.at[flat].get(mode="fill", fill_value=0).reshape(n, k, -1)
    w = jnp.where(kept, weights, 0.0).astype(x.dtype)
    return jnp.einsum("nk,nkd->nd", w, gathered), kept
