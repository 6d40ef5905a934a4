"""Helpers shared by the training-loop tests: a tiny MultiTab run config and metrics reading."""
import json
import os

from mtl.config import base_config


def tiny_config(steps=40, num_tasks=2, correlation=0.5, optim=None, **train):
    """A seconds-long run: MultiTab data, a 16-unit MLP, evals and checkpoints every 10 steps."""
    c = base_config()
    c.data.name = "multitab"
    c.data.kwargs = dict(num_tasks=num_tasks, n_train=300, n_test=100, dim=8, correlation=correlation, seed=0)
    c.model.encoder_kwargs = dict(hidden=(16,))
    c.train.steps = steps
    c.train.batch_size = 32
    c.train.eval_batch_size = 64
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.checkpoint_every = 10
    for k, v in train.items():
        c.train[k] = v
    for k, v in (optim or {}).items():
        c.optim[k] = v
    return c


def read_metrics(workdir):
    """metrics.jsonl records without the (timing-dependent) rate field."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(l) for l in f]
    for r in recs:
        r.pop("steps_per_s", None)
    return recs
