"""MMoE / OneGateMoE / CGC / PLE / HoME vs numpy re-derivations; HoME masks; diagnostics; model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl.nn.heads import Classification, Regression
from mtl.nn.moe import ARCHITECTURES, MMoE, MoEMultiTaskModel, build_architecture, build_moe_model
from mtl.tasks import Task
from random_models import build

TASKS = [Task("a", Regression(1)), Task("b", Classification(3)), Task("c", Regression(2))]
NAMES = [t.name for t in TASKS]
D = 5




def x_batch(b=4, seed=0):
    return np.random.default_rng(seed).normal(size=(b, D)).astype(np.float32)


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_swish(x):
    return x / (1 + np.exp(-x))


def np_experts(experts, xe):
    """xe [E, B, d] -> [E, B, h] from the experts' parameters."""
    a = lambda v: np.asarray(v[...])
    out = []
    for e in range(xe.shape[0]):
        if hasattr(experts, "w_up"):
            h = np_gelu(xe[e] @ a(experts.w_up)[e] + a(experts.b_up)[e])
            out.append(h @ a(experts.w_down)[e] + a(experts.b_down)[e])
        else:
            h = xe[e] @ a(experts.w)[e] + a(experts.b)[e]
            h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + experts.eps)
            out.append(np_swish(h * a(experts.scale)[e] + a(experts.shift)[e]))
    return np.stack(out)


def np_masked_softmax(z, mask):
    z = np.where(mask, z, -np.inf)
    return np_softmax(z)


def np_layer(layer, inputs):
    """Independent re-derivation of GatedExpertLayer: loops over experts and gates."""
    streams = np.broadcast_to(inputs, (layer.num_streams,) + inputs.shape) if inputs.ndim == 2 else inputs
    xe = np.stack([streams[s] for s in layer.expert_streams])
    if layer.fg_down is not None:
        for e in range(len(xe)):
            xe[e] = xe[e] * 2 / (1 + np.exp(-(xe[e] @ np.asarray(layer.fg_down[...])[e] @ np.asarray(layer.fg_up[...])[e])))
    f = np_experts(layer.experts, xe)
    wg = np.asarray(layer.gate_kernel[...])
    out = []
    for g, s in enumerate(layer.gate_streams):
        p = np_masked_softmax(streams[s] @ wg[g], np.asarray(layer.visible[g]))
        y = np.einsum("be,ebh->bh", p, f)
        if g in layer.self_rows:
            r = layer.self_rows.index(g)
            ps = np_masked_softmax(streams[s] @ np.asarray(layer.self_kernel[...])[r], np.asarray(layer.own[r]))
            y = y + np.einsum("be,ebh->bh", ps, f)
        out.append(y)
    return np.stack(out)


def np_arch(arch, x):
    h = x
    for layer in arch.layers:
        h = np_layer(layer, h)
    return {t: h[arch.task_gate[i]] for i, t in enumerate(arch.task_names)}


