"""Cross-stitch, MTAN, DSelect-k and learning-to-branch against numpy re-derivations of
their forwards (the modules' own random weights), plus backbone-stage consistency."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl.nn import stages as S
from mtl.nn.branching import LearnToBranch, branch_weights
from mtl.nn.encoders import CNN, MLP, ViT
from mtl.nn.moe.dselect import DSelectK, binary_codes, smooth_step
from mtl.nn.soft_sharing import MTAN, CrossStitch
from random_models import build

NAMES = ("a", "b", "c")
D = 5
p = lambda v: np.asarray(v[...])  # noqa: E731
relu = lambda z: np.maximum(z, 0)  # noqa: E731
sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731


def x_batch(b=4, seed=0, shape=(D,)):
    return np.random.default_rng(seed).normal(size=(b,) + shape).astype(np.float32)


def mlp(rngs, hidden=(6, 4)):
    return MLP((D,), hidden, rngs=rngs)


def np_dense(lin, h):
    return h @ p(lin.kernel) + p(lin.bias)


# ----------------------------------------------------------------------------- stages

def test_stages_reproduce_the_cnn_and_mlp_encoders():
    x = x_batch(2, shape=(8, 8, 3))
    for enc, xin in ((build(lambda: CNN((8, 8, 3), (4, 8, 8), groups=2, rngs=nnx.Rngs(0))), x),
                     (build(lambda: mlp(nnx.Rngs(0))), x_batch(3))):
        h = S.prepare(enc, jnp.asarray(xin))
        specs = S.stages(enc)
        for s in specs:
            h = S.run_stage(enc, s.index, h)[1]
            assert h.shape[-1] == s.channels
        np.testing.assert_allclose(S.pool(enc, h), enc(jnp.asarray(xin)), rtol=1e-5, atol=1e-6)
    assert [s.stride for s in S.stages(build(lambda: CNN((8, 8, 3), (4, 8, 8), rngs=nnx.Rngs(0))))] == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="'mlp', 'cnn' or 'vit'"):
        S.stages(object())


def vit(rngs, pool="cls", pre_norm=False, depth=3):
    return ViT((8, 8, 3), patch=4, dim=8, depth=depth, num_heads=2, pool=pool, pre_norm=pre_norm, rngs=rngs)


@pytest.mark.parametrize("pool,pre_norm", [("cls", False), ("mean", True)])
def test_stages_reproduce_the_vit(pool, pre_norm):
    enc = build(lambda: vit(nnx.Rngs(0), pool, pre_norm))
    x = jnp.asarray(x_batch(2, shape=(8, 8, 3)))
    h = S.prepare(enc, x)
    assert h.shape == (2, 5, 8)                      # class token + 4 patches
    for s in S.stages(enc):
        u, h = S.run_stage(enc, s.index, h)
        blk = enc.blocks[s.index]                    # u: after attention; p: after the MLP as well
        np.testing.assert_allclose(h, u + blk.mlp(blk.norm2(u)), rtol=1e-6, atol=1e-6)
    assert len(S.stages(enc)) == 3 and all(s.channels == 8 for s in S.stages(enc))
    np.testing.assert_allclose(S.pool(enc, h), enc(x), rtol=1e-5, atol=1e-6)


def test_cross_stitch_on_vit_mixes_token_streams_between_blocks():
    cs = build(lambda: CrossStitch(lambda r: vit(r), NAMES, rngs=nnx.Rngs(0)))
    alpha = np.random.default_rng(3).dirichlet(np.ones(3), size=(2, 3)).astype(np.float32)   # [units, T, T]
    cs.alpha[...] = jnp.asarray(alpha)
    x = jnp.asarray(x_batch(2, shape=(8, 8, 3)))
    feats, _ = cs(x)
    hs = [c.tokens(x) for c in cs.columns]           # reference: each column's own blocks, mixed by hand
    for i in range(3):
        hs = [c.blocks[i](h) for c, h in zip(cs.columns, hs)]
        if i < 2:
            hs = [sum(alpha[i, t, s] * hs[s] for s in range(3)) for t in range(3)]
    for t, name in enumerate(NAMES):
        np.testing.assert_allclose(feats[name], cs.columns[t].norm(hs[t])[:, 0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- cross-stitch

def test_cross_stitch_init_is_near_identity():
    with nnx.use_eager_sharding(False):
        cs = CrossStitch(mlp, NAMES, alpha_same=0.9, rngs=nnx.Rngs(0))
    a = p(cs.alpha)
    assert a.shape == (1, 3, 3)            # one unit between the two stages
    np.testing.assert_allclose(a[0], [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]], rtol=1e-6)


def test_cross_stitch_matches_numpy():
    cs = build(lambda: CrossStitch(lambda r: mlp(r, (6, 4, 3)), NAMES, rngs=nnx.Rngs(0)))
    x = x_batch()
    feats, _ = nnx.jit(lambda m, x: m(x))(cs, jnp.asarray(x))
    alpha = p(cs.alpha)
    hs = [x for _ in NAMES]
    for i in range(3):
        hs = [relu(np_dense(c.layers[i], h)) for c, h in zip(cs.columns, hs)]
        if i < 2:   # unit i: x_t <- sum_s alpha[i, t, s] x_s
            hs = [sum(alpha[i, t, s] * hs[s] for s in range(3)) for t in range(3)]
    for t, name in enumerate(NAMES):
        np.testing.assert_allclose(feats[name], hs[t], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- MTAN

def test_mtan_matches_numpy_on_mlp():
    m = build(lambda: MTAN(mlp(nnx.Rngs(0), (6, 4, 3)), NAMES, rngs=nnx.Rngs(1)))
    x = x_batch(seed=2)
    feats, _ = nnx.jit(lambda m, x: m(x))(m, jnp.asarray(x))
    h, f = x, {t: None for t in NAMES}
    for i in range(3):
        pi = relu(np_dense(m.encoder.layers[i], h))       # shared stage output (u = p on the MLP)
        for t in NAMES:
            g = pi if f[t] is None else np.concatenate([pi, f[t]], -1)
            att = m.attention[t][i]
            a = sigmoid(np_dense(att.w2, relu(np_dense(att.w1, g))))
            f[t] = relu(np_dense(m.carry[i], a * pi)) if i < 2 else a * pi
        h = pi
    for t in NAMES:
        np.testing.assert_allclose(feats[t], f[t], rtol=1e-4, atol=1e-5)


def test_mtan_on_cnn_masks_the_shared_stage_outputs():
    """CNN: with attention forced open (sigmoid -> 1) the last task features equal the shared
    backbone's pooled output, whatever the carried features."""
    enc = lambda: CNN((8, 8, 1), (4, 8), groups=2, rngs=nnx.Rngs(0))  # noqa: E731
    m = build(lambda: MTAN(enc(), NAMES[:2], rngs=nnx.Rngs(1)))
    x = jnp.asarray(x_batch(2, shape=(8, 8, 1)))
    for t in NAMES[:2]:
        for att in m.attention[t]:
            att.w2.kernel[...] = jnp.zeros_like(att.w2.kernel[...])
            att.w2.bias[...] = jnp.full_like(att.w2.bias[...], 50.0)
    feats, _ = m(x)
    for t in NAMES[:2]:
        np.testing.assert_allclose(feats[t], m.encoder(x), rtol=1e-5, atol=1e-6)
        assert feats[t].shape == (2, 8)


