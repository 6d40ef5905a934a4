"""MultiFashion with tiny ViTs: a dense multi-task ViT vs the task-routed MoE ViT (M³ViT)
vs TaskExpert vs the encoder-focused cross-stitch / MTAN / learning-to-branch on the same ViT
(experiments/moe.py runs them all and compares single-task inference FLOPs).

    mtl train --config configs/moe_multifashion.py:m3vit --workdir runs/mf_m3vit
    mtl train --config configs/moe_multifashion.py:dense --workdir runs/mf_dense
    mtl train --config configs/moe_multifashion.py:taskexpert --workdir runs/mf_taskexpert
    mtl train --config configs/moe_multifashion.py:cross_stitch --workdir runs/mf_cross_stitch   # also mtan, ltb

36x36 inputs, patch 6 (36 patches + a class token), dim 64, depth 4, 4 heads. M³ViT:
blocks 1 and 3 are MoE (8 experts, top-2, expert hidden 128 so a token's two experts cost
one dense 256-unit MLP), multi-gate routing, capacity factor 1.25 (capacity-buffer
dispatch), global-batch LBL with weight 0.01.
"""
from mtl.config import base_config

VIT = dict(patch=6, dim=64, depth=4, num_heads=4, mlp_ratio=4.0)
#: the encoder-focused / soft-sharing architectures on the same ViT (mtl/nn/stages.py: a stage
#: is one transformer block): cross-stitch (one ViT column per task, units between blocks),
#: MTAN (one shared ViT, per-task attention masks per block), learning-to-branch (one column
#: per task, learned parents; options as configs/soft_sharing.py).
ENCODER_FOCUSED = {"cross_stitch": dict(alpha_same=0.9), "mtan": {},
                   "ltb": dict(tau0=5.0, decay_steps=100.0, warmup_steps=30)}


def get_config(arg=None):
    arch = arg or "m3vit"
    c = base_config()
    c.name = f"moe_multifashion_{arch}"
    c.data.name = "multifashion"
    c.data.kwargs = dict(n_train=6000, n_test=2000, canvas=36, shift=6, seed=0)
    if arch == "dense":
        c.model.arch = "shared"
        c.model.encoder = "vit"
        c.model.encoder_kwargs = dict(VIT)
    elif arch == "m3vit":
        c.model.arch = "m3vit"
        c.model.arch_kwargs = dict(VIT, num_experts=8, k=2, expert_hidden=128, router="multi_gate",
                                   capacity_factor=1.25, impl="capacity", lbl="global", lbl_weight=0.01)
    elif arch == "taskexpert":
        c.model.arch = "taskexpert"
        c.model.arch_kwargs = dict(VIT, num_experts=4, expert_hidden=64)
    elif arch in ENCODER_FOCUSED:
        c.model.arch = arch
        c.model.encoder = "vit"
        c.model.encoder_kwargs = dict(VIT)
        c.model.arch_kwargs = dict(ENCODER_FOCUSED[arch])
    else:
        raise ValueError(f"configs/moe_multifashion.py: unknown arch {arch!r}; use one of "
                         f"{', '.join(('dense', 'm3vit', 'taskexpert') + tuple(ENCODER_FOCUSED))}")
    c.train.steps = 800
    c.train.batch_size = 64
    c.train.log_every = 100
    c.train.eval_every = 400
    c.train.checkpoint_every = 400
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 100
    return c
