"""The training loop: exact resume (in-process and after a real SIGKILL), NaN handling,
workdir protection, model selection on validation, Δm% from baselines."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mtl.checkpoint import CheckpointStore
from mtl.config import base_config
from mtl.data import registry
from mtl.data.base import ArraySource, DataBundle, TaskInfo
from mtl.train.baselines import run_experiment
from mtl.train.loop import NonFiniteLossError, WorkdirConflictError, build, load_data, run
from mtl.config import with_defaults
from tiny_runs import read_metrics, tiny_config


def final_params(workdir, cfg):
    cfg = with_defaults(cfg)
    bundle, infos, _, _ = load_data(cfg)
    steps = build(cfg, bundle, infos, mesh=None)
    store = CheckpointStore(os.path.join(workdir, "checkpoints"))
    state, _ = store.restore(store.latest_step(), steps.abstract_state)
    store.close()
    return jax.device_get(state)


def assert_same_run(a, b, cfg):
    ra, rb = (json.load(open(os.path.join(d, "results.json"))) for d in (a, b))
    for k in ("val", "test", "selected_step"):
        assert ra[k] == rb[k], k
    assert read_metrics(a) == read_metrics(b)
    for x, y in zip(jax.tree.leaves(final_params(a, cfg)), jax.tree.leaves(final_params(b, cfg))):
        np.testing.assert_array_equal(x, y)


def test_resume_in_process_is_exact(tmp_path):
    cfg = tiny_config()
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run(cfg, full)
    run(cfg, part, _stop_after=23)  # stops between checkpoints: steps 21..23 are redone
    assert CheckpointStore(os.path.join(part, "checkpoints")).latest_step() == 20
    run(cfg, part)
    assert_same_run(full, part, cfg)


CONFIG_FILE = """
from mtl.config import base_config
def get_config(arg=None):
    c = base_config()
    c.data.name = "multitab"
    c.data.kwargs = dict(num_tasks=2, n_train=2000, n_test=200, dim=16, correlation=0.5, seed=0)
    c.model.encoder_kwargs = dict(hidden=(256, 256))
    c.train.steps = 600
    c.train.batch_size = 128
    c.train.log_every = 50
    c.train.eval_every = 100
    c.train.checkpoint_every = 50
    return c
