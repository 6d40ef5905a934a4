"""Multi-host: two real JAX processes (2 CPU devices each, coordinated over localhost)
train the same run as one process with 4 devices, and get the same results."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from mtl import distributed

CONFIG = """
from mtl.config import base_config
def get_config(arg=None):
    c = base_config()
    c.data.kwargs = dict(num_tasks=2, n_train=400, n_test=100, dim=8, correlation=0.5, seed=0)
    c.model.encoder_kwargs = dict(hidden=(16,))
    c.train.steps = 30
    c.train.batch_size = 32
    c.train.eval_batch_size = 64
    c.train.log_every = 10
    c.train.eval_every = 10
    c.train.checkpoint_every = 10
    c.mesh.data = 2
    c.mesh.fsdp = -1
    return c
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(CONFIG)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    base_env["JAX_PLATFORMS"] = "cpu"
    cmd = lambda wd: [sys.executable, "-m", "mtl.cli", "train", "--config", str(cfg), "--workdir", wd]
    multi = str(tmp_path / "multi")
    port = free_port()
    procs = []
    for pid in range(2):
        env = dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(cmd(multi), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    single = str(tmp_path / "single")
    subprocess.run(cmd(single), env=dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
                   check=True, capture_output=True, timeout=300)
    rm, rs = (json.load(open(os.path.join(d, "results.json"))) for d in (multi, single))
    for split in ("val", "test"):
        for task, metrics in rs[split].items():
            for k, v in metrics.items():
                np.testing.assert_allclose(rm[split][task][k], v, rtol=1e-5)
    assert rm["selected_step"] == rs["selected_step"]
    # one joint checkpoint per step, written by both processes together
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == sorted(os.listdir(os.path.join(single, "checkpoints")))


def test_initialize_reads_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr("jax.distributed.initialize", lambda **kw: calls.append(kw))
    assert distributed.initialize({})["mode"] == "single" and not calls
    with pytest.raises(RuntimeError, match="JAX_NUM_PROCESSES"):
        distributed.initialize({"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(RuntimeError, match=r"JAX_PROCESS_ID=3 must be in \[0, JAX_NUM_PROCESSES=2\)"):
        distributed.initialize({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "3"})
    distributed.initialize({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
                            "JAX_LOCAL_DEVICE_IDS": "0,1"})
    assert calls == [{"coordinator_address": "h:1", "num_processes": 2, "process_id": 1, "local_device_ids": [0, 1]}]
    assert distributed.initialize({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1"})["mode"] == "single"
    calls.clear()
    monkeypatch.setattr("jax.process_index", lambda: 0)
    monkeypatch.setattr("jax.process_count", lambda: 4)
    assert distributed.initialize({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4"})["mode"] == "slurm"
    assert calls == [{}]  # auto-detection: jax.distributed.initialize() without arguments
