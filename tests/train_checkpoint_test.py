"""Checkpoints travel between meshes: saved on 8 devices, restored on 1, and back."""
import jax
import numpy as np
import pytest

from mtl import sharding as shd
from mtl.checkpoint import CheckpointMismatchError, CheckpointStore
from mtl.nn import heads
from mtl.nn.encoders import build_encoder
from mtl.nn.multitask import MultiTaskModel
from mtl.tasks import Task
from mtl.train.optimizer import make_optimizer
from mtl.train.step import Steps

TASKS = [Task("a", heads.Classification(3)), Task("b", heads.Regression(1))]


def make_steps(devices, axes, hidden=(32, 16)):
    def factory(rngs):
        return MultiTaskModel(build_encoder("mlp", (8,), rngs=rngs, hidden=hidden), TASKS, rngs=rngs)
    return Steps(factory, TASKS, make_optimizer("adamw", 1e-2, 10), shd.make_mesh(axes, devices))


def batch(seed=0, n=16):
    r = np.random.default_rng(seed)
    return {"inputs": r.normal(size=(n, 8)).astype(np.float32),
            "labels": {"a": r.integers(0, 3, n).astype(np.int32), "b": r.normal(size=(n, 1)).astype(np.float32)},
            "masks": {"a": np.ones(n, bool), "b": np.ones(n, bool)}}


@pytest.mark.parametrize("src,dst", [("eight", "one"), ("one", "eight")])
def test_restore_across_device_counts(tmp_path, src, dst):
    layouts = {"eight": (jax.devices(), {"data": 2, "fsdp": 4}), "one": (jax.devices()[:1], {"data": 1})}
    s_src = make_steps(*layouts[src])
    state = s_src.init()
    for i in range(2):
        state, _ = s_src.step(state, s_src.put_batch(batch(i)))
    store = CheckpointStore(str(tmp_path / "ck"))
    store.save(2, state, {"note": "x"})
    store.close()
    want = jax.device_get(state)

    s_dst = make_steps(*layouts[dst])
    store = CheckpointStore(str(tmp_path / "ck"))
    restored, meta = store.restore(2, s_dst.abstract_state)
    assert meta == {"note": "x"}
    n_dev = len(layouts[dst][0])
    for leaf in jax.tree.leaves(restored.params):
        assert len(leaf.sharding.device_set) == n_dev
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(jax.device_get(restored))):
        np.testing.assert_array_equal(a, b)
    # training continues identically on the new mesh
    s_next, m1 = s_dst.step(restored, s_dst.put_batch(batch(5)))
    _, m2 = s_src.step(state, s_src.put_batch(batch(5)))
    np.testing.assert_allclose(np.asarray(m1["losses"]), np.asarray(m2["losses"]), rtol=1e-5)


def test_restore_into_other_model_names_first_mismatch(tmp_path):
    s = make_steps(jax.devices()[:1], {"data": 1})
    store = CheckpointStore(str(tmp_path / "ck"))
    store.save(1, s.init())
    store.close()
    other = make_steps(jax.devices()[:1], {"data": 1}, hidden=(32, 24))
    store = CheckpointStore(str(tmp_path / "ck"))
    with pytest.raises(CheckpointMismatchError, match=r"encoder/layers/1/bias.*\(16,\).*\(24,\)"):
        store.restore(1, other.abstract_state)