"""


def test_resume_after_sigkill_is_exact(tmp_path):
    cfg_path = tmp_path / "cfg.py"
    cfg_path.write_text(CONFIG_FILE)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = lambda wd: [sys.executable, "-m", "mtl.cli", "train", "--config", str(cfg_path), "--workdir", wd]
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = os.path.join(killed, "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckdir) and any(d.isdigit() and int(d) >= 150 for d in os.listdir(ckdir)):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(killed, "results.json"))
    subprocess.run(cmd(killed), env=env, check=True, capture_output=True)
    full = str(tmp_path / "full")
    subprocess.run(cmd(full), env=env, check=True, capture_output=True)
    from mtl.config import load_config_file
    assert_same_run(full, killed, load_config_file(str(cfg_path)))


def nan_bundle(bad_row=150):
    r = np.random.default_rng(0)
    x = r.normal(size=(400, 4)).astype(np.float32)
    y1 = x.sum(1, keepdims=True)
    y2 = x[:, :1].copy()
    y2[bad_row] = np.nan  # a *labelled* example with a NaN label
    src = ArraySource(x, {"good": y1, "bad": y2})
    test = ArraySource(x[:50], {"good": y1[:50], "bad": np.zeros((50, 1), np.float32)})
    return DataBundle("nan_data", [TaskInfo("good", "regression", 1), TaskInfo("bad", "regression", 1)],
                      train=src, test=test, val=test, input_shape=(4,))


@pytest.fixture
def nan_dataset(monkeypatch):
    monkeypatch.setitem(registry.DATASETS, "nan_data", nan_bundle)


def test_nan_loss_stops_naming_task_and_step_and_keeps_checkpoint(tmp_path, nan_dataset):
    cfg = tiny_config(steps=60, batch_size=8)
    from mtl.data.pipeline import TrainBatches
    tb = TrainBatches(nan_bundle().train, 8, 0)
    bad_row = int(tb.global_indices(25)[0])  # first met at step 26 (1-based), after checkpoints 10, 20
    first = next(s for s in range(60) if bad_row in tb.global_indices(s)) + 1
    assert first == 26
    cfg.data.name, cfg.data.kwargs = "nan_data", {"bad_row": bad_row}
    wd = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"task 'bad'") as e:
        run(cfg, wd)
    assert f"step {first};" in str(e.value)
    steps = CheckpointStore(os.path.join(wd, "checkpoints")).steps()
    assert steps == [10, 20]
    assert "checkpoint is step 20" in str(e.value)
    # skip mode: finishes, counts skipped steps, parameters finite
    cfg.train.on_nonfinite = "skip"
    res = run(cfg, str(tmp_path / "skip"))
    n_bad = sum(bad_row in tb.global_indices(s) for s in range(60))
    assert res["nonfinite_steps_skipped"] == n_bad >= 1
    assert np.isfinite(res["test"]["good"]["loss"])


def test_workdir_with_other_config_is_refused_and_untouched(tmp_path):
    wd = str(tmp_path / "run")
    run(tiny_config(steps=10), wd)
    before = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(wd) for f in fs}
    with pytest.raises(WorkdirConflictError, match=r"train.steps: 10 -> 20"):
        run(tiny_config(steps=20), wd)
    after = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(wd) for f in fs}
    assert before == after
    res = run(tiny_config(steps=20), wd, overwrite=True)
    assert res["steps"] == 20


def test_model_selection_uses_validation(tmp_path):
    wd = str(tmp_path / "run")
    res = run(tiny_config(steps=40), wd)
    evals = [r for r in read_metrics(wd) if r["split"] == "val"]
    sel = [np.mean([m["loss"] for m in r["metrics"].values()]) for r in evals]
    assert res["selected_step"] == evals[int(np.argmin(sel))]["step"]
    # the reported validation metrics are those of the selected step
    best = evals[int(np.argmin(sel))]["metrics"]
    for t in best:
        assert res["val"][t]["loss"] == pytest.approx(best[t]["loss"], rel=1e-6)


def test_baselines_and_delta_m(tmp_path):
    cfg = tiny_config(steps=20)
    cfg.baselines.train = True
    wd = str(tmp_path / "exp")
    res = run_experiment(cfg, wd)
    rel = {}
    for t in ("t0", "t1"):
        stl = json.load(open(os.path.join(wd, "baselines", t, "results.json")))
        assert [x["name"] for x in stl["tasks"]] == [t]
        m, s = res["test"][t], stl["test"][t]
        rel[t] = np.mean([-(m["mse"] - s["mse"]) / s["mse"], -(m["mae"] - s["mae"]) / s["mae"]]) * 100
    assert res["delta_m_test"]["delta_m"] == pytest.approx(np.mean(list(rel.values())), rel=1e-9)


def test_train_on_a_tfds_dataset(tmp_path):
    """`data.name="tfds"` end to end through the trainer (tfds mocked: nothing to download)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = tiny_config(steps=4, batch_size=16, eval_batch_size=32, log_every=2, eval_every=2, checkpoint_every=2)
    cfg.data.name = "tfds"
    cfg.data.kwargs = dict(name="mnist", tasks={"digit": "label"})
    with tfds.testing.mock_data(num_examples=80):
        res = run(cfg, str(tmp_path / "run"))
    assert [t["name"] for t in res["tasks"]] == ["digit"]
    assert 0.0 <= res["test"]["digit"]["accuracy"] <= 1.0
    assert np.isfinite(res["test"]["digit"]["loss"])
