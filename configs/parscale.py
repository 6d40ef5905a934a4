"""Parallel scaling (ParScale, methods.md §6): a byte-level causal transformer trained on the
Python standard library's own source (a real code corpus, offline), with P parallel streams.

    PYTHONPATH=$PWD mtl train --config configs/parscale.py --workdir /tmp/ps --config.model.parscale.P=4
    PYTHONPATH=$PWD mtl generate --workdir /tmp/ps --prompt "def "

``arg`` picks the backbone size: ``tiny`` (default; dim 64, 2 layers, ~0.1M non-embedding
parameters, a few minutes on 2 CPU cores), ``small`` (dim 96, 3 layers), ``medium`` (dim 128,
4 layers), ``large`` (dim 192, 4 layers, ~1.8M). P and the prefix options are in
``model.parscale`` (P = 1 is the plain model). The corpus split is by file (SHA-256 of the
relative path; mtl/data/bytecorpus.py); ``data.kwargs.max_*_bytes`` cap the bytes read per
split (0 = the whole split). For a full-scale tfds text corpus prepared in array_record
format: ``--config.data.name=tfds_text --config.data.kwargs="{'name': 'NAME', 'seq_len': 128}"``.

Two-stage training (mtl/nn/parscale.py, ``TwoStage``): train P = 1 first, then a P > 1 model
whose backbone is loaded from it (the run's best parameters, or an ``mtl export`` artifact);
only the new prefixes and aggregator start fresh, and zero-init prefix gates
(``model.parscale.prefix_gate``, on by default with ``init_from``) make step 0 exactly the
base model's loss. ``freeze_backbone=True`` trains only prefixes, gates and aggregator::

    PYTHONPATH=$PWD mtl train --config configs/parscale.py --workdir /tmp/ps1
    PYTHONPATH=$PWD mtl train --config configs/parscale.py --workdir /tmp/ps4 --config.model.parscale.P=4 \
        --config.model.parscale.init_from=/tmp/ps1 --config.model.parscale.freeze_backbone=True

The base must have the same ``model.encoder_kwargs`` and data/tasks and P = 1; it is read
at every start of the command (a resumed run restores its own checkpoint instead).
"""
from mtl.config import base_config

SIZES = {"tiny": (64, 2, 2), "small": (96, 3, 3), "medium": (128, 4, 4), "large": (192, 4, 4)}


def get_config(arg=None):
    size = arg or "tiny"
    if size not in SIZES:
        raise ValueError(f"configs/parscale.py: unknown size {size!r}; use one of {sorted(SIZES)}")
    dim, depth, heads = SIZES[size]
    seq_len = 128
    c = base_config()
    c.name = f"parscale_{size}"
    c.data.name = "python_stdlib"
    c.data.kwargs = dict(seq_len=seq_len, val_fraction=0.05, test_fraction=0.05,
                         max_train_bytes=2_000_000, max_eval_bytes=65_536)
    c.model.arch = "lm"
    c.model.encoder = "byte_transformer"
    c.model.encoder_kwargs = dict(dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0)
    c.model.parscale = dict(P=1, prefix_len=48, reparam="mlp", prefix_dim=16, prefix_hidden=32, smoothing=0.01)
    c.train.steps = 200
    c.train.batch_size = 32
    c.train.eval_batch_size = 128
    c.train.log_every = 50
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 1e-4
    c.optimizer.grad_clip = 1.0
    return c
