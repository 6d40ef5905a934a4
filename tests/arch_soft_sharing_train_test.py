"""Cross-stitch, MTAN, DSelect-k and LTB through the trainer (``mtl.train.step.Steps``):
built from config by ``model_factory``, the loss falls; LTB's schedule advances in the
state; the 8-device sharded step equals the single-device step."""
import jax
import numpy as np
import pytest

from mtl import sharding as shd
from mtl.nn import heads
from mtl.nn.build import model_factory
from mtl.tasks import Task
from mtl.train.optimizer import make_optimizer
from mtl.train.step import Steps

TASKS = [Task("cls", heads.Classification(3)), Task("reg", heads.Regression(1))]


def cfg(arch, encoder, **kw):
    return {"arch": arch, "encoder": encoder, "encoder_kwargs": kw.pop("encoder_kwargs", {}),
            "arch_kwargs": kw.pop("arch_kwargs", {})}


VIT = dict(patch=4, dim=8, depth=2, num_heads=2)
CASES = {
    "cross_stitch_cnn": (cfg("cross_stitch", "cnn", encoder_kwargs=dict(widths=(4, 8), groups=2)), (8, 8, 1)),
    "mtan_cnn": (cfg("mtan", "cnn", encoder_kwargs=dict(widths=(4, 8), groups=2)), (8, 8, 1)),
    "cross_stitch_vit": (cfg("cross_stitch", "vit", encoder_kwargs=VIT), (8, 8, 1)),
    "mtan_vit": (cfg("mtan", "vit", encoder_kwargs=VIT), (8, 8, 1)),
    "dselect_k_mlp": (cfg("dselect_k", "none", arch_kwargs=dict(num_experts=4, num_nonzeros=2, expert_dim=8,
                                                                 entropy_weight=0.01)), (6,)),
    "ltb_mlp": (cfg("ltb", "mlp", encoder_kwargs=dict(hidden=(8, 8)), arch_kwargs=dict(warmup_steps=2)), (6,)),
}


def batch(rng, n, shape):
    x = rng.normal(size=(n,) + shape).astype(np.float32)
    s = x.reshape(n, -1).sum(1)
    return {"inputs": x,
            "labels": {"cls": np.digitize(s, [-1.0, 1.0]).astype(np.int32), "reg": (s[:, None] / 3).astype(np.float32)},
            "masks": {"cls": np.ones(n, bool), "reg": np.ones(n, bool)}}


def run(model_cfg, shape, axes, devices, batches, opt):
    steps = Steps(model_factory(model_cfg, TASKS, shape), TASKS, opt, shd.make_mesh(axes, devices))
    state = steps.init()
    losses = []
    for b in batches:
        state, m = steps.step(state, steps.put_batch(b))
        losses.append(np.asarray(m["losses"]))
    return steps, state, np.stack(losses)


SLOW = pytest.mark.slow   # CNN columns / MoE compile for minutes on 2 shared cores


@pytest.mark.parametrize("case", [pytest.param(c, marks=SLOW) if c != "ltb_mlp" else c for c in sorted(CASES)])
def test_trains_through_steps(case):
    model_cfg, shape = CASES[case]
    rng = np.random.default_rng(0)
    b = batch(rng, 32, shape)
    steps, state, losses = run(model_cfg, shape, {"data": 1}, jax.devices()[:1], [b] * 25,
                               make_optimizer("adam", 1e-2, 25, schedule="constant"))
    assert np.all(np.isfinite(losses))
    assert losses[-1].sum() < 0.7 * losses[0].sum(), losses[[0, -1]]
    model = steps.model(state.params, state.rest)
    preds = model(b["inputs"])
    assert preds["cls"].shape == (32, 3) and preds["reg"].shape == (32, 1)
    if case.startswith("ltb"):
        assert int(model.architecture.step[...]) == 25        # one training forward per step


@pytest.mark.parametrize("case,axes", [pytest.param("cross_stitch_cnn", {"data": 4, "fsdp": 2}, marks=SLOW),
                                       ("ltb_mlp", {"data": 2, "fsdp": 4}),
                                       pytest.param("dselect_k_mlp", {"data": 2, "fsdp": 2, "expert": 2}, marks=SLOW)])
def test_sharded_step_equals_single_device(case, axes):
    model_cfg, shape = CASES[case]
    rng = np.random.default_rng(1)
    batches = [batch(rng, 32, shape) for _ in range(4)]
    opt = lambda: make_optimizer("sgd", 0.05, 10, schedule="constant")  # noqa: E731
    _, s1, l1 = run(model_cfg, shape, {"data": 1}, jax.devices()[:1], batches, opt())
    _, s8, l8 = run(model_cfg, shape, axes, jax.devices(), batches, opt())
    assert len({d for x in jax.tree.leaves(s8.params) for d in x.sharding.device_set}) == 8
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.device_get(s1.params)), jax.tree.leaves(jax.device_get(s8.params))):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
