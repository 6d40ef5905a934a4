"""Regression tests of issue 11's defects: workdirs never damaged by a refused command,
checkpoints verified with fallback, honest metrics and messages."""
import json
import os
import shutil

import numpy as np
import pytest

from mtl import integrity
from mtl.checkpoint import CheckpointCorruptError, CheckpointMismatchError, CheckpointStore
from mtl.cli import main
from mtl.config import to_json, with_defaults
from mtl.data import registry
from mtl.data.base import ArraySource, DataBundle, TaskInfo
from mtl.train import loop
from mtl.train.loop import NonFiniteLossError, run
from tiny_runs import read_metrics, tiny_config


def tree_digests(root):
    """{relative path: sha256} of every file under ``root``."""
    return {k: v["sha256"] for k, v in integrity.digest_files(root, skip=()).items()}


def largest_file(step_dir):
    """The largest array-data file of a step (orbax's ocdbt ``d/`` files)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
             if os.path.basename(d) == "d"]
    return max(files, key=os.path.getsize)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run, and a copy of it stopped after step 30 (checkpoints 20, 30)."""
    root = tmp_path_factory.mktemp("ref")
    full, part = str(root / "full"), str(root / "part")
    res = run(tiny_config(steps=40), full)
    run(tiny_config(steps=40), part, _stop_after=30)
    return res, full, part


def resumed_copy(reference, tmp_path, name="run"):
    wd = str(tmp_path / name)
    shutil.copytree(reference[2], wd)
    return wd


# ------------------------------------------------------------------ 1, 2: refused commands

def test_failed_resume_leaves_config_and_original_command_works(reference, tmp_path):
    res, full, _ = reference
    wd = resumed_copy(reference, tmp_path)
    before = tree_digests(wd)
    bad = tiny_config(steps=40)
    bad.model.encoder_kwargs = dict(hidden=(24,))
    with pytest.raises(CheckpointMismatchError, match=r"\(16,\).*\(24,\)|\(24,\).*\(16,\)"):
        run(bad, wd, resume=True)
    assert tree_digests(wd) == before          # config.json included: nothing rewritten
    out = run(tiny_config(steps=40), wd)       # the original command is not refused
    assert out["test"] == res["test"] and read_metrics(wd) == read_metrics(full)


def test_invalid_batch_sizes_write_nothing(tmp_path):
    wd = tmp_path / "run"
    with pytest.raises(ValueError, match=r"train.batch_size=100000 exceeds the 270 training examples"):
        run(tiny_config(batch_size=100000), str(wd))
    assert not wd.exists()
    c = tiny_config(batch_size=60)
    c.mesh.data = 8
    with pytest.raises(ValueError, match=r"train.batch_size=60 is not divisible by the 8 batch shards"):
        run(c, str(wd))
    assert not wd.exists()
    c = tiny_config(eval_batch_size=100)
    c.mesh.data = 8
    with pytest.raises(ValueError, match=r"train.eval_batch_size=100 is not divisible by the 8"):
        run(c, str(wd))
    assert not wd.exists()


def test_invalid_batch_in_existing_workdir_keeps_it(reference, tmp_path):
    wd = resumed_copy(reference, tmp_path)
    before = tree_digests(wd)
    with pytest.raises(ValueError, match="exceeds"):   # --resume accepts a changed config, not a bad one
        run(tiny_config(steps=40, batch_size=100000), wd, resume=True)
    assert tree_digests(wd) == before


# ------------------------------------------------------------------ 3, 4, 5: corrupt checkpoints

def _fallback_ok(reference, wd, capsys, bad_step=30):
    res = run(tiny_config(steps=40), wd)
    log = capsys.readouterr().out
    said = [ln for ln in log.splitlines() if "fell back" in ln]
    assert len(said) == 1 and f"step {bad_step}: " in said[0] and "checkpoints.corrupt" in said[0]
    assert said[0].endswith("fell back to checkpoint step 20")   # one line says it all
    assert os.path.isdir(os.path.join(wd, "checkpoints.corrupt", str(bad_step)))   # kept aside
    assert res["test"] == reference[0]["test"] and read_metrics(wd) == read_metrics(reference[1])
    return log


def test_finite_garbage_is_detected_and_falls_back(reference, tmp_path, capsys):
    wd = resumed_copy(reference, tmp_path)
    path = largest_file(os.path.join(wd, "checkpoints", "30"))
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        mid = len(data) // 2
        data[mid:mid + 8] = np.float32([0.5, 1.5]).tobytes()  # finite values, same size
        f.seek(0)
        f.write(data)
    log = _fallback_ok(reference, wd, capsys)
    assert "does not match its sha256 digest" in log and os.path.relpath(path, os.path.join(wd, "checkpoints", "30")) in log


