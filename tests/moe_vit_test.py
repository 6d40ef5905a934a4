"""M³ViT (task-routed sparse MoE ViT), single-task extraction, compiled FLOPs, TaskExpert,
routing diagnostics, config registration and bad-input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import sharding as shd
from mtl.nn.build import model_factory
from mtl.nn.heads import Classification, Regression
from mtl.nn.moe import (M3ViT, TaskExpertViT, domain_expert_mutual_information, domain_routing, expert_load,
                        extract_task_model, m3vit_flops, router_entropy, task_expert_share, used_experts)
from mtl.nn.moe.routing import MultiGateRouter
from mtl.tasks import Task

TASKS = [Task("a", Classification(3)), Task("b", Regression(2))]
SMALL = dict(patch=4, dim=16, depth=4, num_heads=2, num_experts=4, k=2, expert_hidden=8)


def build(seed=0, **kw):
    """Build abstractly, then fill every parameter with random numbers (no per-shape init
    compiles; the references below read whatever the parameters are)."""
    with nnx.use_eager_sharding(False):
        gd, st = nnx.split(nnx.eval_shape(lambda: M3ViT((8, 8, 1), TASKS, rngs=nnx.Rngs(0), **{**SMALL, **kw})))
    rng = np.random.default_rng(seed)
    st = jax.tree.map(lambda s: jnp.asarray((rng.normal(size=s.shape) * 0.5).astype(s.dtype)), st)
    return nnx.merge(gd, st)


def fwd(m, x):
    """The model's forward_with_aux, jitted (eager op-by-op dispatch is slow)."""
    gd, st = nnx.split(m)
    return jax.jit(lambda s, x: nnx.merge(gd, s).forward_with_aux(x))(st, x)


def images(b=4, seed=0):
    return np.random.default_rng(seed).random((b, 8, 8, 1)).astype(np.float32)


def np_lbl(probs, idx, e):
    probs, idx = np.asarray(probs).reshape(-1, e), np.asarray(idx).reshape(-1)
    f = np.bincount(idx, minlength=e) / idx.size
    return e * np.sum(f * probs.mean(0))


def test_every_other_block_is_moe_and_aux_loss_is_weighted_lbl():
    m = build(lbl_weight=0.1, capacity_factor=None)
    assert m.moe_layers == (1, 3)
    assert [b.moe is not None for b in m.blocks] == [False, True, False, True]
    x = images()
    out, aux = fwd(m, x)
    assert out["a"].shape == (4, 3) and out["b"].shape == (4, 2)
    lbls = [np_lbl(a["probs"], a["indices"], 4) for t in ("a", "b") for a in aux["routing"][t]]
    np.testing.assert_allclose(aux["loss"], 0.1 * np.mean(lbls), rtol=1e-5)
    # micro: one micro-batch per image
    m.lbl, m.lbl_weight = "micro", 1.0
    _, aux2 = fwd(m, x)
    per = [np.mean([np_lbl(a["probs"][i], a["indices"][i], 4) for i in range(4)])
           for t in ("a", "b") for a in aux2["routing"][t]]
    np.testing.assert_allclose(aux2["loss"], np.mean(per), rtol=1e-5)


def test_routing_is_per_task():
    """Swapping the two tasks' router rows swaps their routing decisions."""
    m = build(capacity_factor=None)
    x = images()
    _, aux = fwd(m, x)
    for i in m.moe_layers:
        k = m.blocks[i].moe.router.kernel
        k[...] = k[...][::-1]
    _, aux2 = fwd(m, x)
    first = m.moe_layers[0]
    assert first == 1
    np.testing.assert_array_equal(aux2["routing"]["a"][0]["indices"], aux["routing"]["b"][0]["indices"])
    assert not np.array_equal(aux["routing"]["a"][0]["indices"], aux["routing"]["b"][0]["indices"])


