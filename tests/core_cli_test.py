"""The ``mtl`` command, mostly in-process (``mtl.cli.main``); one real subprocess."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from mtl.cli import main

TINY = textwrap.dedent("""
    from mtl.config import base_config

    def get_config(arg=None):
        c = base_config()
        c.name = "tiny"
        c.data.name = "multitab"
        c.data.kwargs = dict(num_tasks=2, n_train=200, n_test=64, dim=8, seed=0)
        c.model.encoder = "mlp"
        c.model.encoder_kwargs = dict(hidden=(16,))
        c.train.steps = 20
        c.train.batch_size = 16
        c.train.eval_batch_size = 64
        c.train.log_every = 10
        c.train.eval_every = 10
        c.train.checkpoint_every = 10
        c.baselines.train = False
        return c
""")


def _snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run (20 steps, 2 regression tasks) shared by the tests below."""
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "tiny.py"
    cfg.write_text(TINY)
    workdir = root / "run"
    rc = main(["train", "--config", str(cfg), "--workdir", str(workdir)])
    assert rc == 0
    return cfg, workdir


def test_unknown_override_key_exit_1_with_suggestion(tmp_path, capsys):
    cfg = tmp_path / "tiny.py"
    cfg.write_text(TINY)
    rc = main(["train", "--config", str(cfg), "--workdir", str(tmp_path / "w"), "--config.train.stepz=3"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "train.stepz" in err and "Did you mean 'train.steps'?" in err
    assert not (tmp_path / "w").exists()


def test_overrides_only_for_train(tmp_path, capsys):
    rc = main(["eval", "--workdir", str(tmp_path), "--config.train.steps=3"])
    assert rc == 2 and "only apply to `mtl train`" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    rc = main(["train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w")])
    assert rc == 1 and "nope.py" in capsys.readouterr().err


def test_config_file_without_get_config_exit_1(tmp_path, capsys):
    cfg = tmp_path / "bad.py"
    cfg.write_text("x = 1\n")
    rc = main(["train", "--config", str(cfg), "--workdir", str(tmp_path / "w")])
    assert rc == 1 and "get_config" in capsys.readouterr().err


def test_run_wrote_its_files(trained):
    _, workdir = trained
    for f in ("config.json", "metrics.jsonl", "results.json"):
        assert (workdir / f).is_file(), f
    cfg = json.loads((workdir / "config.json").read_text())
    assert cfg["train"]["steps"] == 20 and cfg["name"] == "tiny"
    res = json.loads((workdir / "results.json").read_text())
    assert [t["name"] for t in res["tasks"]] == ["t0", "t1"]
    assert set(res["test"]["t0"]) >= {"loss", "mse", "mae"}


def test_workdir_with_other_config_is_refused_and_untouched(trained, capsys):
    cfg, workdir = trained
    before = _snapshot(workdir)
    assert before
    capsys.readouterr()
    rc = main(["train", "--config", str(cfg), "--workdir", str(workdir), "--config.optimizer.lr=0.01"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "holds another run" in err and "optimizer.lr" in err and "--overwrite" in err and "--resume" in err
    assert _snapshot(workdir) == before


def test_export_info_and_load(trained, tmp_path, capsys):
    from mtl import artifact

    _, workdir = trained
    out = tmp_path / "tiny.mtl"
    assert main(["export", "--workdir", str(workdir), "--out", str(out)]) == 0
    before = _snapshot(out)
    assert main(["export", "--workdir", str(workdir), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "params" not in info and [t["name"] for t in info["tasks"]] == ["t0", "t1"]
    assert info["input_shape"] == [8] and info["config"]["train"]["steps"] == 20
    model, meta = artifact.load_model(str(out))
    preds = model(jnp.zeros((3, 8)))
    assert preds["t0"].shape == (3, 1) and np.all(np.isfinite(np.asarray(preds["t1"])))


def test_eval_reproduces_the_stored_test_metrics(trained, capsys):
    _, workdir = trained
    res = json.loads((workdir / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--workdir", str(workdir)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["step"] == res["selected_step"] and got["split"] == "test"
    for t in ("t0", "t1"):
        for k, v in res["test"][t].items():
            np.testing.assert_allclose(got["metrics"][t][k], v, rtol=1e-5, err_msg=f"{t}/{k}")


def test_console_script_unknown_key(tmp_path):
    """The installed ``mtl`` script: exit status 1 and the suggestion on stderr."""
    cfg = tmp_path / "tiny.py"
    cfg.write_text(TINY)
    exe = shutil.which("mtl") or os.path.join(os.path.dirname(sys.executable), "mtl")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([exe, "train", "--config", f"{cfg}:x", "--workdir", str(tmp_path / "w"),
                        "--config.optimizer.lrr=0.1"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1, p.stderr
    assert "Did you mean 'optimizer.lr'?" in p.stderr
    assert not (tmp_path / "w").exists()
