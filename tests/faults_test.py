"""Fault injection: kills, damaged checkpoints, refused configs and full disks never cost a
run more than the steps since its last good checkpoint, and never change its result.

Every case ends by checking against an uninterrupted reference run: the resumed run's
test metrics and metrics.jsonl equal the reference exactly. The terminal summary lists
each fault, its expected outcome and how many cases were tried.
"""
import collections
import errno
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mtl import integrity
from mtl.checkpoint import CheckpointStore
from mtl.train import loop
from mtl.train.loop import run
from tiny_runs import read_metrics, tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = 40
EXPECTED = {
    "SIGKILL at a random step": "rerun resumes from the last checkpoint; result equals the uninterrupted run",
    "SIGKILL during a checkpoint save": "workdir restorable; the half-written step is never listed; result equal",
    "damaged file in the newest step": "newest step fails verification, is moved aside; falls back to the "
                                       "previous step; result equal",
    "refused command": "every file of the workdir has the same sha256 before and after",
    "full disk (failing write)": "the command fails; the last good checkpoint still verifies; rerun equal",
}
TRIED = collections.Counter()


class _Summary:
    def pytest_terminal_summary(self, terminalreporter):
        if not TRIED:
            return
        terminalreporter.section("fault injection")
        for fault, expected in EXPECTED.items():
            terminalreporter.write_line(f"{fault:34s} cases {TRIED[fault]:2d} | expected: {expected}")


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    plugin = _Summary()
    if not request.config.pluginmanager.has_plugin("mtl-faults-summary"):
        request.config.pluginmanager.register(plugin, "mtl-faults-summary")
    yield


def digests(root):
    return {k: v["sha256"] for k, v in integrity.digest_files(root, skip=()).items()}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """(results, workdir) of an uninterrupted run, and a run stopped after step 30 (ckpts 20, 30)."""
    root = tmp_path_factory.mktemp("faults")
    full, part = str(root / "full"), str(root / "part")
    res = run(tiny_config(steps=STEPS), full)
    run(tiny_config(steps=STEPS), part, _stop_after=30)
    return res, full, part


def assert_equal_to_reference(ref, wd, res=None):
    res = res if res is not None else run(tiny_config(steps=STEPS), wd)
    assert res["test"] == ref[0]["test"] and res["val"] == ref[0]["val"]
    assert read_metrics(wd) == read_metrics(ref[1])


