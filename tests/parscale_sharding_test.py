"""ParScale on a mesh: streams are sharded with the batch; 8 simulated devices == 1 device
(loss of the forward pass and one train step through the unchanged trainer Steps)."""
import jax
import numpy as np
import ml_collections

from mtl import sharding as shd
from mtl.nn import heads
from mtl.nn.build import model_factory
from mtl.tasks import Task
from mtl.train.optimizer import make_optimizer
from mtl.train.step import Steps

TASKS = [Task("next_byte", heads.LanguageModel(256))]
L = 16


def steps_on(axes, devices):
    cfg = ml_collections.ConfigDict({
        "arch": "lm", "encoder": "byte_transformer",
        "encoder_kwargs": {"dim": 32, "depth": 2, "num_heads": 2},
        "parscale": {"P": 4, "prefix_len": 4}})
    factory = model_factory(cfg, TASKS, (L,))
    return Steps(factory, TASKS, make_optimizer("sgd", 0.1, 10, schedule="constant"),
                 shd.make_mesh(axes, devices))


def test_sharded_forward_and_step_equal_single_device():
    rng = np.random.default_rng(0)
    w = rng.integers(0, 256, (16, L + 1)).astype(np.int32)
    batch = {"inputs": w[:, :-1], "labels": {"next_byte": w[:, 1:]}, "masks": {"next_byte": np.ones(16, bool)}}
    out = {}
    for name, axes, devs in (("one", {"data": 1}, jax.devices()[:1]), ("eight", {"data": 8}, jax.devices())):
        steps = steps_on(axes, devs)
        state = steps.init()
        ev = steps.evaluate(state, [steps.put_batch(batch)])["next_byte"]
        state, m = steps.step(state, steps.put_batch(batch))
        out[name] = (ev, np.asarray(m["losses"]), jax.device_get(state.params))
        if name == "eight":
            # the replicated streams stay sharded over the batch: features of B·P rows on 8 devices
            with steps.activate():
                model = steps.model(state.params)
                hs = jax.jit(lambda x: model.stream_features(x))(steps.put_batch(batch)["inputs"])
            assert hs.shape == (16, 4, L, 32)
            assert len(hs.sharding.device_set) == 8 and not hs.sharding.is_fully_replicated
    (e1, l1, p1), (e8, l8, p8) = out["one"], out["eight"]
    for k in e1:
        np.testing.assert_allclose(e8[k], e1[k], rtol=1e-5)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
