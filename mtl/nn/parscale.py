"""Parallel scaling (ParScale): P streams over the same weights of a causal LM.

``ParScale(model, P)`` wraps a causal LM built as an encoder (a decoder that accepts
per-layer key/value prefixes, e.g. :class:`~mtl.nn.encoders.ByteTransformer`) plus task
heads (the LM head is the task's per-token classifier), as :class:`MultiTaskModel` holds
them. It *takes over* the model's ``encoder`` and ``heads`` (same attribute names, so
the parameter tree of the backbone is unchanged and a P = 1 checkpoint loads into the
backbone of a P > 1 model); do not keep using the wrapped model afterwards.

Forward pass for P > 1 (methods.md §6):

* the input ``[B, L]`` is replicated P times along the batch, *sample-major*: row
  ``b·P + p`` is stream ``p`` of sample ``b``, so a batch sharded over devices in
  contiguous blocks keeps every sample's P streams on its own device (the streams are
  sharded with the batch; no data moves);
* every attention layer gets a per-stream learned key/value prefix of ``prefix_len``
  slots (default 48): always visible to every query, no token position;
* after the final norm the P hidden states are aggregated per token:
  ``w = softmax(Linear(H→P)(SiLU(Linear(P·H→H)(concat_p h_p))))``, smoothed
  ``w ← (1−ε) w + ε/P`` (ε = 0.01), ``h = Σ_p w_p h_p``; then the shared LM head.

P = 1 is exactly the wrapped model: no prefixes, no aggregator, same parameters.

Prefix reparameterisation (``reparam="mlp"``, the default). The authors' released code
is inference-only: its ``prefix_k``/``prefix_v`` are created uninitialised
(``torch.empty``) and only ever loaded from released weights, which is where users'
NaNs in the first layer's prefixes came from; the fix they reported (and the paper's
training recipe, as in prefix tuning) is to train the prefixes through a
reparameterisation. Ours: one small learned seed per stream and slot, ``p′ ∈ R^{P×n×d′}``
(d′ = ``prefix_dim``, N(0, 1) init), shared by all layers, and per layer an MLP
``Linear(d′→m) → tanh → Linear(m→2·heads·head_dim)`` giving that layer's keys and values.
The last layer's kernel starts small (N(0, 0.02²)), so the prefixes start near zero and
near each other (a mild perturbation of the plain model) and the tanh bounds the
hidden activations; gradients reach the prefixes through a well-conditioned MLP rather
than straight into 48·P free vectors per layer. ``reparam="none"`` trains the prefixes
directly (N(0, 0.02²) init). After training the MLP can be folded away: ``prefixes()``
returns the plain ``(k, v)`` arrays, which is all that generation uses.

Two-stage training (:class:`TwoStage`; ``model.parscale.init_from``, ``freeze_backbone``):
the backbone (``encoder`` + ``heads``, :data:`BACKBONE`; the same tree as the P = 1
model's) is loaded from a trained P = 1 run, the prefixes and the aggregator start fresh.
A workdir gives its *best* (validation-selected) parameters, as ``mtl export`` and
``mtl generate`` do by default (the latest checkpoint when no best was saved yet); an
artifact gives its parameters. ``freeze_backbone=True`` trains only the prefixes, gates and
aggregator (``mtl.train.optimizer.freeze``: the backbone stays bit-identical). Refused
before anything is written: a missing path, a base that is not an LM or has P > 1 (its
backbone is not the unit two-stage training starts from; resume that run's own workdir
instead), another architecture (the first differing parameter and both shapes), and
``freeze_backbone`` without ``init_from`` or with P = 1 (nothing meaningful would train).

Zero-init prefix gate (``prefix_gate``; on by default exactly when ``init_from`` is set, so
from-scratch training is unchanged). With plainly concatenated prefixes a two-stage run
cannot start from the base model's loss: the prefix slots take part of every softmax and
dilute the attention even with zero values. Gated (LLaMA-Adapter style), each attention
layer attends to the tokens and to the prefix with a softmax each and adds
``tanh(g_h) · attn_prefix`` per head h (``layers.attend``), with ``g`` of shape
(layers, heads), shared by the streams, initialised to 0. At step 0 every stream is
therefore exactly the base model and so is the aggregate, whatever the aggregation weights
(tested to 1e-6 relative on the validation loss). The gates get gradient from the first
step; the prefixes from the second (their gradient carries the factor tanh(g)), the
aggregator once the streams differ. The KV cache (``generate``) holds the prefixes as
before; the cached decode applies the same two softmaxes.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from mtl.nn.layers import attend, dense, zeros
from mtl.nn.multitask import TaskHeads

REPARAMS = ("mlp", "none")


def _check_P(P) -> int:
    if isinstance(P, bool) or not isinstance(P, int) and not (isinstance(P, float) and P.is_integer()):
        raise ValueError(f"ParScale: P (the number of parallel streams) must be an integer >= 1; got {P!r}")
    if int(P) < 1:
        raise ValueError(f"ParScale: P (the number of parallel streams) must be >= 1; got {P}")
    return int(P)


def prefix_layout(encoder) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder that accepts ``kv_prefixes``.

    A decoder declares it with ``prefix_layout`` (a tuple attribute) or, like
    ByteTransformer, through ``blocks``, ``num_heads`` and ``out_features``."""
    params = inspect.signature(type(encoder).__call__).parameters
    if "kv_prefixes" not in params:
        raise TypeError(f"ParScale needs a decoder whose __call__ accepts kv_prefixes (one (k, v) pair per "
                        f"attention layer, like mtl.nn.ByteTransformer); {type(encoder).__name__} takes "
                        f"{[p for p in params if p != 'self']}")
    if hasattr(encoder, "prefix_layout"):
        return tuple(int(v) for v in encoder.prefix_layout)
    try:
        layers, heads = len(encoder.blocks), int(encoder.num_heads)
        return layers, heads, int(encoder.out_features) // heads
    except AttributeError:
        raise TypeError(f"{type(encoder).__name__} accepts kv_prefixes but says nothing of their shape: give it "
                        "a prefix_layout = (layers, kv_heads, head_dim) attribute") from None


