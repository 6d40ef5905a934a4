"""ParScale benchmark: train step of P streams vs P = 1, KV-cached decoding vs recomputation,
and the memory / latency of ParScale against parameter scaling. Ratios are measured in one run.

    python experiments/bench/parscale.py                                  # all parts, tiny + small
    python experiments/bench/parscale.py --parts decode --sizes small --tokens 256
    python experiments/bench/parscale.py --pairs tiny:4=small:1 --out experiments/results/parscale_bench.md

Parts (``--parts``):

* ``train`` - one train step (Adam, ``--batch`` sequences of ``--seq`` bytes, the model of
  ``configs/parscale.py:SIZE``) for each P: milliseconds, the ratio to P = 1 (goal: <= P,
  close to P where the step is compute-bound), XLA's FLOPs ratio and the compiled step's
  temporary memory.
* ``decode`` - ``--tokens`` new tokens after a 4-byte prompt at batch 1 and 8:
  tokens/s with the KV cache (:func:`mtl.nn.parscale.generate`) against recomputing the
  whole causal forward over a fixed window for every new token (one compiled program, the
  window padded; causal attention makes the padding invisible), and their ratio
  (goal: >= 5x at 256 tokens).
* ``memory`` - for each pair ``SIZE:P=SIZE:P`` (by default every ``SIZE:4`` and ``SIZE:8``
  against the next larger size at P = 1, the candidates for equal quality; which pair is
  really of equal loss comes from the law fit of ``experiments/parscale.py``): parameter
  bytes, KV-cache bytes and decode latency per token at batch 1 and 8, and, as the paper
  frames it, the *increase* over the smaller P = 1 model that each way of scaling costs:
  ParScale's (SIZE:P - SIZE:1) against parameter scaling's (LARGER:1 - SIZE:1).

The model's position table is sized for the decode window (``--tokens`` + prompt), not the
config's 128, so the decode measurement is over the length asked for.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from mtl.nn.build import model_factory  # noqa: E402
from mtl.nn.heads import LanguageModel  # noqa: E402
from mtl.tasks import Task  # noqa: E402

TASKS = [Task("next_byte", LanguageModel(256))]
SIZE_ORDER = ("tiny", "small", "medium", "large")
PROMPT = "def "


def model_cfg(size: str, P: int):
    from mtl.config import load_config_file

    cfg = load_config_file(os.path.join(os.path.dirname(__file__), "..", "..", "configs", f"parscale.py:{size}"))
    ps = dict(cfg.model.parscale)
    ps["P"] = int(P)
    cfg.model.parscale = ps
    return cfg


def build_model(size: str, P: int, seq: int, seed: int = 0):
    cfg = model_cfg(size, P)
    factory = model_factory(cfg.model, TASKS, (seq,))
    with nnx.use_eager_sharding(False):
        return factory(nnx.Rngs(seed))


def _min_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------ train step

def _train_steps(size: str, P: int, seq: int):
    from mtl import sharding as shd
    from mtl.train.optimizer import make_optimizer
    from mtl.train.step import Steps

    cfg = model_cfg(size, P)
    factory = model_factory(cfg.model, TASKS, (seq,))
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    return Steps(factory, TASKS, make_optimizer("adam", 1e-3, 10, schedule="constant"), mesh)


def lm_batch(batch: int, seq: int, seed: int = 0) -> dict:
    w = np.random.default_rng(seed).integers(0, 256, (batch, seq + 1)).astype(np.int32)
    return {"inputs": w[:, :-1], "labels": {"next_byte": w[:, 1:]}, "masks": {"next_byte": np.ones(batch, bool)}}


def bench_train(size: str, Ps, batch: int, seq: int, repeats: int) -> list[dict]:
    rows = []
    data = lm_batch(batch, seq)
    for P in Ps:
        steps = _train_steps(size, P, seq)
        state = steps.init()
        b = steps.put_batch(data)
        with steps.activate():
            compiled = steps.train_step.lower(state, b).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        mem = compiled.memory_analysis()
        holder = {"s": state}

        def one():
            holder["s"], m = steps.step(holder["s"], b)
            return m

        one()
        rows.append({"size": size, "P": P, "ms": _min_time(one, repeats) * 1e3,
                     "flops": float(cost.get("flops", float("nan"))),
                     "temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20})
    base = next(r for r in rows if r["P"] == min(Ps))
    for r in rows:
        r["time_ratio"], r["flops_ratio"] = r["ms"] / base["ms"], r["flops"] / base["flops"]
    return rows


# ------------------------------------------------------------------ decoding

def recompute_decode(model, prompt_ids: np.ndarray, new: int, batch: int, window: int) -> float:
    """Seconds per new token when every token recomputes the causal forward over a fixed
    ``window`` (the sequence so far, zero-padded): greedy, like ``generate``, and like it
    one compiled loop over the tokens (no host round trip per token)."""
    graphdef, state = nnx.split(model)
    p0 = prompt_ids.size - 1

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)

        def body(i, x):
            pos = p0 + i
            logits = m(x)["next_byte"]
            tok = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False), -1)
            return jax.lax.dynamic_update_index_in_dim(x, tok.astype(x.dtype)[:, None], pos + 1, axis=1)

        return jax.lax.fori_loop(0, new, body, x)

    x = np.zeros((batch, window), np.int32)
    x[:, :prompt_ids.size] = prompt_ids
    x = jnp.asarray(x)
    jax.block_until_ready(run(state, x))  # compile
    t0 = time.perf_counter()
    jax.block_until_ready(run(state, x))
    return (time.perf_counter() - t0) / new


def bench_decode(size: str, Ps, tokens: int, batches) -> list[dict]:
    from mtl.nn.parscale import generate, prompt_tokens

    window = tokens + len(PROMPT)
    ids = prompt_tokens(PROMPT, 256)
    rows = []
    for P in Ps:
        model = build_model(size, P, window)
        for b in batches:
            g = generate(model, PROMPT, tokens, batch=b)
            t_re = recompute_decode(model, ids, tokens, b, window)
            rows.append({"size": size, "P": P, "batch": b, "cached_tok_s": b / g.decode_s_per_token,
                         "recompute_tok_s": b / t_re, "speedup": t_re / g.decode_s_per_token,
                         "decode_ms": g.decode_s_per_token * 1e3, "kv_mb": g.kv_cache_bytes / 2**20,
                         "prefix_mb": g.prefix_cache_bytes / 2**20})
    return rows


# ------------------------------------------------------------------ memory / latency vs parameter scaling

def param_bytes(model) -> int:
    return int(sum(np.asarray(v).nbytes for v in jax.tree.leaves(nnx.state(model, nnx.Param))))


def footprint(size: str, P: int, tokens: int, batches) -> dict:
    from mtl.nn.parscale import generate, non_embedding_params

    model = build_model(size, P, tokens + len(PROMPT))
    out = {"size": size, "P": P, "N": non_embedding_params(model), "param_mb": param_bytes(model) / 2**20}
    for b in batches:
        g = generate(model, PROMPT, tokens, batch=b)
        out[f"kv_mb_b{b}"] = g.kv_cache_bytes / 2**20
        out[f"ms_b{b}"] = g.decode_s_per_token * 1e3
    return out


def parse_pair(text: str):
    try:
        a, b = text.split("=")
        (sa, pa), (sb, pb) = (x.split(":") for x in (a, b))
        return (sa, int(pa)), (sb, int(pb))
    except ValueError:
        raise SystemExit(f"--pairs: expected SIZE:P=SIZE:P (e.g. tiny:4=small:1); got {text!r}") from None


def default_pairs(sizes) -> list:
    out = []
    for s in sizes:
        i = SIZE_ORDER.index(s)
        if i + 1 < len(SIZE_ORDER) and SIZE_ORDER[i + 1] in sizes:
            out += [((s, 4), (SIZE_ORDER[i + 1], 1)), ((s, 8), (SIZE_ORDER[i + 1], 1))]
    return out


def bench_memory(pairs, tokens: int, batches) -> list[str]:
    cache = {}

    def fp(sp):
        if sp not in cache:
            cache[sp] = footprint(sp[0], sp[1], tokens, batches)
        return cache[sp]

    lines = ["| ParScale | parameter scaling | N (PS / PM) | param MB | " +
             " | ".join(f"KV MB b={b} | ms/token b={b}" for b in batches) +
             " | memory increase PS : PM, b=1 | latency increase PS : PM, b=1 |",
             "|---|---|---:|---:|" + "---:|---:|" * len(batches) + "---:|---:|"]
    for (ps, pm) in pairs:
        a, m, base = fp(ps), fp(pm), fp((ps[0], 1))
        mem = lambda r: r["param_mb"] + r[f"kv_mb_b{batches[0]}"]  # noqa: E731
        dmem_ps, dmem_pm = mem(a) - mem(base), mem(m) - mem(base)
        dlat_ps = a[f"ms_b{batches[0]}"] - base[f"ms_b{batches[0]}"]
        dlat_pm = m[f"ms_b{batches[0]}"] - base[f"ms_b{batches[0]}"]
        cells = " | ".join(f"{a[f'kv_mb_b{b}']:.2f} / {m[f'kv_mb_b{b}']:.2f} | {a[f'ms_b{b}']:.2f} / {m[f'ms_b{b}']:.2f}"
                           for b in batches)
        lines.append(f"| {ps[0]} P={ps[1]} | {pm[0]} P={pm[1]} | {a['N']:,} / {m['N']:,} | "
                     f"{a['param_mb']:.2f} / {m['param_mb']:.2f} | {cells} | "
                     f"{dmem_ps:+.2f} : {dmem_pm:+.2f} MB ({_ratio(dmem_pm, dmem_ps)}) | "
                     f"{dlat_ps:+.2f} : {dlat_pm:+.2f} ms ({_ratio(dlat_pm, dlat_ps)}) |")
    return lines


def _ratio(pm: float, ps: float) -> str:
    if ps <= 0:
        return "PS adds none"
    return f"PM/PS = {pm / ps:.1f}x"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["train", "decode", "memory"], choices=["train", "decode", "memory"])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZE_ORDER))
    p.add_argument("--P", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch", type=int, default=32, help="train-step batch (sequences)")
    p.add_argument("--seq", type=int, default=128, help="train-step sequence length")
    p.add_argument("--tokens", type=int, default=256, help="new tokens decoded")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--pairs", nargs="*", default=None, help="SIZE:P=SIZE:P (ParScale = parameter-scaled)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    a = p.parse_args(argv)
    if 1 not in a.P:
        raise SystemExit("--P must include 1 (the baseline of every ratio)")
    lines = [f"ParScale benchmark, {jax.devices()[0].platform}, jax {jax.__version__}. Command: "
             f"`python experiments/bench/parscale.py {' '.join(sys.argv[1:] if argv is None else argv)}`. "
             f"Load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", ""]

    def emit(new):
        lines.extend(new)
        print("\n".join(new), flush=True)

    if "train" in a.parts:
        emit([f"## Train step (Adam, batch {a.batch} x {a.seq} bytes; minimum of {a.repeats})", "",
              "| size | P | ms / step | time ratio vs P=1 (goal <= P) | XLA FLOPs ratio | temp MB |",
              "|---|---:|---:|---:|---:|---:|"])
        for s in a.sizes:
            for r in bench_train(s, a.P, a.batch, a.seq, a.repeats):
                emit([f"| {s} | {r['P']} | {r['ms']:.1f} | {r['time_ratio']:.2f} | {r['flops_ratio']:.2f} | "
                      f"{r['temp_mb']:.1f} |"])
        emit([""])
    if "decode" in a.parts:
        emit([f"## Decoding {a.tokens} tokens: KV cache vs recomputing the window (per token, one compiled loop each)", "",
              "| size | P | batch | cached tokens/s | recompute tokens/s | speed-up (goal >= 5x) | KV cache MB "
              "(of which prefixes) |", "|---|---:|---:|---:|---:|---:|---:|"])
        for s in a.sizes:
            for r in bench_decode(s, a.P, a.tokens, a.decode_batches):
                emit([f"| {s} | {r['P']} | {r['batch']} | {r['cached_tok_s']:.0f} | {r['recompute_tok_s']:.0f} | "
                      f"{r['speedup']:.1f}x | {r['kv_mb']:.2f} ({r['prefix_mb']:.2f}) |"])
        emit([""])
    if "memory" in a.parts:
        pairs = [parse_pair(x) for x in a.pairs] if a.pairs else default_pairs(a.sizes)
        if pairs:
            emit([f"## ParScale (PS) vs parameter scaling (PM): memory and decode latency, {a.tokens} tokens", "",
                  "Increase = over the smaller model at P = 1; memory = parameters + KV cache at batch "
                  f"{a.decode_batches[0]}. Which pair has equal loss comes from the fit of experiments/parscale.py.",
                  ""] + bench_memory(pairs, a.tokens, a.decode_batches) + [""])
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(a.out + ".tmp", a.out)
        print("wrote", a.out)


if __name__ == "__main__":
    main()
