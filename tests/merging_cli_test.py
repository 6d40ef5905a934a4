"""`mtl merge`: artifacts in, merged artifact / coefficients / results out; checked against numpy."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mtl import checkpoint as ckpt
from mtl.cli import main
from mtl.merging.tree import flatten
from mtl.nn.build import model_factory
from mtl.nn.heads import Classification
from mtl.tasks import Task

TASKS = ["a", "b"]
SHAPE = (4, 4, 1)


def make_artifacts(root, rng):
    tasks = [Task(t, Classification(3)) for t in TASKS]
    model_cfg = {"arch": "shared", "encoder": "mlp", "encoder_kwargs": {"hidden": [8]}}
    with nnx.use_eager_sharding(False):
        model = model_factory(ml_collections.ConfigDict(model_cfg), tasks, SHAPE)(nnx.Rngs(0))
    pre = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    meta = {"config": {"model": model_cfg}, "tasks": [t.to_json() for t in tasks], "input_shape": list(SHAPE)}
    ckpt.export_artifact(os.path.join(root, "pre.mtl"), pre, meta)
    fts = {}
    for t in TASKS:
        ft = jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(np.float32) * 0.5, pre)
        fts[t] = ft
        ckpt.export_artifact(os.path.join(root, f"ft_{t}.mtl"), ft, meta)
    data = {}
    for t in TASKS:
        for s in ("train", "test"):
            data[f"{t}/{s}/x"] = rng.normal(size=(40,) + SHAPE).astype(np.float32)
            data[f"{t}/{s}/y"] = rng.integers(0, 3, size=40).astype(np.int32)
    np.savez(os.path.join(root, "data.npz"), **data)
    return pre, fts, data


def write_config(root, method, extra=""):
    path = os.path.join(root, f"merge_{method}.py")
    with open(path, "w") as f:
        f.write(f"""
from mtl.merging.config import base_merge_config
def get_config(arg=None):
    c = base_merge_config()
    c.pretrained = {os.path.join(root, 'pre.mtl')!r}
    c.finetuned = {{t: {root!r} + f"/ft_{{t}}.mtl" for t in {TASKS!r}}}
    c.method = {method!r}
    c.data.name = "npz"
    c.data.kwargs = {{"path": {os.path.join(root, 'data.npz')!r}}}
{extra}
    return c
""")
    return path


def np_forward(flat, x, task):
    h = np.maximum(x.reshape(len(x), -1) @ flat["encoder/layers/0/kernel"] + flat["encoder/layers/0/bias"], 0)
    return h @ flat[f"heads/{task}/out/kernel"] + flat[f"heads/{task}/out/bias"]


def test_merge_task_arithmetic_matches_numpy(tmp_path, capsys):
    rng = np.random.default_rng(0)
    pre, fts, data = make_artifacts(str(tmp_path), rng)
    cfg = write_config(str(tmp_path), "task_arithmetic")
    wd = str(tmp_path / "ta")
    assert main(["merge", "--config", cfg, "--workdir", wd, "--config.kwargs.lam=0.5"]) == 0
    res = json.load(open(os.path.join(wd, "results.json")))
    fp, ff = flatten(pre), {t: flatten(fts[t]) for t in TASKS}
    merged = ckpt.load_artifact_params(os.path.join(wd, "merged.mtl"))[0]
    fm = flatten(merged)
    for t in TASKS:
        ref = {p: (ff[t][p] if p.startswith(f"heads/{t}/") else
                   fp[p] if p.startswith("heads/") else
                   fp[p] + 0.5 * sum(ff[k][p] - fp[p] for k in TASKS)) for p in fp}
        for p in fp:
            if not p.startswith("heads/") or p.startswith(f"heads/{t}/"):
                np.testing.assert_allclose(np.asarray(fm[p]), ref[p], rtol=1e-5, atol=1e-5)
        acc = np.mean(np.argmax(np_forward(ref, data[f"{t}/test/x"], t), -1) == data[f"{t}/test/y"])
        assert res["accuracy"][t] == pytest.approx(acc)
    assert "| task_arithmetic |" in open(os.path.join(wd, "results.md")).read()
    # an existing result is not overwritten without --overwrite
    assert main(["merge", "--config", cfg, "--workdir", wd]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_adamerging_coefficients_are_reusable(tmp_path):
    rng = np.random.default_rng(1)
    make_artifacts(str(tmp_path), rng)
    cfg = write_config(str(tmp_path), "adamerging", "    c.adaptive.steps = 5\n    c.adaptive.lr = 0.05\n"
                                                    "    c.adaptive.batch_size = 8")
    wd1, wd2 = str(tmp_path / "ada"), str(tmp_path / "reuse")
    assert main(["merge", "--config", cfg, "--workdir", wd1, "--config.adaptive.granularity=task"]) == 0
    coeffs = json.load(open(os.path.join(wd1, "coeffs.json")))
    assert len(coeffs["coeffs"]) == 2 and coeffs["meta"]["granularity"] == "task"
    assert coeffs["coeffs"] != [0.3, 0.3]
    assert main(["merge", "--config", cfg, "--workdir", wd2, "--config.adaptive.granularity=task",
                 f"--config.coeffs_from={os.path.join(wd1, 'coeffs.json')}"]) == 0
    a = flatten(ckpt.load_artifact_params(os.path.join(wd1, "merged.mtl"))[0])
    b = flatten(ckpt.load_artifact_params(os.path.join(wd2, "merged.mtl"))[0])
    for p in a:
        np.testing.assert_array_equal(np.asarray(a[p]), np.asarray(b[p]))
    r1, r2 = (json.load(open(os.path.join(w, "results.json"))) for w in (wd1, wd2))
    assert r1["accuracy"] == r2["accuracy"]


def test_mismatched_finetune_is_named(tmp_path, capsys):
    rng = np.random.default_rng(2)
    pre, fts, _ = make_artifacts(str(tmp_path), rng)
    bad = jax.tree.map(lambda a: a, fts["b"])
    bad["encoder"]["layers"][0]["kernel"] = np.zeros((16, 5), np.float32)
    meta = ckpt.read_artifact_metadata(os.path.join(str(tmp_path), "ft_b.mtl"))
    ckpt.export_artifact(os.path.join(str(tmp_path), "ft_b.mtl"), bad, meta, overwrite=True)
    cfg = write_config(str(tmp_path), "ties")
    assert main(["merge", "--config", cfg, "--workdir", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "encoder/layers/0/kernel" in err and "(16, 8)" in err and "(16, 5)" in err


def test_identical_finetune_warns(tmp_path):
    rng = np.random.default_rng(3)
    pre, fts, _ = make_artifacts(str(tmp_path), rng)
    meta = ckpt.read_artifact_metadata(os.path.join(str(tmp_path), "pre.mtl"))
    ckpt.export_artifact(os.path.join(str(tmp_path), "ft_a.mtl"), pre, meta, overwrite=True)
    cfg = write_config(str(tmp_path), "average")
    with pytest.warns(UserWarning, match="identical to the pretrained"):
        assert main(["merge", "--config", cfg, "--workdir", str(tmp_path / "y")]) == 0