class StreamPrefixes(nnx.Module):
    """Per-stream, per-layer key/value prefixes: ``self()`` -> ``[(k, v)] * layers``, each
    ``[P, n, heads, head_dim]`` (see the module docstring for the reparameterisation)."""

    def __init__(self, P: int, layers: int, heads: int, head_dim: int, length: int = 48, *,
                 reparam: str = "mlp", prefix_dim: int = 16, hidden: int = 32, gated: bool = False,
                 rngs: nnx.Rngs):
        if reparam not in REPARAMS:
            raise ValueError(f"ParScale: reparam must be one of {REPARAMS}; got {reparam!r}")
        self.P, self.layers, self.heads, self.head_dim, self.length = P, layers, heads, head_dim, length
        self.reparam, self.gated = reparam, bool(gated)
        if self.gated:  # per layer and head, shared by the streams; 0 = the prefixes are not seen
            self.gate = nnx.Param(nnx.with_partitioning(zeros, (None, None))(rngs.params(), (layers, heads)))
        small = nnx.initializers.normal(0.02)
        if reparam == "mlp":
            init = nnx.with_partitioning(nnx.initializers.normal(1.0), (None, None, None))
            self.p_prime = nnx.Param(init(rngs.params(), (P, length, prefix_dim)))
            self.up = nnx.List([dense(prefix_dim, hidden, (None, None), rngs=rngs) for _ in range(layers)])
            self.down = nnx.List([dense(hidden, 2 * heads * head_dim, (None, None), kernel_init=small, rngs=rngs)
                                  for _ in range(layers)])
        else:
            shape = (layers, P, length, heads, head_dim)
            init = nnx.with_partitioning(small, (None,) * len(shape))
            self.k = nnx.Param(init(rngs.params(), shape))
            self.v = nnx.Param(init(rngs.params(), shape))

    def gates(self) -> list | None:
        """Per layer the ``[heads]`` gate of the prefix attention (``None`` when not gated)."""
        return [self.gate[...][i] for i in range(self.layers)] if self.gated else None

    def __call__(self) -> list:
        if self.reparam == "none":
            out = [(self.k[...][i], self.v[...][i]) for i in range(self.layers)]
        else:
            out = []
            for up, down in zip(self.up, self.down):
                kv = down(jnp.tanh(up(self.p_prime[...])))  # [P, n, 2·heads·head_dim]
                kv = kv.reshape(self.P, self.length, 2, self.heads, self.head_dim)
                out.append((kv[:, :, 0], kv[:, :, 1]))
        if self.gated:
            out = [kv + (g,) for kv, g in zip(out, self.gates())]
        return out