def test_mmoe_forward_matches_numpy():
    model = build(lambda: build_moe_model("mmoe", TASKS, D, num_experts=3, expert_dim=4, expert_hidden=6,
                                          rngs=nnx.Rngs(0)))
    x = x_batch()
    preds, aux = nnx.jit(lambda m, x: m.forward_with_aux(x))(model, jnp.asarray(x))
    ex = model.architecture.layers[0].experts
    p = lambda v: np.asarray(v[...])
    f = [np_gelu(x @ p(ex.w_up)[i] + p(ex.b_up)[i]) @ p(ex.w_down)[i] + p(ex.b_down)[i] for i in range(3)]
    wg = p(model.architecture.layers[0].gate_kernel)
    for t, name in enumerate(NAMES):
        g = np_softmax(x @ wg[t])                                     # softmax(W_t x)
        z = sum(g[:, i:i + 1] * f[i] for i in range(3))                # sum_i g_i f_i(x)
        np.testing.assert_allclose(aux["layers"][0]["gate_probs"][t], g, rtol=1e-5, atol=1e-6)
        head = model.heads[name].out
        np.testing.assert_allclose(preds[name], z @ p(head.kernel) + p(head.bias), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,kwargs", [
    ("mmoe", dict(num_experts=3, tower_hidden=(3,))),
    ("one_gate_moe", dict(num_experts=2)),
    ("cgc", dict(num_shared=1, experts_per_task=1)),
    ("ple", dict(num_layers=2, num_shared=1, experts_per_task=1, tower_hidden=(3,))),
    ("home", dict(task_groups=[["a", "c"], ["b"]], feature_gate_rank=2)),
])
def test_architectures_match_numpy(name, kwargs):
    arch = build(lambda: build_architecture(name, D, NAMES, expert_dim=4, rngs=nnx.Rngs(1), **kwargs))
    x = x_batch(seed=1)
    feats, _ = nnx.jit(lambda m, x: m(x))(arch, jnp.asarray(x))
    ref = np_arch(arch, x)
    for t in NAMES:
        tower = arch.towers[t]
        want = ref[t]
        for lin in tower.layers:
            want = np.maximum(want @ np.asarray(lin.kernel[...]) + np.asarray(lin.bias[...]), 0)
        np.testing.assert_allclose(feats[t], want, rtol=1e-4, atol=1e-5)
    if name == "one_gate_moe":                     # one gate: every task gets the same mixture
        np.testing.assert_allclose(feats["a"], feats["b"])


def test_mmoe_gates_are_separate_per_task():
    """Task t's output depends on gate t only: perturbing another task's gate kernel leaves
    it unchanged, and its loss has zero gradient on the other gates (no parameter sharing)."""
    model = build(lambda: build_moe_model("mmoe", TASKS, D, num_experts=3, expert_dim=4, expert_hidden=5,
                                          rngs=nnx.Rngs(0)))      # no tower ReLU that could hide a change
    x = jnp.asarray(x_batch(6))
    base = {k: np.asarray(v) for k, v in model(x).items()}
    kernel = model.architecture.layers[0].gate_kernel
    orig = np.asarray(kernel[...])
    for t, name in enumerate(NAMES):
        bumped = orig.copy()
        bumped[t] += np.random.default_rng(t).normal(size=bumped[t].shape)   # change gate t only
        kernel[...] = jnp.asarray(bumped)
        out = model(x)
        for u, other in enumerate(NAMES):
            if u == t:
                assert np.abs(np.asarray(out[other]) - base[other]).max() > 1e-4
            else:
                np.testing.assert_array_equal(np.asarray(out[other]), base[other])
        kernel[...] = jnp.asarray(orig)

    def loss(m, name):
        return jnp.sum(m(x)[name] ** 2)

    for t, name in enumerate(NAMES):
        g = np.asarray(nnx.grad(loss)(model, name).architecture.layers[0].gate_kernel[...])
        assert np.abs(g[t]).max() > 0
        assert np.all(g[np.arange(len(NAMES)) != t] == 0)


def visible_sets(layer):
    return {lab: {layer.expert_labels[e] for e, v in enumerate(row) if v}
            for lab, row in zip(layer.gate_labels, layer.visible)}


@pytest.mark.parametrize("meta_layer,per_task", [(True, 1), (False, 0), (True, 0)])
def test_home_masks_gate_exactly_group_and_shared(meta_layer, per_task):
    groups = [["a", "c"], ["b"]]
    arch = build(lambda: build_architecture("home", D, NAMES, task_groups=groups, num_shared=2, experts_per_group=1,
                                            experts_per_task=per_task, meta_layer=meta_layer, expert_dim=3,
                                            rngs=nnx.Rngs(0)))
    _, aux = nnx.jit(lambda m, x: m(x))(arch, jnp.asarray(x_batch(6)))
    top = arch.layers[-1]
    group_of = {"a": 0, "c": 0, "b": 1}
    for t_i, t in enumerate(NAMES):
        want = {"shared:0", "shared:1", f"group:{group_of[t]}:0"} | ({f"task:{t}:0"} if per_task else set())
        assert visible_sets(top)[t] == want
        probs = np.asarray(aux["layers"][-1]["gate_probs"][t_i])
        seen = np.array([lab in want for lab in top.expert_labels])
        assert np.all(probs[:, ~seen] == 0.0)           # invisible experts: exactly 0
        assert np.all(probs[:, seen] > 0.0)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    if per_task:                                         # self-gate only over the task's own experts
        sp = np.asarray(aux["layers"][-1]["self_probs"])
        for r, t in enumerate(NAMES):
            own = np.array([lab == f"task:{t}:0" for lab in top.expert_labels])
            assert np.all(sp[r][:, ~own] == 0.0) and np.allclose(sp[r][:, own], 1.0)
    else:
        assert aux["layers"][-1]["self_probs"] is None
    if meta_layer:
        vs = visible_sets(arch.layers[0])
        assert vs["group:0"] == {"shared:0", "shared:1", "group:0:0"}
        assert vs["group:1"] == {"shared:0", "shared:1", "group:1:0"}
        assert vs["shared"] == set(arch.layers[0].expert_labels)