@pytest.mark.parametrize("router", ["multi_gate", pytest.param("task_conditioned", marks=pytest.mark.slow)])
def test_single_task_model_equals_full_model_and_costs_less(router):
    m = build(router=router, capacity_factor=1.0)
    x = images(8)
    full = fwd(m, x)[0]
    for t in ("a", "b"):
        single = extract_task_model(m, t)
        assert single.task_names == [t]
        out = fwd(single, x)[0]
        np.testing.assert_allclose(out[t], full[t], rtol=1e-6, atol=1e-6)
    f_full = m3vit_flops(m, x.shape)
    f_single = m3vit_flops(extract_task_model(m, "a"), x.shape)
    assert f_single < 0.75 * f_full


def test_pruned_single_task_model_exact_when_pruned_experts_unused():
    m = build(num_experts=8, k=2, capacity_factor=None)
    x = images(4)
    full = fwd(m, x)[0]
    used = used_experts(m, "a", x)
    assert any(len(v) < 8 for v in used.values())          # something to prune on this batch
    pruned = extract_task_model(m, "a", used)
    np.testing.assert_allclose(fwd(pruned, x)[0]["a"], full["a"], rtol=1e-6, atol=1e-6)
    assert m3vit_flops(pruned, x.shape) < m3vit_flops(extract_task_model(m, "a"), x.shape)
    # pruning an expert the task does use changes its output
    block, experts = next((i, v) for i, v in used.items() if len(v) > 2)
    worse = extract_task_model(m, "a", {block: experts[1:]})
    assert np.max(np.abs(np.asarray(fwd(worse, x)[0]["a"]) - np.asarray(full["a"]))) > 1e-4
    with pytest.raises(ValueError, match=r"no task 'c'"):
        extract_task_model(m, "c")
    with pytest.raises(ValueError, match=r"blocks \[0\] that are not MoE blocks \[1, 3\]"):
        extract_task_model(m, "a", {0: (0, 1)})


def test_bad_inputs_name_the_values():
    with pytest.raises(ValueError, match="k=5 with num_experts=4"):
        build(k=5)
    with nnx.use_eager_sharding(False):
        router = MultiGateRouter(4, 3, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"task id\(s\) \[2\] out of range for 2 tasks"):
        router(jnp.zeros((3, 4)), np.array([0, 1, 2]))
    with jax.set_mesh(shd.make_mesh({"data": 2, "expert": 4})), nnx.use_eager_sharding(False):
        with pytest.raises(ValueError, match="6 experts cannot be split over the mesh's expert axis of size 4"):
            jax.eval_shape(lambda: nnx.state(M3ViT((8, 8, 1), TASKS, rngs=nnx.Rngs(0), **{**SMALL, "num_experts": 6})))


def test_shard_map_impl_from_arch_kwargs_equals_dense_on_8_devices():
    x = images(8)
    mesh = shd.make_mesh({"data": 2, "expert": 4})
    outs = {}
    for impl in ("dense", "shard_map"):
        m = build(impl=impl, capacity_factor=1.0)
        gd, st = nnx.split(m)
        with jax.set_mesh(mesh):
            outs[impl] = jax.jit(lambda s, x: nnx.merge(gd, s).forward_with_aux(x)[0])(st, x)
    for t in ("a", "b"):
        np.testing.assert_allclose(outs["shard_map"][t], outs["dense"][t], rtol=1e-5, atol=1e-5)


def test_m3vit_and_taskexpert_build_from_config():
    import ml_collections
    cfg = ml_collections.ConfigDict({"arch": "m3vit", "arch_kwargs": dict(SMALL, router="task_conditioned",
                                                                          num_experts=8)})
    with nnx.use_eager_sharding(False):
        m = nnx.eval_shape(lambda: model_factory(cfg, TASKS, (8, 8, 1))(nnx.Rngs(0)))
        assert isinstance(m, M3ViT) and m.blocks[1].moe.num_experts == 8
        te = nnx.eval_shape(lambda: model_factory(ml_collections.ConfigDict({"arch": "taskexpert", "arch_kwargs": dict(
            patch=4, dim=16, depth=2, num_heads=2)}), TASKS, (8, 8))(nnx.Rngs(0)))
    assert isinstance(te, TaskExpertViT)
    with pytest.raises(TypeError, match="unexpected keyword argument 'experts'"):
        model_factory(ml_collections.ConfigDict({"arch": "m3vit", "arch_kwargs": {"experts": 3}}), TASKS, (8, 8, 1))


