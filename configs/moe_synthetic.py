"""MMoE-paper synthetic data (two regression tasks, relatedness p): shared-bottom vs
one-gate MoE vs MMoE vs CGC vs PLE vs HoME (experiments/moe.py sweeps p and seeds).

    mtl train --config configs/moe_synthetic.py:mmoe --workdir runs/syn_mmoe --config.data.kwargs.correlation=0.5

Data as in Ma et al. 2018: dim 100, c = 1, m = 10 sinusoids; 8,000 training examples
(10% held out for validation). The sine parameters are fixed across seeds (``sine_seed=0``,
see ``mtl.data.synthetic.mmoe_synthetic``).

Sizes follow the paper's synthetic setup: 8 experts with 16 hidden units, task towers
with 8 hidden units, and a one-hidden-layer shared bottom whose width (145) gives it the
same parameter count as our MMoE (~17.0k; the paper's 113 matched its own MMoE).
CGC uses the same 8 experts (4 shared + 2 per task); PLE (2 layers) and HoME have more
parameters (experiments/moe.py prints the counts). AdamW, lr 1e-3 for every model, cosine
decay over 10,000 steps of batch 128 (~178 epochs of the 7,200 training examples): the
1,000-step runs used before stopped while validation loss was still falling, and lr 3e-3
made the shared bottom unstable (seed 0, p=0.5, 6k steps: test MSE 0.25 vs 0.14 at 1e-3).
"""
from mtl.config import base_config

STEPS = 10000
SHARED_HIDDEN = 145   # 100*145 + 145 + 2*(145*8 + 8 + 9) = 16,999 params; MMoE: 16,994

ARCH_KWARGS = {
    "one_gate_moe": dict(num_experts=8, expert_dim=16, expert_hidden=16, tower_hidden=(8,)),
    "mmoe": dict(num_experts=8, expert_dim=16, expert_hidden=16, tower_hidden=(8,)),
    "cgc": dict(num_shared=4, experts_per_task=2, expert_dim=16, expert_hidden=16, tower_hidden=(8,)),
    "ple": dict(num_layers=2, num_shared=4, experts_per_task=2, expert_dim=16, expert_hidden=16,
                tower_hidden=(8,)),
    "home": dict(task_groups=[["task1"], ["task2"]], num_shared=4, experts_per_group=0, experts_per_task=2,
                 expert_dim=16, meta_layer=False, feature_gate_rank=4, tower_hidden=(8,)),
}


def get_config(arg=None):
    arch = arg or "mmoe"
    c = base_config()
    c.name = f"moe_synthetic_{arch}"
    c.data.name = "mmoe_synthetic"
    c.data.kwargs = dict(n_train=8000, n_test=2000, dim=100, correlation=0.9, seed=0, sine_seed=0)
    if arch == "shared":
        c.model.arch = "shared"
        c.model.encoder = "mlp"
        c.model.encoder_kwargs = dict(hidden=(SHARED_HIDDEN,))
        c.model.head_hidden = (8,)
    elif arch in ARCH_KWARGS:
        c.model.arch = arch
        c.model.encoder = "none"
        c.model.arch_kwargs = dict(ARCH_KWARGS[arch])
    else:
        raise ValueError(f"configs/moe_synthetic.py: unknown arch {arch!r}; use shared or one of {sorted(ARCH_KWARGS)}")
    c.train.steps = STEPS
    c.train.batch_size = 128
    c.train.log_every = 500
    c.train.eval_every = 250
    c.train.checkpoint_every = STEPS
    c.optimizer.lr = 1e-3
    return c