class Aggregator(nnx.Module):
    """Per-token weights over the P streams: softmax(MLP(concat h_p)), label-smoothed."""

    def __init__(self, P: int, dim: int, smoothing: float = 0.01, *, rngs: nnx.Rngs):
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"ParScale: aggregation smoothing must be in [0, 1); got {smoothing}")
        self.P, self.smoothing = P, float(smoothing)
        self.inner = dense(P * dim, dim, (None, "embed"), rngs=rngs)
        self.outer = dense(dim, P, ("embed", None), rngs=rngs)

    def weights(self, hs):
        """``hs [B, P, L, H]`` -> weights ``[B, L, P]`` (each row sums to 1, >= ε/P)."""
        b, p, n, h = hs.shape
        z = jnp.moveaxis(hs, 1, 2).reshape(b, n, p * h)
        w = jax.nn.softmax(self.outer(jax.nn.silu(self.inner(z))).astype(jnp.float32), axis=-1)
        return ((1.0 - self.smoothing) * w + self.smoothing / p).astype(hs.dtype)

    def __call__(self, hs):
        return jnp.einsum("blp,bplh->blh", self.weights(hs), hs)


#: the wrapped model's parameters, under the names they have in the P = 1 model; ParScale
#: adds ``prefix`` (keys/values, and the gates) and ``aggregator``
BACKBONE = ("encoder", "heads")
#: ``model.parscale`` keys read by the trainer (two-stage training), not by ParScale itself
TRAINER_OPTIONS = ("init_from", "freeze_backbone")


