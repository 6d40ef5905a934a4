"""Multi-task optimisation sweep (experiments/mtl_optim.py): one run of one aggregator.

    mtl train --config configs/mtl_optim.py:multitab0.4 --config.optim.aggregator=cagrad \
        --config.optim.hparams.c=0.4 --workdir runs/mtl_optim_cagrad

Argument = dataset: ``multifashion`` (reduced: 10k train, MLP) or ``multitabR`` with R the
task correlation ρ of the MultiTab-Bench-style synthetic data (4 regression tasks, few
samples so that sharing matters). CPU-sized; for bigger hardware raise steps/width/n.
Conflict rates come from ``optim.diagnostics_every``.
"""
from mtl.config import base_config


def get_config(arg=None):
    arg = arg or "multitab0.4"
    c = base_config()
    c.name = f"mtl_optim_{arg}"
    if arg == "multifashion":
        c.data.name = "multifashion"
        c.data.kwargs = dict(n_train=10000, n_test=2000, canvas=36, shift=6, seed=0)
        c.model.encoder_kwargs = dict(hidden=(256, 128))
        c.train.steps = 400
        c.train.batch_size = 128
        c.optimizer.lr = 1e-3
    elif arg.startswith("multitab"):
        rho = float(arg[len("multitab"):] or 0.4)
        c.data.name = "multitab"
        c.data.kwargs = dict(num_tasks=4, n_train=600, n_test=2000, dim=16, correlation=rho,
                             degrees=(1, 1, 2, 2), noise=0.1, seed=0)
        c.model.encoder_kwargs = dict(hidden=(64, 64))
        c.train.steps = 400
        c.train.batch_size = 64
        c.optimizer.lr = 3e-3
    else:
        raise ValueError(f"configs/mtl_optim.py: unknown dataset {arg!r}; use multifashion or multitab<rho>")
    c.train.log_every = 100
    c.train.eval_every = 200
    c.train.checkpoint_every = c.train.steps
    c.train.keep_checkpoints = 1
    c.optim.diagnostics_every = 50
    return c
