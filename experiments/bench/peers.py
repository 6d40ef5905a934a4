"""Our train step side by side with LibMTL 1.1.5 and TorchJD (autojac and autogram), one run.

    pip install ".[peers]"                      # torch, torchjd[cagrad] (cvxpy, clarabel), scipy
    pip install --no-deps LibMTL==1.1.5         # LibMTL's own pins are ancient: installed by hand
    python experiments/bench/peers.py [--tasks 10 40] [--rounds 5] [--quick]
                                      [--out experiments/results/peers_bench.md]

Never in CI. The model is the same in every library: MLP encoder 784-512-512 (ReLU), T linear
heads 512→10, softmax cross-entropy, batch 256, Adam (lr 1e-3). The torch models start from
OUR initial weights (copied from the JAX model), and the first-step losses of every
runner are checked equal to ours before anything is timed (the run stops if they are
not). For MGDA, PCGrad, CAGrad (c = 0.5 everywhere) and UPGrad at each T:

* ours, ``optim.jacobian="keep"`` (J by T backward passes) and ``"gram"`` (the batch
  Gramian, :mod:`mtl.train.routes.batch_gram`), one jitted step each;
* LibMTL: ``HPS`` + the weighting class, ``model.backward(losses)`` (T backward passes);
  LibMTL 1.1.5 has no UPGrad;
* TorchJD autojac: ``mtl_backward(losses, features)`` then ``jac_to_grad(encoder, A())``;
* TorchJD autogram: ``Engine(encoder, batch_dim=None).compute_gramian(losses)``, the
  aggregator's ``Weighting`` on it, then ``losses.backward(weights)``.

Timing: every runner is warmed up (2 steps), then ``--rounds`` rounds each run one step of
every runner in turn (interleaved, so a load spike hits all of them alike); the figure is
the minimum over rounds (ms/step). Ratios are peer/ours (> 1: ours is faster) against the
faster of our two routes. Also printed: XLA's temporary memory of our compiled step for
EW, keep and gram (the goal: gram ≤ EW + O(T·B·width)).

LibMTL 1.1.5 imports ``torchvision.models.utils`` (gone from torchvision); this script
installs the documented shim ``sys.modules["torchvision.models.utils"] = torch.hub``
before importing it, so torchvision itself is not needed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

METHODS = ("mgda", "pcgrad", "cagrad", "upgrad")
CAGRAD_C = 0.5
INSTALL = ('pip install ".[peers]"  (torch, torchjd[cagrad], scipy) and, by hand, '
           "pip install --no-deps LibMTL==1.1.5")


def import_peers():
    """torch, torchjd, LibMTL, or a SystemExit naming what is missing and how to install it."""
    missing, mods = [], {}
    try:
        import torch
        mods["torch"] = torch
    except ImportError:
        missing.append("torch")
    try:
        import torchjd  # noqa: F401  (presence check)
        from torchjd import aggregation, autogram, autojac
        mods.update(aggregation=aggregation, autogram=autogram, autojac=autojac)
    except ImportError:
        missing.append("torchjd")
    if "torch" in mods:
        sys.modules.setdefault("torchvision.models.utils", mods["torch"].hub)  # LibMTL 1.1.5's old import
        try:
            import LibMTL.architecture
            import LibMTL.weighting
            mods["libmtl"] = LibMTL
        except ImportError as e:
            missing.append(f"LibMTL ({e})")
    try:
        import cvxpy  # noqa: F401  (TorchJD's CAGrad)
        import clarabel  # noqa: F401
    except ImportError:
        missing.append("cvxpy + clarabel (TorchJD's CAGrad: torchjd[cagrad])")
    if missing:
        raise SystemExit(f"experiments/bench/peers.py: missing peer package(s): {', '.join(missing)}.\n"
                         f"Install them with: {INSTALL}")
    return mods


# ----------------------------------------------------------------------------- ours
def our_steps(t, method, jacobian, hidden, classes):
    import jax
    import ml_collections

    from mtl import sharding as shd
    from mtl.nn import heads
    from mtl.nn.build import model_factory
    from mtl.tasks import Task
    from mtl.train.optimizer import make_optimizer
    from mtl.train.step import Steps

    tasks = [Task(f"a{i}", heads.Classification(classes)) for i in range(t)]
    mcfg = ml_collections.ConfigDict({"arch": "shared", "encoder": "mlp", "encoder_kwargs": dict(hidden=hidden)})
    factory = model_factory(mcfg, tasks, (28, 28, 1))
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    hp = dict(c=CAGRAD_C) if method == "cagrad" else {}
    return Steps(factory, tasks, make_optimizer("adam", 1e-3, 1000, schedule="constant"), mesh,
                 optim=dict(aggregator=method, hparams=hp, jacobian=jacobian))


class Ours:
    def __init__(self, t, method, jacobian, batch_np, hidden, classes):
        import jax
        self.st = our_steps(t, method, jacobian, hidden, classes)
        self.state = self.st.init()
        self.batch = self.st.put_batch(batch_np)
        self.params0 = jax.device_get(self.state.params)
        self.first_losses = None
        self._jax = jax

    def step(self):
        self.state, m = self.st.step(self.state, self.batch)
        self._jax.block_until_ready((self.state.params, m))
        if self.first_losses is None:
            self.first_losses = np.asarray(m["losses"], np.float64)


def step_temp_mb(t, method, jacobian, batch_np, hidden, classes):
    """XLA's temporary-buffer size of our compiled step (MB)."""
    import jax
    st = our_steps(t, method, jacobian, hidden, classes)
    state = st.init()
    with st.activate():
        c = jax.jit(st._train_step).lower(state, st.put_batch(batch_np)).compile()
    return c.memory_analysis().temp_size_in_bytes / 1e6


