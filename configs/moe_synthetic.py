"""MMoE-paper synthetic data (two regression tasks, relatedness p): shared-bottom vs
one-gate MoE vs MMoE vs CGC vs PLE vs HoME (experiments/moe.py sweeps p and seeds).

    mtl train --config configs/moe_synthetic.py:mmoe --workdir runs/syn_mmoe --config.data.kwargs.correlation=0.5

Data as in Ma et al. 2018: dim 100, c = 1, m = 10 sinusoids, 8,000 training examples.
Every model has ~the same hidden budget: shared-bottom MLP 100 -> 64 -> 16 with one
16-unit tower per task; the MoE models use 4..8 experts of 16 hidden units each.
"""
from mtl.config import base_config

ARCH_KWARGS = {
    "one_gate_moe": dict(num_experts=8, expert_dim=16, expert_hidden=16, tower_hidden=(16,)),
    "mmoe": dict(num_experts=8, expert_dim=16, expert_hidden=16, tower_hidden=(16,)),
    "cgc": dict(num_shared=4, experts_per_task=2, expert_dim=16, expert_hidden=16, tower_hidden=(16,)),
    "ple": dict(num_layers=2, num_shared=4, experts_per_task=2, expert_dim=16, expert_hidden=16,
                tower_hidden=(16,)),
    "home": dict(task_groups=[["task1"], ["task2"]], num_shared=4, experts_per_group=0, experts_per_task=2,
                 expert_dim=16, meta_layer=False, feature_gate_rank=4, tower_hidden=(16,)),
}


def get_config(arg=None):
    arch = arg or "mmoe"
    c = base_config()
    c.name = f"moe_synthetic_{arch}"
    c.data.name = "mmoe_synthetic"
    c.data.kwargs = dict(n_train=8000, n_test=2000, dim=100, correlation=0.9, seed=0)
    if arch == "shared":
        c.model.arch = "shared"
        c.model.encoder = "mlp"
        c.model.encoder_kwargs = dict(hidden=(64, 16))
        c.model.head_hidden = (16,)
    elif arch in ARCH_KWARGS:
        c.model.arch = arch
        c.model.encoder = "none"
        c.model.arch_kwargs = dict(ARCH_KWARGS[arch])
    else:
        raise ValueError(f"configs/moe_synthetic.py: unknown arch {arch!r}; use shared or one of {sorted(ARCH_KWARGS)}")
    c.train.steps = 1500
    c.train.batch_size = 128
    c.train.log_every = 500
    c.train.eval_every = 250
    c.train.checkpoint_every = 1500
    c.optimizer.lr = 3e-3
    return c