def test_cgc_and_ple_masks():
    ple = build(lambda: build_architecture("ple", D, NAMES, num_layers=2, num_shared=1, experts_per_task=2,
                                           rngs=nnx.Rngs(0)))
    bottom, top = (visible_sets(layer) for layer in ple.layers)
    for vs in (bottom, top):
        for t in NAMES:
            assert vs[t] == {"shared:0", f"task:{t}:0", f"task:{t}:1"}
    assert bottom["shared"] == set(ple.layers[0].expert_labels)     # shared gate below the top mixes all
    assert "shared" not in top
    assert ple.layers[1].expert_streams == (3, 0, 0, 1, 1, 2, 2)    # next layer reads each gate's output


def test_diagnostics_and_model_interface():
    model = build(lambda: build_moe_model("cgc", TASKS, D, num_shared=2, experts_per_task=1, expert_dim=4,
                                          expert_kwargs={"activation": "relu"}, rngs=nnx.Rngs(0)))
    x = jnp.asarray(x_batch(8))
    out = model(x)
    assert {k: v.shape for k, v in out.items()} == {"a": (8, 1), "b": (8, 3), "c": (8, 2)}
    assert model.task_names == NAMES
    d = nnx.jit(lambda m, x: m.gates(x))(model, x)
    share = np.stack([d["shared_expert_share"][t] for t in NAMES])
    assert share.shape == (3, 2)
    np.testing.assert_allclose(share.sum(0), 1.0, rtol=1e-5)
    mass = np.stack([np.asarray(d["task_gate_probs"][t])[:, :2].sum(0) for t in NAMES])
    np.testing.assert_allclose(share, mass / mass.sum(0), rtol=1e-5)
    layer = model.architecture.layers[0]
    xe = np.broadcast_to(np.asarray(x), (layer.num_experts, 8, D))
    hid = [np.maximum(xe[e] @ np.asarray(layer.experts.w_up[...])[e] + np.asarray(layer.experts.b_up[...])[e], 0)
           for e in range(layer.num_experts)]
    np.testing.assert_allclose(d["zero_fraction"]["layer0"], [np.mean(h == 0) for h in hid], atol=1e-6)
    assert set(d["gate_probs"]["layer0"]) == set(NAMES)


def test_registry_and_errors():
    assert set(ARCHITECTURES) == {"mmoe", "cgc", "ple", "home", "one_gate_moe"}
    with pytest.raises(ValueError, match="valid names: cgc, home, mmoe, one_gate_moe, ple"):
        build_architecture("mmeo", D, NAMES, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"in no group \['b'\]"):
        build(lambda: build_architecture("home", D, NAMES, task_groups=[["a", "c"]], rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"unknown \['z'\]"):
        build(lambda: build_architecture("home", D, NAMES, task_groups=[["a", "c", "z"], ["b"]], rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"in several groups \['a'\]"):
        build(lambda: build_architecture("home", D, NAMES, task_groups=[["a", "c"], ["b", "a"]], rngs=nnx.Rngs(0)))
    arch = build(lambda: MMoE(D, ["a", "b"], rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="built for tasks"):
        build(lambda: MoEMultiTaskModel(arch, TASKS, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"inputs \[B, D\]"):
        arch(jnp.ones((2, 3, D)))