@dataclasses.dataclass(frozen=True)
class TwoStage:
    """Two-stage training (``model.parscale.init_from`` / ``freeze_backbone``): the backbone
    (:data:`BACKBONE`) is loaded from a trained P = 1 run, the prefixes and the aggregator
    start fresh; ``freeze_backbone`` trains only those. Checked here, before anything is
    written: ``freeze_backbone`` needs ``init_from`` and P > 1."""

    init_from: str = ""
    freeze_backbone: bool = False

    @classmethod
    def from_options(cls, opts, P: int) -> "TwoStage":
        init_from = opts.get("init_from") or ""
        if not isinstance(init_from, str):
            raise ValueError(f"model.parscale.init_from must be a path (a P = 1 workdir or `mtl export` artifact); "
                             f"got {init_from!r}")
        freeze = opts.get("freeze_backbone", False)
        if not isinstance(freeze, (bool, np.bool_)):
            raise ValueError(f"model.parscale.freeze_backbone must be True or False; got {freeze!r}")
        if freeze and not init_from:
            raise ValueError("model.parscale.freeze_backbone=True needs model.parscale.init_from (a trained P = 1 "
                             "run): a frozen random backbone would train only prefixes and aggregator on noise")
        if freeze and P == 1:
            raise ValueError("model.parscale.freeze_backbone=True with P = 1 leaves nothing to train (P = 1 has no "
                             "prefixes and no aggregator): set model.parscale.P > 1")
        return cls(init_from, bool(freeze))

    @classmethod
    def from_model_config(cls, model_cfg) -> "TwoStage":
        if model_cfg.get("arch", "shared") != "lm":
            return cls()
        opts = dict(model_cfg.get("parscale", {}) or {})
        return cls.from_options(opts, _check_P(opts.get("P", 1)))

    def is_frozen(self, path: str) -> bool:
        """Is the parameter at ``path`` (``"encoder/blocks/0/..."``) kept fixed?"""
        return self.freeze_backbone and path.split("/", 1)[0] in BACKBONE

    def load_backbone(self, abstract_params) -> dict:
        """The backbone parameters (nested dict ``{encoder, heads}``) of the run or artifact
        ``init_from`` (a workdir gives its *best* parameters, as ``mtl export`` does), checked
        against ``abstract_params`` (the new model's): a missing path, a P > 1 or non-LM base,
        or another architecture (the error names the parameter and both shapes) is refused."""
        from mtl import artifact
        from mtl.checkpoint import CheckpointMismatchError

        path = self.init_from
        if not os.path.exists(path):
            raise FileNotFoundError(f"model.parscale.init_from={path!r}: no such file or directory; give the workdir "
                                    "of a trained P = 1 run (mtl train) or its artifact (mtl export)")
        model_cfg = artifact.run_config(path).get("model", {})
        arch = model_cfg.get("arch", "shared")
        base_P = (model_cfg.get("parscale") or {}).get("P", 1)
        if arch != "lm":
            raise ValueError(f"model.parscale.init_from={path!r} is a model.arch={arch!r} run; two-stage training "
                             "starts from a causal LM (model.arch='lm') with P = 1")
        if base_P != 1:
            raise ValueError(f"model.parscale.init_from={path!r} is a P = {base_P} run; two-stage training starts "
                             "from a P = 1 model (to continue a ParScale run, resume its own workdir)")
        expected = {k: v for k, v in nnx.to_pure_dict(abstract_params).items() if k in BACKBONE}
        try:
            return artifact.load_params_from(path, expected)
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f"model.parscale.init_from: {e} (the base needs this run's "
                                          "model.encoder_kwargs and tasks)") from None


