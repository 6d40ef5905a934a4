"""A config that cannot build writes nothing; single-task baselines train with plain EW."""
import os

import pytest

from mtl.config import base_config, with_defaults
from mtl.train.baselines import baseline_config
from mtl.train.loop import run


def test_bad_config_writes_no_workdir(tmp_path):
    c = base_config()
    c.data.kwargs = dict(num_tasks=2, n_train=100, n_test=50, dim=4)
    c.data.tasks = ("t9",)
    wd = tmp_path / "run"
    with pytest.raises(KeyError, match="no task 't9'"):
        run(c, str(wd))
    assert not wd.exists()
    c.data.tasks = ()
    c.model.encoder_kwargs = dict(hiden=(4,))
    with pytest.raises(TypeError, match="hiden"):
        run(c, str(wd))
    assert not wd.exists()


def test_baseline_config_keeps_settings_but_one_task_and_ew():
    c = base_config()
    c.optim.aggregator = "mgda"
    c.optim.grad_on = "representation"
    c.train.steps = 77
    sub = with_defaults(baseline_config(c, "t1"))
    assert tuple(sub.data.tasks) == ("t1",)
    assert sub.optim.aggregator == base_config().optim.aggregator == "ew"
    assert sub.optim.grad_on == base_config().optim.grad_on
    assert sub.train.steps == 77 and not sub.baselines.train
