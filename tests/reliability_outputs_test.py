"""What a run shows a person: curves.png, TensorBoard events, `mtl plot`; `mtl merge` with
each task's own metrics (issue 11, defect 8) and verified artifacts."""
import json
import os
import struct

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mtl import checkpoint as ckpt
from mtl.artifact import load_model
from mtl.cli import main
from mtl.nn.build import model_factory
from mtl.nn.heads import Regression
from mtl.tasks import Task
from mtl.train.loop import run
from tiny_runs import read_metrics, tiny_config

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG
    return struct.unpack(">II", head[16:24])


def test_curve_data_from_hand_written_records():
    from mtl.train.curves import curve_data

    recs = [{"step": 5, "split": "train", "losses": {"a": 2.0, "b": 1.0}, "weights": {"a": 1.0, "b": 1.0}},
            {"step": 10, "split": "train", "losses": {"a": 1.0, "b": 0.5}, "weights": {"a": 1.0, "b": 1.0}},
            {"step": 10, "split": "val", "metrics": {"a": {"loss": 1.5, "mse": 1.5}, "b": {"loss": None, "mae": 3.0}}},
            {"step": 10, "split": "diagnostics", "weights": {"a": 1.0, "b": 1.0}}]
    d = curve_data(recs)
    assert d["a"]["loss"]["train"] == ([5, 10], [2.0, 1.0])
    assert d["a"]["loss"]["val"] == ([10], [1.5]) and d["a"]["mse"]["val"] == ([10], [1.5])
    assert np.isnan(d["b"]["loss"]["val"][1][0]) and d["b"]["mae"]["val"] == ([10], [3.0])
    assert "weight" not in d["a"]                       # constant weights: no panel
    recs.append({"step": 15, "split": "train", "losses": {"a": 0.5, "b": 0.2}, "weights": {"a": 1.5, "b": 0.5}})
    assert curve_data(recs)["b"]["weight"]["weight"] == ([5, 10, 15], [1.0, 1.0, 0.5])


def read_events(logdir):
    """{tag: [(step, value)]} parsed from the TFRecord event files with the protobuf classes
    (independent of the writer's own API), applying TensorBoard's purge rule: a SessionLog
    START at step s drops the events read so far with step >= s."""
    from tensorboardX.proto import event_pb2

    out = {}
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            buf = f.read()
        i = 0
        while i < len(buf):
            (n,) = struct.unpack("<Q", buf[i:i + 8])
            ev = event_pb2.Event.FromString(buf[i + 12:i + 12 + n])
            i += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
                out = {k: [(s, x) for s, x in vs if s < ev.step] for k, vs in out.items()}
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_run_writes_curves_and_tensorboard_events_matching_metrics(tmp_path):
    wd = str(tmp_path / "run")
    run(tiny_config(steps=20, optim={"aggregator": "dwa"}), wd)
    w, h = png_size(os.path.join(wd, "curves.png"))
    assert w > 400 and h > 300
    pytest.importorskip("tensorboardX")
    ev = read_events(os.path.join(wd, "tensorboard"))
    train = [r for r in read_metrics(wd) if r["split"] == "train"]
    val = [r for r in read_metrics(wd) if r["split"] == "val"]
    assert ev["train/loss/t0"] == [(r["step"], pytest.approx(r["losses"]["t0"], rel=1e-6)) for r in train]
    assert ev["val/mse/t1"] == [(r["step"], pytest.approx(r["metrics"]["t1"]["mse"], rel=1e-6)) for r in val]
    assert [s for s, _ in ev["weight/t0"]] == [r["step"] for r in train]


def test_resumed_run_purges_events_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboardX")
    wd = str(tmp_path / "run")
    run(tiny_config(steps=30), wd, _stop_after=25)   # logs 5..25, checkpoint 20
    run(tiny_config(steps=30), wd)
    steps = [s for s, _ in read_events(os.path.join(wd, "tensorboard"))["train/loss"]]
    assert steps == [5, 10, 15, 20, 25, 30]          # 25 (and 20) logged twice, the first purged


