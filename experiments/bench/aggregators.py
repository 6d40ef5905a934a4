"""Step time of every aggregator relative to EW, for T tasks on a shared encoder.

    python experiments/bench/aggregators.py [--tasks 2 10 40] [--steps 10] [--quick]
                                            [--out experiments/results/mtl_optim_bench.md]

For each T (40 ≈ the CelebA attribute head set; ``--encoder cnn`` for a shared CNN, the
default MLP 784-256-256 compiles much faster on this shared CPU) and each method, the
jitted, whole train step (forward, per-task gradients, weights, optimizer) is timed
(minimum over ``--steps`` steps after compilation: the machine is shared), with per-task gradients on all
shared parameters (``grad_on=params``) and on the shared representation
(``grad_on=representation``). Printed beside the measured ratio to EW is the
theoretical ratio of a Jacobian method, (1 forward + T backward)/(1 forward + 1 backward),
with a backward pass costing 2 forwards: (1 + 2T)/3. "within" = measured/theory for the
Gramian methods; the target is ≤ 1.25 (params), and representation variants far below 1.
Loss-only methods (RLW, UW, DWA, FAMO) need no Jacobian: their ratio should be ≈ 1
(FAMO re-evaluates the batch after the step: one more forward pass).

``--part stream`` (or ``all``, the default) also times one Gramian method with J kept vs
streamed (``optim.jacobian``) on a parameter-heavy MLP (8 × 1024 units, batch 32), with
XLA's temporary-memory size of each compiled step:

    python experiments/bench/aggregators.py --part methods --out experiments/results/mtl_optim_bench.md
    python experiments/bench/aggregators.py --part stream --out experiments/results/mtl_optim_stream.md

Issue 15: the methods table has a column per route, ``jacobian=keep`` (J by T backward
passes; also the J-combining methods GradDrop, Trimmed mean, MoCo, DB-MTL, ExcessMTL),
``jacobian=gram`` (the batch Gramian, methods that need only G) and the representation;
``--encoder vit`` runs it on a tiny ViT; ``--part memory`` prints XLA's temporary memory of
the compiled step for each route (EW, keep, stream, gram, representation):

    python experiments/bench/aggregators.py --encoder mlp --out experiments/results/mtl_optim_bench.md
    python experiments/bench/aggregators.py --encoder vit --part methods --out experiments/results/mtl_optim_bench_vit.md
    python experiments/bench/aggregators.py --encoder vit --part memory --out experiments/results/mtl_optim_memory_vit.md
    python experiments/bench/aggregators.py --quick     # T = 2 and 10, 4 methods: a couple of minutes
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import ml_collections
import numpy as np

from mtl import sharding as shd
from mtl.nn import heads
from mtl.nn.build import model_factory
from mtl.optim import AGGREGATORS, JAC_AGGREGATORS, get_aggregator, too_few_tasks
from mtl.tasks import Task
from mtl.train.optimizer import make_optimizer
from mtl.train.step import Steps

# name -> (input shape, batch, encoder kwargs). The CNN (the CelebA-like setting) compiles
# slowly on a shared 2-core CPU; the MLP is the default here, --encoder cnn for the CNN.
# "wide" (parameters, hence J, dominate memory; small batch) is where optim.jacobian=stream
# pays: the keep-vs-stream table always uses it.
ENCODERS = {
    "mlp": ((28, 28, 1), 256, dict(hidden=(256, 256))),
    "cnn": ((16, 16, 3), 32, dict(widths=(8, 16, 32), groups=4)),
    "wide": ((256,), 32, dict(hidden=(1024,) * 8)),
    # a tiny ViT (patch 4 on 16x16: 17 tokens, 2 blocks of width 32): attention/MLP projections
    # are dense layers on tokens, which the batch-Gramian route (optim.jacobian="gram") taps
    "vit": ((16, 16, 3), 32, dict(patch=4, dim=32, depth=2, num_heads=2)),
}
ENCODER_TYPE = {"wide": "mlp"}


def time_steps(st, state, batch, n, budget_s=1.5):
    state, m = st.step(state, batch)  # compile
    jax.block_until_ready(m)
    times, t_start = [], time.perf_counter()
    while len(times) < 3 or (len(times) < n and time.perf_counter() - t_start < budget_s):
        t0 = time.perf_counter()
        state, m = st.step(state, batch)
        jax.block_until_ready((state.params, m))
        times.append(time.perf_counter() - t0)
    return min(times)  # the machine is shared: the minimum is the least disturbed step


def make_steps(enc: str, t: int, method: str, grad_on: str, jacobian: str = "keep"):
    shape, _, kwargs = ENCODERS[enc]
    tasks = [Task(f"a{i}", heads.Classification(2)) for i in range(t)]
    mcfg = ml_collections.ConfigDict({"arch": "shared", "encoder": ENCODER_TYPE.get(enc, enc),
                                      "encoder_kwargs": kwargs})
    factory = model_factory(mcfg, tasks, shape)
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    return Steps(factory, tasks, make_optimizer("adamw", 1e-3, 1000), mesh,
                 optim=dict(aggregator=method, grad_on=grad_on, jacobian=jacobian))


def bench(enc: str, t: int, method: str, grad_on: str, n: int, batch_np, jacobian: str = "keep") -> float:
    st = make_steps(enc, t, method, grad_on, jacobian)
    state = st.init()
    return time_steps(st, state, st.put_batch(batch_np), n)


def step_memory(enc: str, t: int, method: str, jacobian: str, batch_np, grad_on: str = "params") -> int:
    """XLA's temporary-buffer size (bytes) of the compiled train step: what J costs."""
    st = make_steps(enc, t, method, grad_on, jacobian)
    state = st.init()
    with st.activate():
        compiled = jax.jit(st._train_step).lower(state, st.put_batch(batch_np)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def make_batch(enc, t, rng):
    shape, batch, _ = ENCODERS[enc]
    return {"inputs": rng.normal(size=(batch,) + shape).astype(np.float32),
            "labels": {f"a{i}": rng.integers(0, 2, batch).astype(np.int32) for i in range(t)}}


def refuses(m, t):
    """Why method ``m`` cannot run with ``t`` tasks (e.g. Krum and trimmed mean at T = 2), or ''."""
    return too_few_tasks(get_aggregator(m), t)


def methods_table(enc, t, methods, steps, rng):
    """Time every method against EW: per-task gradients on the parameters with J kept
    (``jacobian=keep``) and by the batch Gramian (``jacobian=gram``, methods that need only
    G), and on the representation; print, return rows."""
    lines = []
    batch = make_batch(enc, t, rng)
    ew = bench(enc, t, "ew", "params", steps, batch)
    theory = (1 + 2 * t) / 3
    times = {}
    for m in methods:
        if refuses(m, t):
            print(f"  T={t} {m}: n/a ({refuses(m, t)})", flush=True)
            lines.append(f"| {t} | {m} | n/a: needs more tasks | | | | | | | |")
            continue
        needs = get_aggregator(m).needs
        gram, jac = "gram" in needs, "jac" in needs
        tp = bench(enc, t, m, "params", steps, batch)
        tg = bench(enc, t, m, "params", steps, batch, jacobian="gram") if gram and not jac else float("nan")
        # loss-only methods take the same path whatever grad_on says: time them once; of the
        # J-combining methods only graddrop runs on the representation
        rep_ok = gram and (not jac or m == "graddrop")
        tr = bench(enc, t, m, "representation", steps, batch) if rep_ok else (tp if not (gram or jac) else float("nan"))
        times[m] = (gram or jac, tp, tg, tr)
        print(f"  measured T={t} {m}", flush=True)
    ew = min(ew, bench(enc, t, "ew", "params", steps, batch))  # EW before and after, the faster
    print(f"\nT={t}: EW step {ew * 1e3:.2f} ms; theory for a Jacobian method (1+2T)/3 = {theory:.2f}x",
          flush=True)
    print(f"  {'method':<12} {'G?':<3} {'keep':>8} {'gram':>8} {'repr':>8} {'theory':>7} {'keep/th':>8} "
          f"{'gram/th':>8} {'repr/th':>8}")
    f = lambda v: "—" if v != v else f"{v:.2f}"  # noqa: E731  (nan: route not applicable)
    for m, (g, tp, tg, tr) in times.items():
        rp, rg, rr = tp / ew, tg / ew, tr / ew
        th = theory if g else 1.0
        print(f"  {m:<12} {'y' if g else 'n':<3} {f(rp):>8} {f(rg):>8} {f(rr):>8} {th:>7.2f} {f(rp / th):>8} "
              f"{f(rg / th):>8} {f(rr / th):>8}", flush=True)
        lines.append(f"| {t} | {m} | {'yes' if g else 'no'} | {f(rp)} | {f(rg)} | {f(rr)} | {th:.2f} | "
                     f"{f(rp / th)} | {f(rg / th)} | {f(rr / th)} |")
    return lines


ROUTES = (("EW (one backward)", "ew", "keep", "params"), ("keep", None, "keep", "params"),
          ("stream", None, "stream", "params"), ("gram", None, "gram", "params"),
          ("representation", None, "keep", "representation"))


def memory_row(enc, t, method, rng):
    """XLA temporary memory (MB) of the compiled step for every route, ``method`` for all but EW."""
    batch = make_batch(enc, t, rng)
    mb = [step_memory(enc, t, m or method, j, batch, g) / 1e6 for _, m, j, g in ROUTES]
    print(f"T={t}, {enc}, {method}: step temp memory (MB) " +
          ", ".join(f"{n} {v:.1f}" for (n, *_), v in zip(ROUTES, mb)), flush=True)
    return f"| {t} | " + " | ".join(f"{v:.1f}" for v in mb) + " |"


def stream_row(t, sm, steps, rng):
    """J kept vs streamed for method ``sm`` on the "wide" MLP (parameters dominate memory)."""
    wb = make_batch("wide", t, rng)
    tew = bench("wide", t, "ew", "params", steps, wb)
    tk, ts = (bench("wide", t, sm, "params", steps, wb, jacobian=j) for j in ("keep", "stream"))
    tew = min(tew, bench("wide", t, "ew", "params", steps, wb))
    mem = {j: step_memory("wide", t, sm, j, wb) / 1e6 for j in ("keep", "stream")}
    st_theory = (3 + 2 * t) / 3
    print(f"T={t}, wide MLP, {sm}: EW step {tew * 1e3:.2f} ms; keep {tk / tew:.2f}x, stream {ts / tew:.2f}x "
          f"(stream theory {st_theory:.2f}x); step temp memory keep {mem['keep']:.1f} MB, stream "
          f"{mem['stream']:.1f} MB", flush=True)
    return (f"| {t} | {tk / tew:.2f} | {ts / tew:.2f} | {st_theory:.2f} | {ts / tew / st_theory:.2f} | "
            f"{mem['keep']:.1f} | {mem['stream']:.1f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    ap.add_argument("--steps", type=int, default=15, help="at most this many timed steps (1.5 s budget)")
    ap.add_argument("--methods", nargs="+", default=sorted(AGGREGATORS) + sorted(JAC_AGGREGATORS))
    ap.add_argument("--quick", action="store_true", help="T=2 and 10, 4 methods (ew famo mgda graddrop), 3 steps")
    ap.add_argument("--out", default="")
    ap.add_argument("--encoder", default="mlp", choices=sorted(ENCODERS))
    ap.add_argument("--part", default="all", choices=("all", "methods", "stream", "memory"),
                    help="the per-method table, the J kept-vs-streamed table, the per-route memory table "
                         "(on --encoder), or all three")
    ap.add_argument("--stream-method", default="mgda",
                    help="Gramian method timed with optim.jacobian=stream vs keep (time and memory)")
    a = ap.parse_args(argv)
    enc = a.encoder
    INPUT, BATCH, ENCODER = ENCODERS[enc]
    if a.quick:
        a.tasks, a.steps, a.methods = [2, 10], 3, ["ew", "famo", "mgda", "graddrop"]
    methods = [m for m in a.methods if m != "ew"]
    rng = np.random.default_rng(0)
    shown = "wide" if a.part == "stream" else enc
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); {shown} {ENCODERS[shown][2]} on "
          f"{ENCODERS[shown][0]}, batch {ENCODERS[shown][1]}, AdamW; min of {a.steps} steps", flush=True)
    lines = ["| T | method | needs G or J | keep: ratio | gram: ratio | repr: ratio | theory | keep/theory | "
             "gram/theory | repr/theory |", "|---|---|---|---|---|---|---|---|---|---|"]
    mem_lines = ["| T | " + " | ".join(n for n, *_ in ROUTES) + " |", "|---|" + "---|" * len(ROUTES)]
    stream_lines = ["| T | keep: ratio | stream: ratio | stream theory (1+2(T+1))/3 | stream/theory | "
                    "keep: step temp MB | stream: step temp MB |", "|---|---|---|---|---|---|---|"]
    for t in a.tasks:
        if a.part in ("all", "methods"):
            lines += methods_table(enc, t, methods, a.steps, rng)
        if a.part in ("all", "stream"):
            stream_lines.append(stream_row(t, a.stream_method, a.steps, rng))
        if a.part in ("all", "memory"):
            mem_lines.append(memory_row(enc, t, a.stream_method, rng))
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        parts = []
        if a.part in ("all", "methods"):
            parts.append("# Aggregator step time relative to EW (this machine, one run)\n\n"
                         f"{enc} {ENCODER} on {INPUT}, batch {BATCH}, AdamW, backend "
                         f"{jax.default_backend()}. theory = (1 forward + T backward)/(1 forward + 1 backward) "
                         "with backward = 2 forwards, for methods that need G (1 otherwise).\n\n" + "\n".join(lines))
        if a.part in ("all", "stream"):
            parts.append(f"# {a.stream_method}: J kept vs streamed (optim.jacobian)\n\nMLP {ENCODERS['wide'][2]} on "
                         f"{ENCODERS['wide'][0]}, batch {ENCODERS['wide'][1]} (parameters dominate memory), backend "
                         f"{jax.default_backend()}; step time relative to EW on the same model (min of {a.steps} "
                         "steps), and XLA's temporary memory of the compiled step.\n\n" + "\n".join(stream_lines))
        if a.part in ("all", "memory"):
            parts.append(f"# XLA temporary memory of the compiled step per route (MB)\n\n{enc} {ENCODER} on {INPUT}, "
                         f"batch {BATCH}; {a.stream_method} for every route but EW.\n\n" + "\n".join(mem_lines))
        with open(a.out, "w") as f:
            f.write("\n\n".join(parts) + "\n")
        print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