def test_mtan_on_vit_masks_the_shared_block_outputs():
    """ViT: attention forced open gives the shared ViT's output for every task; forced shut
    (sigmoid -> 0) gives the final norm of zero tokens, i.e. the norm's bias."""
    m = build(lambda: MTAN(vit(nnx.Rngs(0)), NAMES[:2], rngs=nnx.Rngs(1)))
    x = jnp.asarray(x_batch(2, shape=(8, 8, 3)))
    for value in (50.0, -50.0):
        for t in NAMES[:2]:
            for att in m.attention[t]:
                att.w2.kernel[...] = jnp.zeros_like(att.w2.kernel[...])
                att.w2.bias[...] = jnp.full_like(att.w2.bias[...], value)
        feats, _ = m(x)
        want = m.encoder(x) if value > 0 else jnp.broadcast_to(m.encoder.norm.bias[...], (2, 8))
        for t in NAMES[:2]:
            np.testing.assert_allclose(feats[t], want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- DSelect-k

def test_smooth_step_and_codes_hand_worked():
    t = jnp.array([-1.0, -0.5, 0.0, 0.25, 0.5, 0.6])
    np.testing.assert_allclose(smooth_step(t, 1.0), [0, 0, 0.5, 0.84375, 1, 1], rtol=1e-6)
    np.testing.assert_array_equal(binary_codes(4).astype(int), [[0, 0], [0, 1], [1, 0], [1, 1]])


def np_dselect(arch, x):
    e, k = arch.num_experts, arch.num_nonzeros
    codes = binary_codes(e)
    m = codes.shape[1]
    ex = arch.experts
    gelu = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
    f = np.stack([gelu(x @ p(ex.w_up)[i] + p(ex.b_up)[i]) @ p(ex.w_down)[i] + p(ex.b_down)[i] for i in range(e)])
    g = arch.gamma
    out, q_all, r_all = {}, [], []
    for t, name in enumerate(arch.task_names):
        z = (x @ p(arch.z_kernel)[t] + p(arch.z_bias)[t]).reshape(len(x), k, m)
        s = np.where(z <= -g / 2, 0, np.where(z >= g / 2, 1, -2 / g ** 3 * z ** 3 + 1.5 / g * z + 0.5))
        r = np.ones((len(x), k, e))
        for ei in range(e):
            for j in range(m):
                r[:, :, ei] *= s[:, :, j] if codes[ei, j] else 1 - s[:, :, j]
        wl = x @ p(arch.w_kernel)[t] + p(arch.w_bias)[t]
        w = np.exp(wl - wl.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        q = np.einsum("bk,bke->be", w, r)
        out[name] = np.einsum("be,ebh->bh", q, f)
        q_all.append(q)
        r_all.append(r)
    return out, np.stack(q_all), np.stack(r_all)


@pytest.mark.parametrize("num_experts", [4, 3])
def test_dselect_matches_numpy(num_experts):
    arch = build(lambda: DSelectK(D, NAMES, num_experts=num_experts, num_nonzeros=2, expert_dim=3, expert_hidden=4,
                                  gamma=2.0, entropy_weight=0.1, validity_weight=0.5, rngs=nnx.Rngs(0)), scale=1.0)
    x = x_batch(6, seed=3)
    feats, aux = nnx.jit(lambda m, x: m(x))(arch, jnp.asarray(x))
    want, q, r = np_dselect(arch, x)
    for name in NAMES:
        np.testing.assert_allclose(feats[name], want[name], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(aux["expert_weights"], q, rtol=1e-4, atol=1e-6)
    assert np.all(q >= 0) and np.all(q.sum(-1) <= 1 + 1e-5)
    if num_experts == 4:          # a power of 2: every selector is a point on the simplex
        np.testing.assert_allclose(q.sum(-1), 1, rtol=1e-5)
    reg = 0.1 * np.mean(-(r * np.log(r + 1e-6)).sum(-1))
    if num_experts == 3:
        reg += 0.5 * np.mean(1 / (r.sum(-1) + 1e-6))
    np.testing.assert_allclose(aux["loss"], reg, rtol=1e-4)


def test_dselect_selects_one_expert_when_bits_saturate():
    """z far outside [-gamma/2, gamma/2]: each selector is one-hot at the expert whose code
    matches the bits (z = (+, -) -> code 10 -> expert 2)."""
    arch = build(lambda: DSelectK(D, ("a",), num_experts=4, num_nonzeros=1, expert_dim=3, rngs=nnx.Rngs(0)))
    arch.z_kernel[...] = jnp.zeros_like(arch.z_kernel[...])
    arch.z_bias[...] = jnp.array([[5.0, -5.0]])
    _, aux = arch(jnp.asarray(x_batch()))
    np.testing.assert_array_equal(aux["expert_weights"][0], np.tile([0, 0, 1, 0], (4, 1)))


# ----------------------------------------------------------------------------- learning to branch

def np_ltb(arch, x, w):
    hs = [relu(np_dense(c.layers[0], x)) for c in arch.columns]
    for i in range(1, len(arch.columns[0].layers)):
        parents = [sum(w[i - 1, t, s] * hs[s] for s in range(len(hs))) for t in range(len(hs))]
        hs = [relu(np_dense(c.layers[i], h)) for c, h in zip(arch.columns, parents)]
    return hs


def ltb(**kw):
    arch = build(lambda: LearnToBranch(lambda r: mlp(r, (6, 4, 3)), NAMES, rngs=nnx.Rngs(0), **kw))
    arch.step[...] = jnp.zeros((), jnp.int32)
    return arch


def test_ltb_eval_uses_argmax_parents():
    arch = ltb()
    alpha = p(arch.alpha)
    onehot = np.eye(3)[alpha.argmax(-1)]
    x = x_batch(seed=4)
    feats, _ = arch(jnp.asarray(x), train=False)
    want = np_ltb(arch, x, onehot)
    for t, name in enumerate(NAMES):
        np.testing.assert_allclose(feats[name], want[t], rtol=1e-4, atol=1e-5)
    assert int(arch.step[...]) == 0              # evaluation does not advance the schedule


def test_ltb_train_samples_gumbel_hard_and_advances_step():
    arch = ltb(tau0=2.0, decay_steps=10.0, seed=7)
    arch.step[...] = jnp.asarray(30, jnp.int32)
    alpha = p(arch.alpha)
    g = np.asarray(jax.random.gumbel(jax.random.fold_in(jax.random.key(7), 30), alpha.shape))
    x = x_batch(seed=5)
    feats, aux = arch(jnp.asarray(x), train=True)
    hard = np.eye(3)[(alpha + g).argmax(-1)]
    np.testing.assert_allclose(aux["branch_weights"], hard, atol=1e-6)    # forward value: one parent
    want = np_ltb(arch, x, hard)
    for t, name in enumerate(NAMES):
        np.testing.assert_allclose(feats[name], want[t], rtol=1e-4, atol=1e-5)
    assert int(arch.step[...]) == 31
    # straight-through: d/d alpha of sum(c * w) is the soft sample's Jacobian, tau = 2/sqrt(1 + 30/10) = 1
    c = np.random.default_rng(0).normal(size=alpha.shape)
    grad = jax.grad(lambda a: jnp.sum(c * branch_weights(a, 30, train=True, seed=7, tau0=2.0, decay_steps=10.0,
                                                         warmup_steps=0)))(jnp.asarray(alpha))
    s = np.exp(alpha + g)
    s /= s.sum(-1, keepdims=True)
    np.testing.assert_allclose(grad, s * (c - (c * s).sum(-1, keepdims=True)), rtol=1e-4, atol=1e-6)


def test_ltb_warmup_mixes_all_parents():
    arch = ltb(warmup_steps=5)
    x = x_batch(seed=6)
    feats, aux = arch(jnp.asarray(x), train=True)
    np.testing.assert_allclose(aux["branch_weights"], np.full((2, 3, 3), 1 / 3), rtol=1e-6)
    want = np_ltb(arch, x, np.full((2, 3, 3), 1 / 3))
    for t, name in enumerate(NAMES):
        np.testing.assert_allclose(feats[name], want[t], rtol=1e-4, atol=1e-5)