# ----------------------------------------------------------------------------- torch models
def torch_model(torch, params0, t, hidden):
    """Encoder and heads in torch with OUR initial weights (kernel [in, out] -> weight [out, in])."""
    nn = torch.nn
    enc = params0["encoder"]["layers"]
    layers, d = [nn.Flatten()], 28 * 28
    for i, h in enumerate(hidden):
        lin = nn.Linear(d, h)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.asarray(enc[i]["kernel"]).T.copy()))
            lin.bias.copy_(torch.from_numpy(np.array(enc[i]["bias"])))
        layers += [lin, nn.ReLU()]
        d = h
    heads = nn.ModuleList()
    for i in range(t):
        p = params0["heads"][f"a{i}"]["out"]
        lin = nn.Linear(d, p["kernel"].shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).T.copy()))
            lin.bias.copy_(torch.from_numpy(np.array(p["bias"])))
        heads.append(lin)
    return nn.Sequential(*layers), heads


class TorchRunner:
    def __init__(self, torch, batch_np, t):
        self.torch = torch
        self.x = torch.from_numpy(batch_np["inputs"])
        self.y = [torch.from_numpy(batch_np["labels"][f"a{i}"].astype(np.int64)) for i in range(t)]
        self.first_losses = None

    def losses_of(self, feats, heads):
        f = self.torch.nn.functional
        return [f.cross_entropy(h(feats), y) for h, y in zip(heads, self.y)]

    def record(self, losses):
        if self.first_losses is None:
            self.first_losses = np.array([float(v) for v in losses], np.float64)


class TorchJDAutojac(TorchRunner):
    def __init__(self, mods, method, params0, batch_np, t, hidden):
        super().__init__(mods["torch"], batch_np, t)
        self.enc, self.heads = torch_model(self.torch, params0, t, hidden)
        self.opt = self.torch.optim.Adam([*self.enc.parameters(), *self.heads.parameters()], lr=1e-3)
        ag = mods["aggregation"]
        self.agg = {"mgda": ag.MGDA, "pcgrad": ag.PCGrad, "upgrad": ag.UPGrad,
                    "cagrad": lambda: ag.CAGrad(c=CAGRAD_C)}[method]()
        self.autojac = mods["autojac"]

    def step(self):
        self.opt.zero_grad()
        feats = self.enc(self.x)
        losses = self.losses_of(feats, self.heads)
        self.record(losses)
        self.autojac.mtl_backward(losses, features=feats)
        self.autojac.jac_to_grad(self.enc.parameters(), self.agg)
        self.opt.step()


class TorchJDAutogram(TorchRunner):
    def __init__(self, mods, method, params0, batch_np, t, hidden):
        super().__init__(mods["torch"], batch_np, t)
        self.enc, self.heads = torch_model(self.torch, params0, t, hidden)
        self.opt = self.torch.optim.Adam([*self.enc.parameters(), *self.heads.parameters()], lr=1e-3)
        ag = mods["aggregation"]
        self.weighting = {"mgda": ag.MGDAWeighting, "pcgrad": ag.PCGradWeighting, "upgrad": ag.UPGradWeighting,
                          "cagrad": lambda: ag.CAGradWeighting(c=CAGRAD_C)}[method]()
        self.engine = mods["autogram"].Engine(self.enc, batch_dim=None)

    def step(self):
        self.opt.zero_grad()
        feats = self.enc(self.x)
        losses = self.torch.stack(self.losses_of(feats, self.heads))
        self.record(losses.detach())
        gram = self.engine.compute_gramian(losses)
        losses.backward(self.weighting(gram))
        self.opt.step()


