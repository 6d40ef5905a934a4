"""Micro- vs global-batch load balancing on a two-domain mixture (Fashion-MNIST + MNIST).

    mtl train --config configs/moe_domains.py:global --workdir runs/moe_domains_global
    mtl train --config configs/moe_domains.py:micro --workdir runs/moe_domains_micro

Data: ``domain_mixture`` (mtl/data/domains.py), 4,000 training and 1,000 test images per
domain, one 10-way task ``label`` (garment class or digit); 10% of train is held out for
validation. The domain id is not shown to the model; experiments/moe.py reads it from the
dataset (``bundle.meta``) to measure how the trained routers split the domains.

Model: M³ViT on 28x28 inputs, patch 7 (16 patches + a class token), dim 48, depth 4,
4 heads; blocks 1 and 3 are MoE (8 experts, top-2, expert hidden 96), multi-gate routing,
capacity factor 1.25 (capacity-buffer dispatch). The argument picks the load-balancing
loss (weight 0.05): ``global`` balances expert use over the whole batch, ``micro`` over
each image's tokens separately. 500 steps of AdamW (lr 1e-3, 50 warmup steps, cosine),
batch 64 (~1-2 min on 2 CPU cores).
"""
from mtl.config import base_config

M3VIT = dict(patch=7, dim=48, depth=4, num_heads=4, num_experts=8, k=2, expert_hidden=96,
             router="multi_gate", capacity_factor=1.25, impl="capacity", lbl_weight=0.05)


def get_config(arg=None):
    lbl = arg or "global"
    if lbl not in ("micro", "global"):
        raise ValueError(f"configs/moe_domains.py: unknown load balancing {lbl!r}; use micro or global")
    c = base_config()
    c.name = f"moe_domains_{lbl}"
    c.data.name = "domain_mixture"
    c.data.kwargs = dict(domains=("fashion_mnist", "mnist"), n_train=4000, n_test=1000, seed=0)
    c.data.val_fraction = 0.1
    c.model.arch = "m3vit"
    c.model.arch_kwargs = dict(M3VIT, lbl=lbl)
    c.train.steps = 500
    c.train.batch_size = 64
    c.train.log_every = 50
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 50
    return c
