"""MultiFashion with the encoder-focused / soft-sharing architectures: cross-stitch, MTAN,
learning-to-branch (LTB) and DSelect-k (mtl/nn/soft_sharing.py, branching.py, moe/dselect.py).

    mtl train --config configs/soft_sharing.py:cross_stitch --workdir runs/mf_cross_stitch
    mtl train --config configs/soft_sharing.py:mtan --workdir runs/mf_mtan
    mtl train --config configs/soft_sharing.py:ltb --workdir runs/mf_ltb
    mtl train --config configs/soft_sharing.py:dselect_k --workdir runs/mf_dselect_k

Backbones: cross-stitch and MTAN on the small CNN (widths 16-32-64, as configs/multifashion.py:cnn;
cross-stitch builds one CNN column per task), LTB on the MLP (512-256, one column per task;
Gumbel temperature 5 / sqrt(1 + step / 100), 30 warm-up steps), DSelect-k on the
flattened image: 8 MLP experts (hidden 128, output 64), k = 2, gamma 1, no entropy term.
Settings are the MultiFashion ones (batch 128, lr 1e-3); steps follow the backbone.
Not tuned; no results are reported from this config yet.
"""
from mtl.config import base_config

CNN = dict(widths=(16, 32, 64), groups=8)
ARCHS = {
    "cross_stitch": dict(encoder="cnn", encoder_kwargs=CNN, arch_kwargs=dict(alpha_same=0.9), steps=1500),
    "mtan": dict(encoder="cnn", encoder_kwargs=CNN, arch_kwargs={}, steps=1500),
    "ltb": dict(encoder="mlp", encoder_kwargs=dict(hidden=(512, 256)),
                arch_kwargs=dict(tau0=5.0, decay_steps=100.0, warmup_steps=30), steps=3000),
    "dselect_k": dict(encoder="none", encoder_kwargs={},
                      arch_kwargs=dict(num_experts=8, num_nonzeros=2, expert_dim=64, expert_hidden=128, gamma=1.0),
                      steps=3000),
}


def get_config(arg=None):
    arch = arg or "cross_stitch"
    if arch not in ARCHS:
        raise ValueError(f"configs/soft_sharing.py: unknown arch {arch!r}; use one of {sorted(ARCHS)}")
    spec = ARCHS[arch]
    c = base_config()
    c.name = f"soft_sharing_{arch}"
    c.data.name = "multifashion"
    c.data.kwargs = dict(n_train=20000, n_test=5000, canvas=36, shift=6, seed=0)
    c.model.arch = arch
    c.model.encoder = spec["encoder"]
    c.model.encoder_kwargs = dict(spec["encoder_kwargs"])
    c.model.arch_kwargs = dict(spec["arch_kwargs"])
    c.train.steps = spec["steps"]
    c.train.batch_size = 128
    c.train.log_every = 250
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.optimizer.lr = 1e-3
    return c