class LibMTLRunner(TorchRunner):
    KWARGS = {"mgda": dict(mgda_gn="none"), "pcgrad": {}, "cagrad": dict(calpha=CAGRAD_C, rescale=1)}

    def __init__(self, mods, method, params0, batch_np, t, hidden):
        super().__init__(mods["torch"], batch_np, t)
        lib, torch = mods["libmtl"], self.torch
        weighting = {"mgda": lib.weighting.MGDA, "pcgrad": lib.weighting.PCGrad,
                     "cagrad": lib.weighting.CAGrad}[method]
        enc, heads = torch_model(torch, params0, t, hidden)
        names = [f"a{i}" for i in range(t)]

        class Model(lib.architecture.HPS, weighting):  # what LibMTL's Trainer builds
            def zero_grad_share_params(self):
                # LibMTL 1.1.5 was written for torch < 2, whose zero_grad kept .grad tensors (zeroed);
                # torch 2 sets them to None and LibMTL's _reset_grad then fails: keep the old behaviour
                self.encoder.zero_grad(set_to_none=False)

        self.model = Model(task_name=names, encoder_class=lambda: enc,
                           decoders=torch.nn.ModuleDict(dict(zip(names, heads))), rep_grad=False,
                           multi_input=False, device=torch.device("cpu"))
        self.model.init_param()
        self.names, self.kw = names, self.KWARGS[method]
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def step(self):
        self.opt.zero_grad(set_to_none=False)  # LibMTL writes into existing .grad tensors
        preds = self.model(self.x)
        f = self.torch.nn.functional
        losses = self.torch.stack([f.cross_entropy(preds[n], y) for n, y in zip(self.names, self.y)])
        self.record(losses.detach())
        self.model.backward(losses, **self.kw)
        self.opt.step()


# ----------------------------------------------------------------------------- the run
def make_batch(t, batch, classes, rng):
    return {"inputs": rng.normal(size=(batch, 28, 28, 1)).astype(np.float32),
            "labels": {f"a{i}": rng.integers(0, classes, batch).astype(np.int32) for i in range(t)}}


def build_runners(mods, t, methods, batch_np, hidden, classes):
    runners = {}
    for m in methods:
        for jac in ("keep", "gram"):
            runners[(m, f"ours ({jac})")] = Ours(t, m, jac, batch_np, hidden, classes)
    params0 = next(iter(runners.values())).params0
    for m in methods:
        # LibMTL 1.1.5's CAGrad hard-codes three tasks (x.reshape(1, 3) in its objective)
        if m in LibMTLRunner.KWARGS and not (m == "cagrad" and t != 3):
            runners[(m, "LibMTL")] = LibMTLRunner(mods, m, params0, batch_np, t, hidden)
        runners[(m, "TorchJD autojac")] = TorchJDAutojac(mods, m, params0, batch_np, t, hidden)
        runners[(m, "TorchJD autogram")] = TorchJDAutogram(mods, m, params0, batch_np, t, hidden)
    return runners


def check_first_losses(runners, tol):
    """Every runner starts from the same weights: its first-step losses equal ours."""
    ref = next(iter(runners.values())).first_losses
    worst = max(float(np.max(np.abs(r.first_losses - ref))) for r in runners.values())
    if worst > tol:
        bad = {k: float(np.max(np.abs(r.first_losses - ref))) for k, r in runners.items()}
        raise SystemExit(f"first-step losses differ between runners (max |Δ| {worst:.2e} > {tol}): {bad}")
    return ref, worst


def time_all(runners, rounds, warmup=2):
    for r in runners.values():
        for _ in range(warmup):
            r.step()
    times = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():  # interleaved: a load spike hits every runner alike
            t0 = time.perf_counter()
            r.step()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) * 1e3 for k, v in times.items()}


