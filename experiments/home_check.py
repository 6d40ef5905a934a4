"""Issue 12 item 3: why HoME trails shared-bottom on the MMoE synthetic data.

p = 0.5, the configs/moe_synthetic.py settings (10,000 steps); HoME as in the results table,
then with one part changed at a time, over ``--seeds`` (a seed sets the task directions, the
samples, the noise, the initialisation and the batch order, as in experiments/moe.py).
Prints the test MSE (mean of the two tasks; mean ± std over seeds) and parameter counts, and
writes them to ``--out`` (JSON). Runs are reused from ``--workdir`` when present (each run is
1-4 min on 2 CPU cores; seed 0's runs keep their old directory names).

    PYTHONPATH=$PWD python experiments/home_check.py --workdir runs/home_check
    PYTHONPATH=$PWD python experiments/home_check.py --seeds 0 1 2 --variants shared home home_mlp_experts
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import moe  # noqa: E402  (experiments/moe.py: load_cfg, train, count_params)

VARIANTS = {
    "shared": ("shared", {}),
    "home": ("home", {}),
    "home_no_feature_gate": ("home", dict(feature_gate_rank=0)),
    "home_mlp_experts": ("home", dict(expert_kind="mlp", expert_hidden=16)),
    "home_mlp_swish_experts": ("home", dict(expert_kind="mlp", expert_hidden=16,
                                            expert_kwargs={"activation": "swish", "out_activation": "swish"})),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=os.path.join(moe.ROOT, "runs", "home_check"))
    ap.add_argument("--correlation", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=os.path.join(moe.ROOT, "experiments", "results", "home_check.json"))
    args = ap.parse_args()
    rows = {}
    for name in args.variants:
        arch, kw = VARIANTS[name]
        for seed in args.seeds:
            cfg = moe.load_cfg("moe_synthetic.py", arch)
            cfg.data.kwargs.correlation = args.correlation
            cfg.data.kwargs.seed = cfg.seed = cfg.data.seed = seed
            for k, v in kw.items():
                cfg.model.arch_kwargs[k] = v
            res = moe.train(cfg, os.path.join(args.workdir, name if seed == 0 else f"{name}_s{seed}"))
            mse = [res["test"][t]["mse"] for t in ("task1", "task2")]
            rows.setdefault(name, {"params": moe.count_params(cfg), "seeds": {}})["seeds"][seed] = mse
    print(f"p = {args.correlation}, seeds {args.seeds}: test MSE (mean ± std over seeds)\n"
          "| variant | params | task1 | task2 | mean test MSE |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        m = np.array(list(r["seeds"].values()))   # [seeds, 2 tasks]
        cells = [f"{m[:, i].mean():.4f} ± {m[:, i].std():.4f}" for i in range(2)] + [
            f"{m.mean(1).mean():.4f} ± {m.mean(1).std():.4f}"]
        print(f"| {name} | {r['params']:,} | " + " | ".join(cells) + " |")
    out = {"correlation": args.correlation, "seeds": args.seeds,
           "variants": {n: {"params": r["params"], "test_mse": {str(s): v for s, v in r["seeds"].items()}}
                        for n, r in rows.items()}}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
