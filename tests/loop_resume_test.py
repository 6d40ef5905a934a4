"""Resume when evaluations (and best-model saves) happen between checkpoints."""
import json
import os

import numpy as np

from mtl.checkpoint import CheckpointStore
from mtl.config import base_config
from mtl.train.loop import run


def config():
    c = base_config()
    c.data.kwargs = dict(num_tasks=2, n_train=300, n_test=100, dim=8, correlation=0.5, seed=1)
    c.model.encoder_kwargs = dict(hidden=(16,))
    c.train.steps = 40
    c.train.batch_size = 32
    c.train.eval_batch_size = 64
    c.train.log_every = 5
    c.train.eval_every = 5
    c.train.checkpoint_every = 10
    c.optimizer.lr = 3e-2
    return c


def test_resume_with_best_saves_between_checkpoints(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    rf = run(config(), full)
    run(config(), part, _stop_after=17)  # evals at 15 (maybe a new best) after checkpoint 10
    assert CheckpointStore(os.path.join(part, "checkpoints")).latest_step() == 10
    rp = run(config(), part)
    assert rp["val"] == rf["val"] and rp["test"] == rf["test"]
    assert rp["selected_step"] == rf["selected_step"]
    # the selected parameters exist in best/ and are the same in both runs
    for wd in (full, part):
        assert rf["selected_step"] in CheckpointStore(os.path.join(wd, "best"), max_to_keep=None).steps()
    lines = lambda wd: [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    strip = lambda recs: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in recs]
    assert strip(lines(full)) == strip(lines(part))
    # selection really happened on validation: the selected step had the lowest mean val loss
    evals = [r for r in lines(full) if r["split"] == "val"]
    best = min(evals, key=lambda r: np.mean([m["loss"] for m in r["metrics"].values()]))
    assert best["step"] == rf["selected_step"]