def killed_run(wd, patch: str):
    """Run the tiny config in a child process that SIGKILLs itself where ``patch`` says."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {HERE!r})
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
        import jax
        jax.config.update("jax_num_cpu_devices", 8)
        from tiny_runs import tiny_config
        from mtl.train import loop
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
        """) + textwrap.dedent(patch) + textwrap.dedent(f"""
        loop.run(tiny_config(steps={STEPS}), {wd!r})
        """)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, f"the child was not killed (rc {p.returncode}):\n{p.stderr[-2000:]}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_step_then_resume_equals_uninterrupted(ref, tmp_path, seed):
    kill_at = int(np.random.default_rng(seed).integers(2, STEPS))
    wd = str(tmp_path / "run")
    killed_run(wd, f"""
        orig = loop.Steps.step
        def step(self, state, batch, diagnostics=False, **kw):
            if int(state.step) == {kill_at}:
                die()
            return orig(self, state, batch, diagnostics=diagnostics, **kw)
        loop.Steps.step = step
        """)
    latest = CheckpointStore(os.path.join(wd, "checkpoints")).latest_step() or 0
    assert latest in (kill_at // 10 * 10, kill_at // 10 * 10 - 10)  # (a save just begun may be lost)
    assert_equal_to_reference(ref, wd)
    TRIED["SIGKILL at a random step"] += 1


@pytest.mark.parametrize("where", ["while orbax writes step 20", "after the commit, before its digests"])
def test_sigkill_during_checkpoint_save_leaves_restorable_workdir(ref, tmp_path, where):
    wd = str(tmp_path / "run")
    if where.startswith("while"):
        patch = """
            from mtl import checkpoint
            orig = checkpoint.CheckpointStore.save
            def save(self, step, state, meta=None, force=True):
                orig(self, step, state, meta, force)
                if step == 20 and self.directory.endswith("checkpoints"):
                    die()           # the async write has only just started
            checkpoint.CheckpointStore.save = save
            """
    else:
        patch = """
            from mtl import checkpoint, integrity
            orig = integrity.write_manifest
            def write_manifest(root):
                if root.endswith(os.sep + "20"):
                    die()
                return orig(root)
            integrity.write_manifest = write_manifest
            """
    killed_run(wd, patch)
    store = CheckpointStore(os.path.join(wd, "checkpoints"))
    assert max(store.steps()) in (10, 20)
    store.close()
    assert_equal_to_reference(ref, wd)
    TRIED["SIGKILL during a checkpoint save"] += 1


def _damage(path, how):
    if how == "deleted":
        os.remove(path)
    elif how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:  # corrupted: same size, some bytes changed
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            i = len(data) // 2
            data[i] = (data[i] + 1) % 256
            f.seek(0)
            f.write(data)


def _step_files(step_dir):
    files = {}
    for d, _, fs in os.walk(step_dir):
        for f in fs:
            rel = os.path.relpath(os.path.join(d, f), step_dir)
            if rel != integrity.MANIFEST:
                files[rel] = os.path.getsize(os.path.join(d, f))
    data = max((r for r in files if "/d/" in r), key=files.get)
    return {"array data": data, "meta JSON": "meta/metadata", "tree metadata": "state/_METADATA"}


@pytest.mark.parametrize("how", ["corrupted", "truncated", "deleted"])
def test_damaged_newest_step_falls_back_to_previous(ref, tmp_path, capsys, how):
    names = _step_files(os.path.join(ref[2], "checkpoints", "30"))
    for label, rel in names.items():
        wd = str(tmp_path / label.replace(" ", "_"))
        shutil.copytree(ref[2], wd)
        _damage(os.path.join(wd, "checkpoints", "30", rel), how)
        res = run(tiny_config(steps=STEPS), wd)
        log = capsys.readouterr().out
        assert f"step 30: file {rel}" in log and "fell back to checkpoint step 20" in log, log
        assert os.path.isdir(os.path.join(wd, "checkpoints.corrupt", "30"))
        assert_equal_to_reference(ref, wd, res)
        TRIED["damaged file in the newest step"] += 1


def _bad_configs():
    c = tiny_config(steps=STEPS, batch_size=100000)
    yield "batch larger than the data", c, {}
    c = tiny_config(steps=STEPS, batch_size=60)
    c.mesh.data = 8
    yield "batch not divisible by the mesh", c, {}
    c = tiny_config(steps=STEPS)
    c.optimizer.lr = -1e-3
    yield "negative learning rate", c, {}
    yield "another config, no flag", tiny_config(steps=STEPS + 10), {}
    c = tiny_config(steps=STEPS)
    c.model.encoder_kwargs = dict(hidden=(64, 64))
    yield "--resume with another model", c, {"resume": True}
    c = tiny_config(steps=STEPS)
    c.data.tasks = ("t7",)
    yield "unknown task", c, {}


def test_refused_commands_change_no_file(ref, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(ref[2], wd)
    before = digests(wd)
    n = 0
    for what, cfg, kw in _bad_configs():
        with pytest.raises((ValueError, KeyError, RuntimeError)):
            run(cfg, wd, **kw)
        assert digests(wd) == before, what
        n += 1
    TRIED["refused command"] += n
    assert_equal_to_reference(ref, wd)


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["checkpoint data", "digest manifest", "metrics.jsonl"])
def test_full_disk_keeps_last_good_checkpoint(ref, tmp_path, monkeypatch, where):
    wd = str(tmp_path / "run")
    shutil.copytree(ref[2], wd)
    good = digests(os.path.join(wd, "checkpoints", "30"))
    with monkeypatch.context() as m:
        if where == "checkpoint data":
            from mtl import checkpoint
            orig = checkpoint.ocp.CheckpointManager.save

            def save(self, step, *a, **k):
                if step == 40:
                    _enospc()
                return orig(self, step, *a, **k)
            m.setattr(checkpoint.ocp.CheckpointManager, "save", save)
        elif where == "digest manifest":
            m.setattr(integrity, "write_manifest", _enospc)
        else:
            orig_write = loop._Outputs.write

            def write(self, rec):
                if rec.get("step", 0) >= 35:
                    _enospc()
                return orig_write(self, rec)
            m.setattr(loop._Outputs, "write", write)
        with pytest.raises(OSError, match="No space left"):
            run(tiny_config(steps=STEPS), wd)
    assert digests(os.path.join(wd, "checkpoints", "30")) == good
    store = CheckpointStore(os.path.join(wd, "checkpoints"))
    assert store.verify(30) > 0
    store.close()
    assert_equal_to_reference(ref, wd)
    TRIED["full disk (failing write)"] += 1
