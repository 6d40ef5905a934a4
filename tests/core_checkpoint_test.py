"""Tree comparison, artifact export/load and mismatch errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import artifact
from mtl import checkpoint as ckpt
from mtl.checkpoint import CheckpointMismatchError
from mtl.nn.encoders import build_encoder
from mtl.nn.heads import Classification, Regression
from mtl.nn.multitask import MultiTaskModel
from mtl.tasks import Task

EXPECTED = {"enc/w": ((2, 3), "float32"), "enc/b": ((3,), "float32"), "head/w": ((3, 4), "float32")}


def test_compare_trees_equal_is_silent():
    ckpt.compare_trees(EXPECTED, dict(EXPECTED))


@pytest.mark.parametrize("found,path,parts", [
    ({k: v for k, v in EXPECTED.items() if k != "enc/w"}, "enc/w", ["(2, 3)", "missing"]),
    ({**EXPECTED, "enc/extra": ((5,), "float32")}, "enc/extra", ["(5,)", "does not have"]),
    ({**EXPECTED, "head/w": ((4, 3), "float32")}, "head/w", ["(4, 3)", "(3, 4)"]),
    ({**EXPECTED, "enc/b": ((3,), "bfloat16")}, "enc/b", ["bfloat16", "float32"]),
])
def test_compare_trees_names_path_and_shapes(found, path, parts):
    with pytest.raises(CheckpointMismatchError) as e:
        ckpt.compare_trees(EXPECTED, found, what="artifact X")
    msg = str(e.value)
    assert repr(path) in msg and "artifact X" in msg
    for p in parts:
        assert p in msg


def test_compare_trees_reports_the_first_path_in_sorted_order():
    found = {**EXPECTED, "head/w": ((1,), "float32"), "enc/b": ((9,), "float32")}
    with pytest.raises(CheckpointMismatchError, match="'enc/b'"):
        ckpt.compare_trees(EXPECTED, found)


def test_flat_shapes_paths():
    tree = {"a": {"b": np.zeros((2, 3), np.float32), "c": [np.zeros(4, np.int32)]}, "d": None}
    assert ckpt.flat_shapes(tree) == {"a/b": ((2, 3), "float32"), "a/c/0": ((4,), "int32")}


def _params():
    rng = np.random.default_rng(0)
    return {"enc": {"w": rng.normal(size=(2, 3)).astype(np.float32), "b": np.zeros(3, np.float32)},
            "head": {"w": rng.normal(size=(3, 4)).astype(np.float32)}}


def test_export_and_load_params_roundtrip(tmp_path):
    p = _params()
    path = ckpt.export_artifact(str(tmp_path / "a.mtl"), p, {"note": "hi"})
    meta = ckpt.read_artifact_metadata(path)
    assert meta["format"] == ckpt.ARTIFACT_FORMAT and meta["note"] == "hi"
    assert meta["params"]["enc/w"] == {"shape": [2, 3], "dtype": "float32"}
    got, meta2 = ckpt.load_artifact_params(path, expected=p)
    np.testing.assert_array_equal(np.asarray(got["enc"]["w"]), p["enc"]["w"])
    np.testing.assert_array_equal(np.asarray(got["head"]["w"]), p["head"]["w"])
    got, _ = ckpt.load_artifact_params(path)
    np.testing.assert_array_equal(np.asarray(got["enc"]["b"]), p["enc"]["b"])


@pytest.mark.parametrize("change,path,parts", [
    (lambda e: e["enc"].pop("w"), "enc/w", ["(2, 3)"]),                              # artifact has more
    (lambda e: e["enc"].update(x=np.zeros(2, np.float32)), "enc/x", ["(2,)"]),      # model has more
    (lambda e: e["head"].update(w=np.zeros((3, 5), np.float32)), "head/w", ["(3, 4)", "(3, 5)"]),
    (lambda e: e["enc"].update(b=np.zeros(3, np.int32)), "enc/b", ["int32", "float32"]),
])
def test_load_artifact_params_mismatch(tmp_path, change, path, parts):
    ckpt.export_artifact(str(tmp_path / "a"), _params(), {})
    expected = _params()
    change(expected)
    with pytest.raises(CheckpointMismatchError) as e:
        ckpt.load_artifact_params(str(tmp_path / "a"), expected=expected)
    msg = str(e.value)
    assert repr(path) in msg
    for p in parts:
        assert p in msg


def test_export_refuses_to_overwrite(tmp_path):
    target = tmp_path / "a"
    ckpt.export_artifact(str(target), _params(), {"v": 1})
    before = sorted((str(p.relative_to(target)), p.stat().st_mtime_ns) for p in target.rglob("*"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ckpt.export_artifact(str(target), _params(), {"v": 2})
    assert sorted((str(p.relative_to(target)), p.stat().st_mtime_ns) for p in target.rglob("*")) == before
    assert ckpt.read_artifact_metadata(str(target))["v"] == 1
    ckpt.export_artifact(str(target), _params(), {"v": 2}, overwrite=True)
    assert ckpt.read_artifact_metadata(str(target))["v"] == 2


def test_corrupt_or_missing_metadata(tmp_path):
    target = tmp_path / "a"
    ckpt.export_artifact(str(target), _params(), {})
    mfile = target / "metadata.json"
    mfile.write_text('{"format": "mtl-artifact/1", "params": {')
    with pytest.raises(ValueError, match="corrupt") as e:
        ckpt.load_artifact_params(str(target))
    assert "metadata.json" in str(e.value)
    mfile.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="unknown artifact format"):
        ckpt.read_artifact_metadata(str(target))
    os.remove(mfile)
    with pytest.raises(FileNotFoundError, match="no metadata.json"):
        ckpt.read_artifact_metadata(str(target))


def _model(seed, hidden=(6,)):
    """A MultiTaskModel with random values everywhere (abstract build + fill: no eager init)."""
    tasks = [Task("c", Classification(out=3)), Task("r", Regression(out=2, hidden=(4,)))]
    with nnx.use_eager_sharding(False):
        graph, state = nnx.split(nnx.eval_shape(lambda: MultiTaskModel(
            build_encoder("mlp", (5,), rngs=nnx.Rngs(0), hidden=hidden), tasks, rngs=nnx.Rngs(1))))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32)), state)
    return nnx.merge(graph, state)


def _outputs(model, x):
    graph, state = nnx.split(model)
    out = jax.jit(lambda s, x: nnx.merge(graph, s)(x))(state, x)
    return {k: np.asarray(v) for k, v in out.items()}


def _export_model(model, path):
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return ckpt.export_artifact(path, params, {"tasks": [t.to_json() for t in model.tasks]})


def test_artifact_load_params_into_fresh_model_gives_identical_outputs(tmp_path):
    src, dst = _model(1), _model(2)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 5)).astype(np.float32))
    want = _outputs(src, x)
    assert not np.allclose(_outputs(dst, x)["c"], want["c"])
    path = _export_model(src, str(tmp_path / "m.mtl"))
    meta = artifact.load_params(dst, path)
    assert [t["name"] for t in meta["tasks"]] == ["c", "r"]
    got = _outputs(dst, x)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # and the tasks round-trip through JSON
    ts = artifact.tasks_from_json(meta["tasks"])
    assert [t.name for t in ts] == ["c", "r"] and ts[1].head == Regression(out=2, hidden=(4,))


def test_artifact_into_model_with_other_width_names_path(tmp_path):
    path = _export_model(_model(1, hidden=(6,)), str(tmp_path / "m.mtl"))
    other = _model(2, hidden=(7,))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(other, nnx.Param)))
    with pytest.raises(CheckpointMismatchError) as e:
        artifact.load_params(other, path)
    msg = str(e.value)
    # first differing path in sorted order: encoder/layers/0/bias (6,) vs (7,)
    assert "'encoder/layers/0/bias'" in msg and "(6,)" in msg and "(7,)" in msg
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(other, nnx.Param)))
    jax.tree.map(np.testing.assert_array_equal, after, before)   # the model was left untouched
