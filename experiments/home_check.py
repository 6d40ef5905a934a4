"""Issue 12 item 3: why HoME trails shared-bottom on the MMoE synthetic data.

One seed (0), p = 0.5, the configs/moe_synthetic.py settings (10,000 steps); HoME as in the
results table, then with one part changed at a time. Prints the test MSE (mean of the two
tasks) and parameter counts. Runs are reused from ``--workdir`` when present (each run is
1-4 min on 2 CPU cores).

    PYTHONPATH=$PWD python experiments/home_check.py --workdir runs/home_check
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
    args = ap.parse_args()
    rows = []
    for name, (arch, kw) in VARIANTS.items():
        cfg = moe.load_cfg("moe_synthetic.py", arch)
        cfg.data.kwargs.correlation = args.correlation
        for k, v in kw.items():
            cfg.model.arch_kwargs[k] = v
        res = moe.train(cfg, os.path.join(args.workdir, name))
        mse = [res["test"][t]["mse"] for t in ("task1", "task2")]
        rows.append((name, moe.count_params(cfg), mse))
    print("| variant | params | task1 | task2 | mean test MSE |\n|---|---:|---:|---:|---:|")
    for name, n, mse in rows:
        print(f"| {name} | {n:,} | {mse[0]:.4f} | {mse[1]:.4f} | {np.mean(mse):.4f} |")
    print(json.dumps({name: float(np.mean(m)) for name, _, m in rows}))


if __name__ == "__main__":
    main()
