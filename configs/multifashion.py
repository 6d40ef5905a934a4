"""MultiFashion: two Fashion-MNIST garments overlaid on a 36x36 canvas; classify the left
and the right one. Real images, offline (Debian package ``dataset-fashion-mnist`` or
``--config.data.kwargs.data_dir=DIR`` with the four IDX files).

    mtl train --config configs/multifashion.py --workdir runs/multifashion
    mtl train --config configs/multifashion.py:cnn --workdir runs/multifashion_cnn   # small ResNet (slow on CPU)

The argument picks the encoder: ``mlp`` (default) or ``cnn``. Baselines (one model per
task, same settings) are trained for Δm%.
"""
from mtl.config import base_config


def get_config(arg=None):
    encoder = arg or "mlp"
    c = base_config()
    c.name = f"multifashion_{encoder}"
    c.data.name = "multifashion"
    c.data.kwargs = dict(n_train=20000, n_test=5000, canvas=36, shift=6, seed=0)
    c.model.encoder = encoder
    if encoder == "mlp":
        c.model.encoder_kwargs = dict(hidden=(512, 256))
        c.train.steps = 3000
    elif encoder == "cnn":
        c.model.encoder_kwargs = dict(widths=(16, 32, 64), groups=8)
        c.train.steps = 1500
    else:
        raise ValueError(f"configs/multifashion.py: unknown encoder {encoder!r}; use mlp or cnn")
    c.train.batch_size = 128
    c.train.log_every = 250
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.optimizer.lr = 1e-3
    c.baselines.train = True
    return c