class ParScale(TaskHeads, nnx.Module):
    """``ParScale(model, P)``: ``model(x) -> {task: logits}`` through P parallel streams.

    ``model`` has ``encoder`` (a decoder accepting ``kv_prefixes``), ``heads`` and
    ``task_specs`` (a :class:`~mtl.nn.MultiTaskModel`). Options: ``prefix_len`` slots per
    layer and stream, ``reparam`` ("mlp" or "none"), ``prefix_dim``/``prefix_hidden`` of
    the reparameterisation MLP, ``smoothing`` ε of the aggregation weights, ``prefix_gate``
    (zero-init gated prefix attention, see the module docstring).
    """

    def __init__(self, model, P: int, *, prefix_len: int = 48, reparam: str = "mlp", prefix_dim: int = 16,
                 prefix_hidden: int = 32, smoothing: float = 0.01, prefix_gate: bool = False,
                 rngs: nnx.Rngs | None = None):
        self.P = _check_P(P)
        if not isinstance(prefix_gate, (bool, np.bool_)):
            raise ValueError(f"ParScale: prefix_gate must be True or False; got {prefix_gate!r}")
        for attr in ("encoder", "heads", "task_specs"):
            if not hasattr(model, attr):
                raise TypeError(f"ParScale wraps a causal LM with encoder, heads and task_specs "
                                f"(mtl.nn.MultiTaskModel); {type(model).__name__} has no {attr!r}")
        layers, heads, head_dim = prefix_layout(model.encoder)
        self.task_specs = tuple(model.task_specs)
        self.encoder = model.encoder
        self.heads = model.heads
        self.prefix_len = 0
        self.prefix_gated = False
        if self.P > 1:
            if rngs is None:
                raise ValueError("ParScale with P > 1 creates prefixes and an aggregator: pass rngs=nnx.Rngs(seed)")
            max_prefix = getattr(self.encoder, "max_prefix", None)
            if int(prefix_len) < 1 or (max_prefix is not None and int(prefix_len) > int(max_prefix)):
                limit = f"1..{max_prefix}" if max_prefix is not None else ">= 1"
                raise ValueError(f"ParScale: prefix_len must be {limit} for {type(self.encoder).__name__}; "
                                 f"got {prefix_len}")
            self.prefix_len = int(prefix_len)
            self.prefix = StreamPrefixes(self.P, layers, heads, head_dim, self.prefix_len, reparam=reparam,
                                         prefix_dim=int(prefix_dim), hidden=int(prefix_hidden),
                                         gated=bool(prefix_gate), rngs=rngs)
            self.prefix_gated = bool(prefix_gate)
            self.aggregator = Aggregator(self.P, int(self.encoder.out_features), smoothing, rngs=rngs)

    # ------------------------------------------------------------------ streams
    def replicate(self, x):
        """``[B, ...]`` -> ``[B·P, ...]``, row ``b·P + p`` = stream p of sample b."""
        return jnp.repeat(x, self.P, axis=0)

    def prefixes(self, batch: int) -> list:
        """The per-layer ``(k, v)`` prefixes tiled to ``[batch·P, n, heads, head_dim]`` (and,
        with ``prefix_gate``, that layer's ``[heads]`` gate: ``(k, v, gate)``)."""
        return [(jnp.tile(kv[0], (batch, 1, 1, 1)), jnp.tile(kv[1], (batch, 1, 1, 1))) + tuple(kv[2:])
                for kv in self.prefix()]

    def stream_features(self, x):
        """Final-norm hidden states of every stream, ``[B, P, L, H]`` (P > 1)."""
        b = x.shape[0]
        h = self.encoder(self.replicate(x), kv_prefixes=self.prefixes(b))
        return h.reshape((b, self.P) + h.shape[1:])

    def aggregation_weights(self, x):
        """``[B, L, P]`` weights of the streams for input ``x`` (P > 1)."""
        return self.aggregator.weights(self.stream_features(x))

    # ------------------------------------------------------------------ the model interface
    def features(self, x):
        if self.P == 1:
            return self.encoder(x)
        return self.aggregator(self.stream_features(x))

    def heads_from_features(self, z) -> dict:
        return {t.name: self.heads[t.name](z) for t in self.tasks}

    def __call__(self, x) -> dict:
        return self.heads_from_features(self.features(x))


def non_embedding_params(model) -> int:
    """Parameters of the backbone's blocks and final norm (what the ParScale law calls N):
    everything in ``encoder`` except token/position embeddings; the LM head, prefixes and
    aggregator are not counted (the paper's N is the shared backbone)."""
    n = 0
    for path, v in nnx.to_flat_state(nnx.state(model.encoder, nnx.Param)):
        if path[0] in ("tok", "pos"):
            continue
        n += math.prod(v.shape) if hasattr(v, "shape") else math.prod(v[...].shape)
    return int(n)


# ---------------------------------------------------------------------- generation with a KV cache

