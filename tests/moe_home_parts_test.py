"""HoME's four parts, each against a numpy re-derivation (issue 12 item 3): expert
normalisation + Swish, the hierarchy mask, the feature gate and the self-gate; and the
property behind the synthetic-data finding: a one-layer LN-Swish expert discards the
scale of its input."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl.nn.moe import GatedExpertLayer, LNSExperts, build_architecture
from random_models import build

D = 5
p = lambda v: np.asarray(v[...])  # noqa: E731


def swish(z):
    return z / (1 + np.exp(-z))


def softmax_masked(z, mask):
    z = np.where(mask, z, -np.inf)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def x_batch(b=4, seed=0):
    return np.random.default_rng(seed).normal(size=(b, D)).astype(np.float32)


def lns_numpy(ex, x):
    out = []
    for e in range(ex.num_experts):
        h = x @ p(ex.w)[e] + p(ex.b)[e]
        mu, var = h.mean(-1, keepdims=True), ((h - h.mean(-1, keepdims=True)) ** 2).mean(-1, keepdims=True)
        out.append(swish((h - mu) / np.sqrt(var + ex.eps) * p(ex.scale)[e] + p(ex.shift)[e]))
    return np.stack(out)


def test_expert_normalisation_and_swish():
    ex = build(lambda: LNSExperts(3, D, 6, rngs=nnx.Rngs(0)))
    x = x_batch()
    out, act = ex.forward(jnp.asarray(x), shared_input=True)
    np.testing.assert_allclose(out, lns_numpy(ex, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(act, out)


def test_one_layer_ln_swish_expert_is_blind_to_input_scale():
    """With a zero bias, LN(W (c x)) = LN(W x) for c > 0: the expert's output does not
    change when its input is scaled, so amplitude information must come from elsewhere."""
    ex = build(lambda: LNSExperts(2, D, 6, rngs=nnx.Rngs(0)))
    ex.b[...] = jnp.zeros_like(ex.b[...])
    x = jnp.asarray(x_batch())
    a, _ = ex.forward(x, shared_input=True)
    b, _ = ex.forward(3.0 * x, shared_input=True)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_hierarchy_mask_gives_exact_zeros_outside_shared_group_and_own():
    names = ("a", "b", "c")
    arch = build(lambda: build_architecture("home", D, names, task_groups=[["a", "c"], ["b"]], num_shared=1,
                                            experts_per_group=1, experts_per_task=1, expert_dim=4,
                                            rngs=nnx.Rngs(0)))
    x = jnp.asarray(x_batch())
    _, aux = arch(x)
    meta, task = arch.layers
    groups = {"a": 0, "c": 0, "b": 1}
    # meta layer: group g's gate sees shared + group g; the global gate sees all
    for g, label in enumerate(meta.gate_labels):
        want = [lab.startswith("shared") or label == "shared" or lab.startswith(f"group:{g}:")
                for lab in meta.expert_labels]
        probs = np.asarray(aux["layers"][0]["gate_probs"][g])
        assert np.all(probs[:, ~np.asarray(want)] == 0) and np.all(probs[:, np.asarray(want)] > 0), label
    # task layer: task t sees shared + its group's + its own experts, and reads its group's stream
    for t, name in enumerate(names):
        want = np.array([lab.startswith("shared") or lab.startswith(f"group:{groups[name]}:")
                         or lab.startswith(f"task:{name}:") for lab in task.expert_labels])
        probs = np.asarray(aux["layers"][1]["gate_probs"][t])
        assert np.all(probs[:, ~want] == 0) and np.all(probs[:, want] > 0), name
        np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-5)
        assert task.gate_streams[t] == groups[name]
    assert [task.expert_streams[i] for i, lab in enumerate(task.expert_labels) if lab.startswith("shared")] == [2]


def test_feature_gate_and_self_gate_match_numpy():
    """Feature gate: expert e reads ``x * 2 sigmoid(x B_e A_e)``; self-gate: gate g adds
    ``sum_e softmax_own(x W_self)_e f_e`` over its own experts to its masked-softmax mix."""
    visible = [[True, True, True, False], [True, False, False, True]]
    own = [[False, True, True, False], [False, False, False, True]]
    layer = build(lambda: GatedExpertLayer(D, 3, expert_streams=(0,) * 4, gate_streams=(0, 0), visible=visible,
                                           own=own, expert_kind="lns", feature_gate_rank=2, rngs=nnx.Rngs(0)))
    assert layer.self_rows == (0, 1)
    x = x_batch(6, seed=1)
    y, aux = layer(jnp.asarray(x))
    fg = [x * 2 / (1 + np.exp(-(x @ p(layer.fg_down)[e] @ p(layer.fg_up)[e]))) for e in range(4)]
    f = np.stack([lns_numpy(layer.experts, fg[e])[e] for e in range(4)])        # [E, B, h]
    for g in range(2):
        pg = softmax_masked(x @ p(layer.gate_kernel)[g], np.asarray(visible[g]))
        ps = softmax_masked(x @ p(layer.self_kernel)[g], np.asarray(own[g]))
        want = np.einsum("be,ebh->bh", pg, f) + np.einsum("be,ebh->bh", ps, f)
        np.testing.assert_allclose(y[g], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(aux["self_probs"][g], ps, rtol=1e-5, atol=1e-6)