def test_truncated_file_falls_back_in_one_line(reference, tmp_path, capsys):
    wd = resumed_copy(reference, tmp_path)
    path = largest_file(os.path.join(wd, "checkpoints", "30"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    log = _fallback_ok(reference, wd, capsys)
    assert "truncated" in log and "Traceback" not in log


def test_truncated_file_without_manifest_is_still_caught(reference, tmp_path, capsys):
    wd = resumed_copy(reference, tmp_path)
    step = os.path.join(wd, "checkpoints", "30")
    if os.path.exists(os.path.join(step, integrity.MANIFEST)):
        os.remove(os.path.join(step, integrity.MANIFEST))   # e.g. killed between commit and manifest
    for d, _, fs in os.walk(step):                       # (orbax leaves some d/ files unreferenced:
        for name in fs:                                  #  truncate them all)
            if os.path.basename(d) == "d":
                with open(os.path.join(d, name), "r+b") as f:
                    f.truncate(os.path.getsize(os.path.join(d, name)) // 2)
    log = _fallback_ok(reference, wd, capsys)
    assert "cannot be read" in log


def test_corrupt_json_names_file_and_step(reference, tmp_path):
    wd = resumed_copy(reference, tmp_path)
    with open(os.path.join(wd, "checkpoints", "30", "meta", "metadata"), "w") as f:
        f.write("{not json")
    store = CheckpointStore(os.path.join(wd, "checkpoints"))
    steps = loop.build(with_defaults(tiny_config(steps=40)), *loop.load_data(with_defaults(tiny_config()))[:2])
    with pytest.raises(CheckpointCorruptError, match=r"step 30: file meta/metadata"):
        store.restore(30, steps.abstract_state)
    os.remove(os.path.join(wd, "checkpoints", "30", integrity.MANIFEST))
    with pytest.raises(CheckpointCorruptError, match=r"step 30: file meta/metadata is not valid JSON"):
        store.restore(30, steps.abstract_state)
    store.close()


def test_every_step_bad_says_so(reference, tmp_path):
    wd = resumed_copy(reference, tmp_path)
    for s in (20, 30):
        os.remove(largest_file(os.path.join(wd, "checkpoints", str(s))))
    with pytest.raises(CheckpointCorruptError, match="no checkpoint in .* verifies"):
        run(tiny_config(steps=40), wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints.corrupt"))) == ["20", "30"]


# ------------------------------------------------------------------ 6: skipped steps

def nan_bundle(n_bad=0, nan_test=False):
    rng = np.random.default_rng(0)
    n = 200
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x @ np.ones(4, np.float32))[:, None]
    bad = y.copy()
    bad[:n_bad] = np.nan
    src = ArraySource(x[:160], {"a": y[:160], "b": bad[:160]})
    test_b = bad[160:].copy()
    if nan_test:
        test_b[0] = np.inf
    test = ArraySource(x[160:], {"a": y[160:], "b": test_b})
    return DataBundle("nan_data", [TaskInfo("a", "regression", 1), TaskInfo("b", "regression", 1)],
                      train=src, test=test, val=ArraySource(x[160:], {"a": y[160:], "b": y[160:]}), input_shape=(4,))


@pytest.fixture
def nan_dataset(monkeypatch):
    monkeypatch.setitem(registry.DATASETS, "nan_data", nan_bundle)


def nan_config(**kw):
    c = tiny_config(steps=40, batch_size=16, **kw)
    c.data.name, c.train.on_nonfinite = "nan_data", "skip"
    return c


def test_skipping_nearly_every_step_fails(tmp_path, nan_dataset, capsys):
    c = nan_config()
    c.data.kwargs = {"n_bad": 150}             # almost every batch holds a NaN label
    with pytest.raises(NonFiniteLossError, match=r"more than train.max_skip_fraction=0.25 of the 40 steps"):
        run(c, str(tmp_path / "run"))
    assert "skipped" in capsys.readouterr().out   # said on the console as it happened


def test_skips_reported_and_results_are_standard_json(tmp_path, nan_dataset, capsys):
    c = nan_config()
    c.data.kwargs = {"n_bad": 1, "nan_test": True}
    res = run(c, str(tmp_path / "run"))
    out = capsys.readouterr().out
    n = res["nonfinite_steps_skipped"]
    assert 1 <= n <= 10 and f"{n} of 40 steps were skipped" in out
    text = open(tmp_path / "run" / "results.json").read()

    def refuse(c):
        raise AssertionError(f"non-standard JSON constant {c}")
    parsed = json.loads(text, parse_constant=refuse)
    assert parsed["test"]["b"]["mse"] is None and np.isfinite(parsed["test"]["a"]["mse"])
    for ln in open(tmp_path / "run" / "metrics.jsonl"):
        json.loads(ln, parse_constant=refuse)


# ------------------------------------------------------------------ 7: learning rate

@pytest.mark.parametrize("lr", [-3e-3, 0.0, float("nan")])
def test_nonpositive_learning_rate_refused(tmp_path, lr):
    c = tiny_config()
    c.optimizer.lr = lr
    with pytest.raises(ValueError, match="optimizer.lr must be a positive finite number"):
        run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 9: messages and timing

def test_nan_before_first_checkpoint_says_none_saved(tmp_path, nan_dataset):
    c = nan_config()
    c.train.on_nonfinite = "raise"
    c.data.kwargs = {"n_bad": 160}
    with pytest.raises(NonFiniteLossError, match="No checkpoint was saved yet") as e:
        run(c, str(tmp_path / "run"))
    assert "step None" not in str(e.value)


def test_ctrl_c_saves_then_exits_quietly(tmp_path, monkeypatch, capsys, reference):
    cfg_path = tmp_path / "cfg.py"
    cfg_path.write_text("import sys; sys.path.insert(0, %r)\nfrom tiny_runs import tiny_config\n"
                        "def get_config(arg=None):\n    return tiny_config(steps=40)\n" % os.path.dirname(__file__))
    orig = loop.Steps.step

    def step(self, state, batch, diagnostics=False, **kw):
        if int(state.step) == 15:
            raise KeyboardInterrupt
        return orig(self, state, batch, diagnostics=diagnostics, **kw)

    monkeypatch.setattr(loop.Steps, "step", step)
    wd = str(tmp_path / "run")
    assert main(["train", "--config", str(cfg_path), "--workdir", wd]) == 130
    cap = capsys.readouterr()
    assert "interrupted after step 15; saving checkpoint step 15" in cap.out
    assert cap.err.strip().splitlines() == [
        f"mtl train: interrupted after step 15; checkpoint step 15 is saved in {wd}/checkpoints: "
        "run the same command again to resume"]
    store = CheckpointStore(os.path.join(wd, "checkpoints"))
    assert store.steps() == [10, 15] and store.verify(15) > 0
    store.close()
    monkeypatch.setattr(loop.Steps, "step", orig)
    assert main(["train", "--config", str(cfg_path), "--workdir", wd]) == 0
    assert json.load(open(os.path.join(wd, "results.json")))["test"] == reference[0]["test"]
    # 9c: --which for a missing step lists the ones kept
    assert main(["eval", "--workdir", wd, "--which", "7"]) == 1
    assert "no checkpoint at step 7; the steps kept are 30, 40" in capsys.readouterr().err


def test_train_time_adds_up_and_eta_excludes_compile(tmp_path, monkeypatch):
    import time as _time
    orig = loop.Steps.step
    calls = {"n": 0}

    def slow_first(self, state, batch, diagnostics=False, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            _time.sleep(3.0)             # stands in for a long compile
        return orig(self, state, batch, diagnostics=diagnostics, **kw)

    monkeypatch.setattr(loop.Steps, "step", slow_first)
    wd = str(tmp_path / "run")
    run(tiny_config(steps=40), wd, _stop_after=20)
    first = [r for r in read_metrics(wd) if r["split"] == "train"]
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        rate5 = json.loads(f.readline())["steps_per_s"]
    assert first[0]["step"] == 5 and rate5 > 4   # steps 2..5 timed; not 5 steps over > 3 s (< 1.7/s)
    store = CheckpointStore(os.path.join(wd, "checkpoints"))
    _, meta = store.restore(20, loop.build(with_defaults(tiny_config(steps=40)),
                                           *loop.load_data(with_defaults(tiny_config()))[:2]).abstract_state)
    store.close()
    assert meta["train_time_s"] >= 3.0
    calls["n"] = 0
    res = run(tiny_config(steps=40), wd)   # sleeps 3 s again on its first step
    assert res["train_time_s"] >= meta["train_time_s"] + 3.0


def test_config_json_written_atomically(tmp_path, monkeypatch):
    wd = tmp_path / "run"
    run(tiny_config(steps=10), str(wd))
    before = (wd / "config.json").read_bytes()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        integrity.atomic_write_json(str(wd / "config.json"), to_json(with_defaults(tiny_config(steps=99))))
    assert (wd / "config.json").read_bytes() == before
    assert [p.name for p in wd.iterdir() if ".tmp-" in p.name] == []