def test_mtl_plot_overlays_runs(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(tiny_config(steps=10, curves=False), a)
    run(tiny_config(steps=10, curves=False), b)
    assert not os.path.exists(os.path.join(a, "curves.png"))   # train.curves=False
    out = str(tmp_path / "both.png")
    assert main(["plot", "--workdir", a, b, "--out", out]) == 0
    assert png_size(out)[0] > 400 and f"wrote {out}" in capsys.readouterr().out
    assert main(["plot", "--workdir", str(tmp_path / "nope")]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err


# ----------------------------------------------------------------- mtl merge, defect 8

TASKS = ["a", "b"]


def regression_artifacts(root):
    rng = np.random.default_rng(0)
    tasks = [Task(t, Regression(1)) for t in TASKS]
    model_cfg = {"arch": "shared", "encoder": "mlp", "encoder_kwargs": {"hidden": [8]}}
    with nnx.use_eager_sharding(False):
        model = model_factory(ml_collections.ConfigDict(model_cfg), tasks, (4,))(nnx.Rngs(0))
    pre = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    meta = {"config": {"model": model_cfg}, "tasks": [t.to_json() for t in tasks], "input_shape": [4]}
    ckpt.export_artifact(os.path.join(root, "pre.mtl"), pre, meta)
    for t in TASKS:
        ft = jax.tree.map(lambda v: v + rng.normal(size=v.shape).astype(np.float32) * 0.3, pre)
        ckpt.export_artifact(os.path.join(root, f"ft_{t}.mtl"), ft, meta)
    data = {}
    for t in TASKS:
        for s in ("train", "test"):
            data[f"{t}/{s}/x"] = rng.normal(size=(30, 4)).astype(np.float32)
            data[f"{t}/{s}/y"] = rng.normal(size=(30, 1)).astype(np.float32)
    np.savez(os.path.join(root, "data.npz"), **data)
    cfg = os.path.join(root, "merge.py")
    with open(cfg, "w") as f:
        f.write(f"""
from mtl.merging.config import base_merge_config
def get_config(arg=None):
    c = base_merge_config()
    c.pretrained = {os.path.join(root, 'pre.mtl')!r}
    c.finetuned = {{t: {root!r} + f"/ft_{{t}}.mtl" for t in {TASKS!r}}}
    c.method = "average"
    c.data.name = "npz"
    c.data.kwargs = {{"path": {os.path.join(root, 'data.npz')!r}}}
    return c
""")
    return cfg, data


def test_merge_of_regression_finetunes_reports_mse_not_accuracy(tmp_path):
    cfg, data = regression_artifacts(str(tmp_path))
    wd = str(tmp_path / "m")
    assert main(["merge", "--config", cfg, "--workdir", wd]) == 0
    res = json.load(open(os.path.join(wd, "results.json")))
    assert res["accuracy"] == {} and res["avg_accuracy"] is None
    model, _ = load_model(os.path.join(wd, "merged.mtl"))
    for t in TASKS:
        pred = np.asarray(model(data[f"{t}/test/x"])[t], np.float64)
        y = data[f"{t}/test/y"].astype(np.float64)
        assert res["metrics"][t]["mse"] == pytest.approx(np.mean((pred - y) ** 2), rel=1e-5)
        assert res["metrics"][t]["mae"] == pytest.approx(np.mean(np.abs(pred - y)), rel=1e-5)
        assert "accuracy" not in res["metrics"][t]
    assert "| average | a | mse |" in open(os.path.join(wd, "results.md")).read()


def test_info_and_merge_verify_artifact_digests(tmp_path, capsys):
    cfg, _ = regression_artifacts(str(tmp_path))
    ft = os.path.join(str(tmp_path), "ft_b.mtl")
    assert main(["info", ft]) == 0
    n = len(ckpt.read_artifact_metadata(ft)["digests"]["files"])
    assert json.loads(capsys.readouterr().out)["verified"] == f"{n} files of params/ match their sha256 digests"
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ft, "params")) for f in fs
                  if os.path.basename(d) == "d"]
    victim = max(data_files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        b = bytearray(f.read())
        b[len(b) // 2] ^= 0xFF
        f.seek(0)
        f.write(b)
    rel = os.path.relpath(victim, os.path.join(ft, "params"))
    assert main(["info", ft]) == 1
    assert f"file {rel} does not match its sha256 digest" in capsys.readouterr().err
    assert main(["merge", "--config", cfg, "--workdir", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "ft_b.mtl" in err and f"file {rel}" in err


def test_without_tensorboardx_one_line_note_and_no_events(tmp_path, monkeypatch):
    import sys

    from mtl.train.events import MISSING_NOTE, EventWriter

    monkeypatch.setitem(sys.modules, "tensorboardX", None)   # import tensorboardX -> ImportError
    said = []
    w = EventWriter(str(tmp_path), log=said.append)
    w.scalars(1, {"x": 1.0})
    w.close()
    assert said == [MISSING_NOTE] and not w.enabled and not (tmp_path / "tensorboard").exists()