@dataclasses.dataclass(frozen=True)
class Generation:
    """What :func:`generate` returns: the tokens (prompt + new, one row per batch entry), row 0
    as text, and measured costs: prefill time, decode time per token (the new tokens after the
    first are decoded in one compiled loop; its wall time over their number), KV cache bytes
    (of which ``prefix_cache_bytes`` hold the P streams' prefixes)."""

    tokens: np.ndarray
    text: str
    batch: int
    P: int
    prefill_s: float
    decode_s_per_token: float
    kv_cache_bytes: int
    prefix_cache_bytes: int

    def summary(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("tokens")
        return d


def _lm_task(model, task):
    names = [t.name for t in model.task_specs]
    if task is None:
        if len(names) != 1:
            raise ValueError(f"the model has tasks {names}: say which one is the LM head (task=...)")
        return names[0]
    if task not in names:
        raise ValueError(f"no task {task!r}; the model's tasks are {names}")
    return task


def _check_decoder(enc):
    need = ["tok", "pos", "blocks", "norm"]
    missing = [a for a in need if not hasattr(enc, a)]
    blk = enc.blocks[0] if hasattr(enc, "blocks") and len(enc.blocks) else None
    if blk is not None:
        missing += [f"blocks[i].{a}" for a in ("norm1", "attn", "norm2", "mlp") if not hasattr(blk, a)]
    if missing:
        raise TypeError(f"cached generation walks a ByteTransformer-style decoder (tok, pos, blocks of "
                        f"norm1/attn/norm2/mlp, norm); {type(enc).__name__} lacks {missing}")


def init_cache(model, batch: int, max_len: int, dtype=jnp.float32) -> list:
    """Per-layer ``(k, v)`` caches ``[batch·P, prefix_len + max_len, heads, head_dim]``; the
    first ``prefix_len`` slots hold the streams' prefixes (always visible)."""
    layers, heads, hd = prefix_layout(model.encoder)
    rows, n_pre = batch * model.P, model.prefix_len
    pre = model.prefixes(batch) if model.P > 1 else None
    cache = []
    for i in range(layers):
        k = jnp.zeros((rows, n_pre + max_len, heads, hd), dtype)
        v = jnp.zeros_like(k)
        if pre is not None:
            k = k.at[:, :n_pre].set(pre[i][0].astype(dtype))
            v = v.at[:, :n_pre].set(pre[i][1].astype(dtype))
        cache.append((k, v))
    return cache


def forward_cached(model, tokens, cache, start, task: str):
    """Logits ``[B, c, vocab]`` of ``tokens [B, c]`` at positions ``start .. start+c-1`` given a
    cache holding the positions before; returns ``(logits, new_cache)``."""
    enc = model.encoder
    b, c = tokens.shape
    x = model.replicate(tokens) if model.P > 1 else tokens
    h = enc.tok(x.astype(jnp.int32)) + jax.lax.dynamic_slice_in_dim(enc.pos[...], start, c, axis=0)[None]
    n_pre, total = model.prefix_len, cache[0][0].shape[1]
    slot = jnp.arange(total)[None, :]
    allowed = (slot < n_pre) | (slot - n_pre <= start + jnp.arange(c)[:, None])  # [c, total]
    gates = model.prefix.gates() if model.prefix_gated else [None] * len(cache)
    new = []
    for blk, (kc, vc), gate in zip(enc.blocks, cache, gates):
        attn = blk.attn
        q, k, v = jnp.split(attn.qkv(blk.norm1(h)), 3, axis=2)
        kc = jax.lax.dynamic_update_slice_in_dim(kc, k.astype(kc.dtype), n_pre + start, axis=1)
        vc = jax.lax.dynamic_update_slice_in_dim(vc, v.astype(vc.dtype), n_pre + start, axis=1)
        h = h + attn.out(attend(q, kc, vc, allowed, n_pre, gate))
        h = h + blk.mlp(blk.norm2(h))
        new.append((kc, vc))
    h = enc.norm(h)
    if model.P > 1:
        h = model.aggregator(h.reshape((b, model.P) + h.shape[1:]))
    return model.heads[task](h), new


def prompt_tokens(prompt, vocab_size: int) -> np.ndarray:
    """``str`` (UTF-8 bytes), ``bytes`` or a sequence of ids -> int32 ids, checked against the vocabulary."""
    ids = np.frombuffer(prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt), np.uint8) \
        if isinstance(prompt, (str, bytes, bytearray)) else np.asarray(prompt)
    ids = ids.astype(np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("the prompt is empty: give at least one byte")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"the prompt has token ids {sorted(set(bad.tolist()))[:8]} outside the model's "
                         f"vocabulary 0..{vocab_size - 1}")
    return ids.astype(np.int32)


