"""Slimmable multi-task network on DenseFashion: per-pixel segmentation (11 classes),
depth (L1) and occluding contours (BCE) from composited Fashion-MNIST garments (real
images, offline: Debian package ``dataset-fashion-mnist`` or
``--config.data.kwargs.data_dir=DIR``).

    mtl train --config configs/slimmable_dense.py --workdir runs/slimmable_dense
    mtl train --config configs/slimmable_dense.py:vit --workdir runs/slimmable_dense_vit

The argument picks the slimmable encoder: ``cnn`` (default), ``vit`` or ``mlp``. Each task
has its own slimmable dense decoder; widths (0.25, 0.5, 0.75, 1). ``mtl train`` trains it
with the sandwich rule (``model.arch_kwargs.sandwich``: n configurations per step, widest +
narrowest + n-2 random, in-place distillation and CIKD from the widest;
``mtl.nn.slimmable.training``), e.g. ``--config.model.arch_kwargs.sandwich.cikd_weight=0``
for the no-CIKD ablation. Then ``mtl slim --workdir RUN --budget 12MFLOPs --preference depth=2,seg=1``.
"""
from mtl.config import base_config


def get_config(arg=None):
    encoder = arg or "cnn"
    c = base_config()
    c.name = f"slimmable_dense_{encoder}"
    c.data.name = "dense_fashion"
    c.data.kwargs = dict(n_train=4000, n_test=1000, canvas=32, objects=(2, 3), seed=0)
    c.model.arch = "slimmable"
    c.model.encoder = encoder
    c.model.arch_kwargs = dict(widths=(0.25, 0.5, 0.75, 1.0), decoder_channels=16, groups=4,
                               sandwich=dict(n=4, kd_weight=1.0, cikd_weight=1.0, sub_labels=True, pool_size=8))
    if encoder == "cnn":
        c.model.encoder_kwargs = dict(channels=(16, 32, 64), groups=4)
    elif encoder == "vit":
        c.model.encoder_kwargs = dict(patch=4, dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
    elif encoder == "mlp":
        c.model.encoder_kwargs = dict(hidden=(512, 256))
        c.model.arch_kwargs["decoder_hidden"] = (128,)
    else:
        raise ValueError(f"configs/slimmable_dense.py: unknown encoder {encoder!r}; use cnn, vit or mlp")
    c.train.steps = 400
    c.train.batch_size = 32
    c.train.eval_batch_size = 250
    c.train.log_every = 50
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.optimizer.lr = 3e-3
    return c
