"""mtl.nn.ParScale: P = 1 is the plain model bit for bit; identical prefixes give one stream's
output; aggregation weights re-derived in numpy; training stays finite; bad input refused."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtl.nn import heads
from mtl.nn.encoders import MLP, ByteTransformer
from mtl.nn.multitask import MultiTaskModel
from mtl.nn.parscale import ParScale, non_embedding_params
from mtl.tasks import Task, losses_from_outputs

TASKS = [Task("lm", heads.LanguageModel(256))]
L = 16


def plain(seed=0, seq_len=L, **kw):
    with nnx.use_eager_sharding(False):
        enc = ByteTransformer((seq_len,), dim=32, depth=2, num_heads=2, rngs=nnx.Rngs(seed), **kw)
        return MultiTaskModel(enc, TASKS, rngs=nnx.Rngs(seed + 1))


def wrapped(P, seed=0, **kw):
    with nnx.use_eager_sharding(False):
        return ParScale(plain(seed), P, prefix_len=kw.pop("prefix_len", 5), rngs=nnx.Rngs(seed + 2), **kw)


def tokens(b=3, n=L, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, n)), jnp.int32)


def test_p1_is_the_plain_model_bit_for_bit():
    ref, ps = plain(), wrapped(1)
    x = tokens()
    # same parameter tree (paths and values): a P = 1 checkpoint is a plain-model checkpoint
    a, b = nnx.to_flat_state(nnx.state(ref, nnx.Param)), nnx.to_flat_state(nnx.state(ps, nnx.Param))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (_, u), (_, v) in zip(a, b):
        np.testing.assert_array_equal(u[...], v[...])
    np.testing.assert_array_equal(ref(x)["lm"], ps(x)["lm"])
    jit_out = lambda m: nnx.jit(lambda m, x: m(x)["lm"])(m, x)
    np.testing.assert_array_equal(jit_out(ref), jit_out(ps))
    assert not hasattr(ps, "prefix") and not hasattr(ps, "aggregator")


@pytest.mark.parametrize("reparam", ["mlp", "none"])
def test_identical_prefixes_give_one_streams_output(reparam):
    P, x = 3, tokens()
    ps = wrapped(P, reparam=reparam)
    if reparam == "mlp":
        ps.prefix.p_prime[...] = jnp.broadcast_to(ps.prefix.p_prime[...][:1], ps.prefix.p_prime.shape)
    else:
        ps.prefix.k[...] = jnp.broadcast_to(ps.prefix.k[...][:, :1], ps.prefix.k.shape)
        ps.prefix.v[...] = jnp.broadcast_to(ps.prefix.v[...][:, :1], ps.prefix.v.shape)
    # aggregation weights far from uniform: the output must not depend on them
    ps.aggregator.outer.kernel[...] = 5.0 * jax.random.normal(jax.random.key(3), ps.aggregator.outer.kernel.shape)
    w = np.asarray(ps.aggregation_weights(x))
    assert w.max() > 0.6
    one = [(k[:1], v[:1]) for k, v in ps.prefix()]  # stream 0's prefixes, broadcast by Attention
    ref = ps.heads["lm"](ps.encoder(x, kv_prefixes=one))
    np.testing.assert_allclose(ps(x)["lm"], ref, rtol=2e-5, atol=2e-5)


def test_streams_are_sample_major_with_their_own_prefix():
    P, x = 3, tokens(b=2)
    ps = wrapped(P)
    hs = np.asarray(ps.stream_features(x))  # [B, P, L, H]
    pre = ps.prefix()
    for b in range(2):
        for p in range(P):
            ref = ps.encoder(x[b:b + 1], kv_prefixes=[(k[p:p + 1], v[p:p + 1]) for k, v in pre])
            np.testing.assert_allclose(hs[b, p], ref[0], rtol=1e-5, atol=1e-5)
    assert np.abs(hs[:, 0] - hs[:, 1]).max() > 1e-4  # distinct prefixes -> distinct streams


def test_aggregation_matches_numpy_and_respects_smoothing():
    P, eps, x = 4, 0.01, tokens()
    ps = wrapped(P, smoothing=eps)
    ps.aggregator.outer.kernel[...] = 8.0 * jax.random.normal(jax.random.key(1), ps.aggregator.outer.kernel.shape)
    hs = np.asarray(ps.stream_features(x), np.float64)
    b, _, n, h = hs.shape
    z = hs.transpose(0, 2, 1, 3).reshape(b, n, P * h)  # concat of the P hidden states per token
    g = lambda lin: (np.asarray(lin.kernel[...], np.float64), np.asarray(lin.bias[...], np.float64))
    (w1, b1), (w2, b2) = g(ps.aggregator.inner), g(ps.aggregator.outer)
    u = z @ w1 + b1
    logits = (u / (1 + np.exp(-u))) @ w2 + b2
    sm = np.exp(logits - logits.max(-1, keepdims=True))
    w_ref = (1 - eps) * sm / sm.sum(-1, keepdims=True) + eps / P
    w = np.asarray(ps.aggregation_weights(x))
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert w.min() >= eps / P * (1 - 1e-5) and w.max() <= 1 - eps + eps / P + 1e-6
    assert w.min() < 0.01  # the smoothing floor is actually reached somewhere
    feats = np.einsum("blp,bplh->blh", w_ref, hs)
    np.testing.assert_allclose(ps.features(x), feats, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("reparam", ["mlp", "none"])
def test_training_stays_finite_and_learns(reparam):
    rng = np.random.default_rng(0)
    text = np.frombuffer(open(np.__file__, "rb").read() * 4, np.uint8)
    ps = wrapped(4, reparam=reparam, prefix_len=8)
    opt = nnx.Optimizer(ps, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt, x, y):
        def loss_fn(m):
            return losses_from_outputs(TASKS, m(x), {"labels": {"lm": y}})[0]
        loss, g = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, g)
        return loss, g

    losses = []
    for _ in range(40):
        s = rng.integers(0, text.size - L - 1, 8)[:, None] + np.arange(L + 1)
        w = jnp.asarray(text[s], jnp.int32)
        loss, g = step(ps, opt, w[:, :-1], w[:, 1:])
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)), losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    gp = nnx.to_flat_state(g["prefix"])
    assert all(np.all(np.isfinite(v[...])) for _, v in gp)
    assert max(float(np.abs(v[...]).max()) for _, v in gp) > 0  # the prefixes do train
    for k, v in ps.prefix():
        assert np.all(np.isfinite(k)) and np.all(np.isfinite(v))


def test_non_embedding_params_counts_the_blocks_and_final_norm():
    ps = wrapped(2)
    d, hdim = 32, 128
    per_block = 2 * 2 * d + d * 3 * d + 3 * d + d * d + d + d * hdim + hdim + hdim * d + d
    assert non_embedding_params(ps) == 2 * per_block + 2 * d


@pytest.mark.parametrize("P,err", [(0, ValueError), (-2, ValueError), (2.5, ValueError), ("2", ValueError),
                                   (True, ValueError)])
def test_bad_P(P, err):
    with pytest.raises(err, match="P"):
        wrapped(P)


def test_bad_models_and_options():
    with nnx.use_eager_sharding(False):
        mlp = MultiTaskModel(MLP((16,), hidden=(8,), rngs=nnx.Rngs(0)), [Task("c", heads.Classification(3))],
                             rngs=nnx.Rngs(0))
        with pytest.raises(TypeError, match="kv_prefixes"):
            ParScale(mlp, 2, rngs=nnx.Rngs(0))
        with pytest.raises(TypeError, match="encoder, heads and task_specs"):
            ParScale(ByteTransformer((8,), dim=16, depth=1, num_heads=2, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="prefix_len"):
            ParScale(plain(), 2, prefix_len=0, rngs=nnx.Rngs(0))
        enc = ByteTransformer((8,), dim=16, depth=1, num_heads=2, rngs=nnx.Rngs(0))
        enc.max_prefix = 16
        with pytest.raises(ValueError, match="prefix_len must be 1..16"):
            ParScale(MultiTaskModel(enc, TASKS, rngs=nnx.Rngs(0)), 2, prefix_len=48, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="reparam"):
            ParScale(plain(), 2, reparam="lora", rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="rngs"):
            ParScale(plain(), 2)


def _lm_loss(m, x):
    return losses_from_outputs(TASKS, m(x[:, :-1]), {"labels": {"lm": x[:, 1:]}})[0]


@nnx.jit
def _loss_logits(m, x):
    return _lm_loss(m, x), m(x)["lm"]


def test_zero_gated_prefixes_give_exactly_the_base_model():
    # the two-stage start: every stream equals the P = 1 model, so the aggregate does too,
    # however far from uniform the aggregation weights are; plain (ungated) prefixes do not
    x, ref = tokens(b=4, n=L), plain()
    gated, ungated = wrapped(4, prefix_gate=True), wrapped(4)
    for ps in (gated, ungated):
        ps.aggregator.outer.kernel[...] = 6.0 * jax.random.normal(jax.random.key(4), ps.aggregator.outer.kernel.shape)
        for d in ps.prefix.down:
            d.kernel[...] *= 50.0  # prefixes well away from zero
    np.testing.assert_array_equal(gated.prefix.gate[...], np.zeros((2, 2)))  # (layers, heads), zero at init
    base, base_logits = _loss_logits(ref, x)
    loss, logits = _loss_logits(gated, x)
    np.testing.assert_allclose(float(loss), float(base), rtol=1e-6)
    np.testing.assert_allclose(logits, base_logits, rtol=1e-5, atol=1e-5)
    assert abs(float(_loss_logits(ungated, x)[0]) - base) > 1e-3 * base  # concatenated prefixes dilute attention
    gated.prefix.gate[...] = jnp.full((2, 2), 0.5)
    assert abs(float(_loss_logits(gated, x)[0]) - base) > 1e-4 * base  # an open gate lets the prefixes in
    w = np.asarray(nnx.jit(lambda m, x: m.aggregation_weights(x))(gated, x))
    assert w.max() > 0.6  # the equality above held with far from uniform stream weights


def test_the_gate_gets_gradient_at_zero():
    x, ps = tokens(b=2, n=L), wrapped(3, prefix_gate=True)
    g = nnx.jit(nnx.grad(_lm_loss))(ps, x)
    assert float(np.abs(g["prefix"]["gate"][...]).min()) > 0  # every layer and head
    # ... but nothing else of the prefix yet (tanh(0) = 0), and the aggregator sees equal streams
    assert max(float(np.abs(v[...]).max()) for p, v in nnx.to_flat_state(g["prefix"]) if p[0] != "gate") == 0
    assert max(float(np.abs(v[...]).max()) for _, v in nnx.to_flat_state(g["aggregator"])) < 1e-6


def test_lm_factory_prefix_gate_defaults_to_two_stage_and_checks_options():
    import ml_collections

    from mtl.nn.build import model_factory

    def build(**opts):
        cfg = ml_collections.ConfigDict({"arch": "lm", "encoder": "byte_transformer",
                                         "encoder_kwargs": {"dim": 16, "depth": 1, "num_heads": 2},
                                         "parscale": {"P": 2, "prefix_len": 2, **opts}})
        factory = model_factory(cfg, TASKS, (8,))
        with nnx.use_eager_sharding(False):
            return nnx.eval_shape(lambda: factory(nnx.Rngs(0)))

    assert not build().prefix_gated and not hasattr(build().prefix, "gate")  # from scratch: unchanged
    assert build(init_from="/some/base").prefix_gated
    assert build(init_from="/some/base", freeze_backbone=True).prefix_gated
    assert not build(init_from="/some/base", prefix_gate=False).prefix_gated
    assert build(prefix_gate=True).prefix_gated
    with pytest.raises(ValueError, match="freeze_backbone=True needs model.parscale.init_from"):
        build(freeze_backbone=True)
    with pytest.raises(ValueError, match="P = 1 leaves nothing to train"):
        build(P=1, init_from="/some/base", freeze_backbone=True)
    with pytest.raises(ValueError, match="freeze_backbone must be True or False"):
        build(init_from="/b", freeze_backbone="yes")
    with pytest.raises(ValueError, match="init_from must be a path"):
        build(init_from=3)
    with pytest.raises(ValueError, match="prefix_gate must be True or False"):
        build(prefix_gate="on")
    with pytest.raises(TypeError, match="unknown option.*init_from"):
        build(init_frm="/b")