def generate(model, prompt, max_new: int, *, temperature: float = 0.0, batch: int = 1, seed: int = 0,
             task: str | None = None) -> Generation:
    """Decode ``max_new`` tokens after ``prompt`` with a KV cache (greedy when
    ``temperature == 0``, else sampling from softmax(logits / temperature)); ``batch``
    copies of the prompt are decoded together (independent samples when sampling).
    ``model`` is a :class:`ParScale` (any P) or a plain MultiTaskModel (= P 1)."""
    if not isinstance(model, ParScale):
        model = ParScale(model, 1)
    _check_decoder(model.encoder)
    task = _lm_task(model, task)
    vocab = int(getattr(model.encoder, "vocab_size", 256))
    ids = prompt_tokens(prompt, vocab)
    max_len = int(model.encoder.pos.shape[0])
    if int(max_new) < 1 or ids.size + int(max_new) > max_len:
        raise ValueError(f"prompt ({ids.size} tokens) + max_new ({max_new}) must be within the model's "
                         f"maximum sequence length {max_len}, with max_new >= 1")
    if int(batch) < 1:
        raise ValueError(f"batch must be >= 1; got {batch}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    graphdef, state = nnx.split(model)

    def pick(logits, key):
        if temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits.astype(jnp.float32) / temperature, axis=-1).astype(jnp.int32)

    def prefill(state, toks, key):
        m = nnx.merge(graphdef, state)
        cache = init_cache(m, toks.shape[0], max_len)
        logits, cache = forward_cached(m, toks, cache, 0, task)
        return pick(logits[:, -1], key), cache

    n_new = int(max_new)

    def decode_all(state, first, cache, keys):
        """Tokens 2..max_new in ONE compiled loop (no host round trip per token)."""
        m = nnx.merge(graphdef, state)

        def body(i, carry):
            tok, cache, out = carry
            logits, cache = forward_cached(m, tok[:, None], cache, ids.size + i - 1, task)
            tok = pick(logits[:, -1], keys[i])
            return tok, cache, out.at[:, i].set(tok)

        out = jnp.zeros((first.shape[0], n_new), jnp.int32).at[:, 0].set(first)
        _, cache, out = jax.lax.fori_loop(1, n_new, body, (first, cache, out))
        return out, cache

    toks = jnp.asarray(np.tile(ids[None], (int(batch), 1)))
    keys = jax.random.split(jax.random.key(seed), n_new)
    prefill_c = jax.jit(prefill).lower(state, toks, keys[0]).compile()
    nxt, cache = jax.eval_shape(prefill, state, toks, keys[0])
    decode_c = jax.jit(decode_all, donate_argnums=(2,)).lower(state, nxt, cache, keys).compile()
    t0 = time.perf_counter()
    nxt, cache = prefill_c(state, toks, keys[0])
    jax.block_until_ready(nxt)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    new_tokens, cache = decode_c(state, nxt, cache, keys)
    jax.block_until_ready(new_tokens)
    decode_s = (time.perf_counter() - t0) / (n_new - 1) if n_new > 1 else float("nan")
    tokens = np.concatenate([np.tile(ids[None], (int(batch), 1)), np.asarray(new_tokens)], axis=1)
    cache_bytes = sum(int(k.nbytes) + int(v.nbytes) for k, v in cache)
    layers, heads, hd = prefix_layout(model.encoder)
    itemsize = np.dtype(cache[0][0].dtype).itemsize
    prefix_bytes = 2 * layers * int(batch) * model.P * model.prefix_len * heads * hd * itemsize
    return Generation(tokens=tokens, text=bytes(tokens[0].astype(np.uint8).tolist()).decode("utf-8", "replace"),
                      batch=int(batch), P=model.P, prefill_s=prefill_s,
                      decode_s_per_token=float(decode_s),
                      kv_cache_bytes=cache_bytes, prefix_cache_bytes=prefix_bytes)