def table(t, methods, ms):
    peers = ("LibMTL", "TorchJD autojac", "TorchJD autogram")
    head = ("| T | method | ours keep ms | ours gram ms | LibMTL ms | TorchJD autojac ms | TorchJD autogram ms | "
            "LibMTL/ours | faster TorchJD/ours |")
    lines = []
    for m in methods:
        ours = min(ms[(m, "ours (keep)")], ms[(m, "ours (gram)")])
        cells = [f"{ms[(m, 'ours (keep)')]:.1f}", f"{ms[(m, 'ours (gram)')]:.1f}"]
        for p in peers:
            why = "no UPGrad in LibMTL 1.1.5" if m == "upgrad" else "LibMTL 1.1.5's CAGrad supports only T = 3"
            cells.append(f"{ms[(m, p)]:.1f}" if (m, p) in ms else f"n/a ({why})")
        lib = f"{ms[(m, 'LibMTL')] / ours:.2f}×" if (m, "LibMTL") in ms else "—"
        tjd = min(ms[(m, "TorchJD autojac")], ms[(m, "TorchJD autogram")]) / ours
        lines.append(f"| {t} | {m} | " + " | ".join(cells) + f" | {lib} | {tjd:.2f}× |")
    return head, lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs="+", default=[10, 40])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (one step of every runner each)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    ap.add_argument("--quick", action="store_true", help="T = 10 only, 3 rounds")
    ap.add_argument("--no-memory", action="store_true", help="skip the compiled-step memory table")
    ap.add_argument("--loaded", action="store_true", help="mark the figures as taken on a loaded machine")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads (0: torch's default); on a loaded machine 1 can be faster")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if a.quick:
        a.tasks, a.rounds = [10], 3
    mods = import_peers()
    import jax
    import torch
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    from importlib.metadata import version
    classes, hidden = 10, tuple(a.hidden)
    rng = np.random.default_rng(0)
    setting = (f"MLP encoder 784-{'-'.join(map(str, hidden))} (ReLU), T linear heads {hidden[-1]}→{classes}, "
               f"batch {a.batch}, Adam lr 1e-3, CAGrad c = {CAGRAD_C}; jax {jax.__version__} "
               f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
               f"torchjd {version('torchjd')}, LibMTL 1.1.5; "
               f"{os.cpu_count()} CPU cores; min over {a.rounds} interleaved rounds after 2 warm-up steps")
    print(setting, flush=True)
    out_lines, mem_lines = [], []
    head = None
    for t in a.tasks:
        batch_np = make_batch(t, a.batch, classes, rng)
        runners = build_runners(mods, t, a.methods, batch_np, hidden, classes)
        for r in runners.values():  # the first step: losses at the shared initial weights
            r.step()
        ref, worst = check_first_losses(runners, tol=1e-4)
        print(f"T={t}: first-step losses equal across {len(runners)} runners (max |Δ| {worst:.1e}; "
              f"mean loss {ref.mean():.4f})", flush=True)
        ms = time_all(runners, a.rounds)
        head, lines = table(t, a.methods, ms)
        out_lines += lines
        print(head)
        print("\n".join(lines), flush=True)
        if not a.no_memory:
            mem = {j: step_temp_mb(t, "ew" if j == "ew" else "mgda", "keep" if j == "ew" else j, batch_np, hidden,
                                   classes) for j in ("ew", "keep", "gram")}
            tbw = t * a.batch * hidden[-1] * 4 / 1e6
            mem_lines.append(f"| {t} | {mem['ew']:.1f} | {mem['keep']:.1f} | {mem['gram']:.1f} | "
                             f"{mem['gram'] - mem['ew']:.1f} | {tbw:.1f} |")
            print(f"T={t}: step temp memory (MB) EW {mem['ew']:.1f}, MGDA keep {mem['keep']:.1f}, "
                  f"gram {mem['gram']:.1f}; T·B·width·4 bytes = {tbw:.1f} MB", flush=True)
        del runners
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        note = ("**Taken on a loaded, shared machine: timings are noisy; rerun on a quiet one.**\n\n"
                if a.loaded else "")
        md = ["# Ours vs LibMTL 1.1.5 vs TorchJD (one run)", "", note + setting + ".", "",
              "Ratios: peer ms / ours ms with ours = the faster of keep and gram (> 1: ours faster). "
              "Goals (issue 15): LibMTL/ours ≥ 3, faster TorchJD/ours ≥ 1.5.", "",
              f"Command: `python experiments/bench/peers.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
              "", head, "|---|---|---|---|---|---|---|---|---|", *out_lines]
        if mem_lines:
            md += ["", "XLA temporary memory of our compiled step (MB), MGDA for keep and gram; goal: "
                   "gram ≤ EW + O(T·B·width).", "",
                   "| T | EW | keep | gram | gram − EW | T·B·width·4 B |", "|---|---|---|---|---|---|", *mem_lines]
        with open(a.out, "w") as f:
            f.write("\n".join(md) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