@pytest.mark.slow
def test_m3vit_train_step_adds_aux_loss():
    import ml_collections

    from mtl.train import Steps, make_optimizer
    cfg = ml_collections.ConfigDict({"arch": "m3vit", "arch_kwargs": dict(SMALL, lbl_weight=0.5)})
    factory = model_factory(cfg, TASKS, (8, 8, 1))
    steps = Steps(factory, TASKS, make_optimizer("adamw", 1e-3, 10), shd.make_mesh({"data": 1}, jax.devices()[:1]))
    state = steps.init()
    x = images(4)
    batch = {"inputs": x, "labels": {"a": np.array([0, 1, 2, 0]), "b": np.zeros((4, 2), np.float32)}}
    model = steps.model(state.params)
    _, aux = model.forward_with_aux(x)
    _, m = steps.step(state, steps.put_batch(batch))
    np.testing.assert_allclose(m["aux_loss"], aux["loss"], rtol=1e-5)
    assert float(m["aux_loss"]) > 0.4                         # 0.5 * LBL, LBL >= ~1


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_taskexpert_layer_matches_numpy():
    from mtl.nn.moe import TaskExpertLayer
    with nnx.use_eager_sharding(False):
        gd, st = nnx.split(nnx.eval_shape(lambda: TaskExpertLayer(8, 2, 3, 8, rngs=nnx.Rngs(1))))
    rng = np.random.default_rng(1)
    layer = nnx.merge(gd, jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(s.dtype)), st))
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 4, 8)).astype(np.float32)
    mem = rng.normal(size=(2, 2, 4, 8)).astype(np.float32)
    new, g = layer(z, mem)
    a = lambda v: np.asarray(v[...])
    ex = layer.experts
    f = np.stack([np_gelu(z @ a(ex.w_up)[e] + a(ex.b_up)[e]) @ a(ex.w_down)[e] + a(ex.b_down)[e] for e in range(3)],
                 axis=2)                                           # [B, L, E, d]
    for t in range(2):
        logits = z @ a(layer.gate)[t] + a(layer.gate_bias)[t]
        gt = np.exp(logits - logits.max(-1, keepdims=True))
        gt /= gt.sum(-1, keepdims=True)
        np.testing.assert_allclose(g[t], gt, rtol=1e-5, atol=1e-6)
        u = np.einsum("ble,bled->bld", gt[..., :3], f) + gt[..., 3:] * mem[t]
        h = mem[t] + u
        ln = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
        ln = ln * a(layer.norms[t].scale) + a(layer.norms[t].bias)
        np.testing.assert_allclose(new[t], ln, rtol=1e-4, atol=1e-4)


def test_diagnostics_hand_worked():
    idx = np.array([[0, 1], [0, 2], [3, 0]])
    kept = np.array([[True, True], [True, False], [True, True]])
    np.testing.assert_allclose(expert_load(idx, 4, kept), [3 / 5, 1 / 5, 0, 1 / 5])
    np.testing.assert_allclose(router_entropy(np.full((5, 4), 0.25)), np.log(4), rtol=1e-6)
    np.testing.assert_allclose(router_entropy(np.eye(4)), 0.0, atol=1e-7)
    share = task_expert_share([np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([[0.5, 0.5], [0.5, 0.5]])])
    np.testing.assert_allclose(share, [[1.5 / 2.5, 0.5 / 1.5], [1.0 / 2.5, 1.0 / 1.5]], rtol=1e-6)
    # two images (domains 0, 1), two tokens each, top-1
    r = domain_routing(np.array([[[0], [1]], [[2], [2]]]), np.array([0, 1]), 2, 3)
    np.testing.assert_allclose(r, [[0.5, 0.5, 0], [0, 0, 1]])
    np.testing.assert_allclose(domain_expert_mutual_information(np.array([[1.0, 0], [0, 1.0]])), np.log(2), rtol=1e-6)
    np.testing.assert_allclose(domain_expert_mutual_information(np.array([[0.3, 0.7], [0.3, 0.7]])), 0.0, atol=1e-7)
