"""CIKD, in-place distillation and the sandwich sampler/combinator vs numpy and hand-built cases."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtl.nn import slimmable as S
from mtl.nn.heads import Classification, DenseRegression, Edges, Segmentation
from mtl.tasks import Task, losses_from_outputs
from random_models import build

TASKS = [Task("seg", Segmentation(4)), Task("depth", DenseRegression(1)), Task("edges", Edges()),
         Task("cls", Classification(3))]


def test_cikd_is_mse_on_shared_channels_zero_at_full_width_and_stops_teacher_gradient():
    rng = np.random.default_rng(0)
    full = rng.normal(size=(2, 3, 3, 8)).astype(np.float32)
    sub = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(S.cikd_loss(sub, full), np.mean((sub - full[..., :4]) ** 2), rtol=1e-5)
    assert float(S.cikd_loss(full, full)) == 0.0
    g_sub, g_full = jax.grad(lambda a, b: S.cikd_loss(a, b), argnums=(0, 1))(jnp.asarray(sub), jnp.asarray(full))
    np.testing.assert_allclose(g_sub, 2 * (sub - full[..., :4]) / sub.size, rtol=1e-5)
    assert float(jnp.abs(g_full).sum()) == 0.0


def test_cikd_decreases_when_training_a_sub_network_towards_the_full_one():
    enc = build(lambda: S.SlimMLP((16,), hidden=(32, 32), rngs=nnx.Rngs(0)), seed=1, scale=0.3)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32))
    graph, params = nnx.split(enc, nnx.Param)
    tx = optax.adam(1e-2)
    # the teacher: the full-width features of the initial network, held fixed (with shared
    # weights a live teacher moves as the sub-network trains; the labelled loss anchors it)
    teacher = enc(x, 1.0)

    def loss(p):
        return S.cikd_loss(nnx.merge(graph, p)(x, 0.25), teacher)

    @jax.jit
    def step(p, o):
        v, g = jax.value_and_grad(loss)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, v

    opt = tx.init(params)
    first = float(loss(params))
    for _ in range(100):
        params, opt, _ = step(params, opt)
    assert float(loss(params)) < 0.2 * first, (first, float(loss(params)))
    assert float(S.cikd_loss(nnx.merge(graph, params)(x, 1.0), nnx.merge(graph, params)(x, 1.0))) == 0.0


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_inplace_distillation_per_task_forms_against_numpy():
    rng = np.random.default_rng(3)
    shapes = {"seg": (2, 3, 3, 4), "depth": (2, 3, 3, 1), "edges": (2, 3, 3, 1), "cls": (2, 3)}
    s = {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
    t = {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
    got = np.asarray(S.inplace_distillation_loss(TASKS, s, t))

    def kl(ts, ss):
        lt, ls = _np_log_softmax(ts), _np_log_softmax(ss)
        return (np.exp(lt) * (lt - ls)).sum(-1).mean()

    def bkl(ts, ss):
        pt, ps = 1 / (1 + np.exp(-ts)), 1 / (1 + np.exp(-ss))
        return (pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))).mean()

    want = [kl(t["seg"], s["seg"]), np.abs(s["depth"] - t["depth"]).mean(), bkl(t["edges"], s["edges"]),
            kl(t["cls"], s["cls"])]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_allclose(S.inplace_distillation_loss(TASKS, t, t), 0.0, atol=1e-6)
    g = jax.grad(lambda tt: S.inplace_distillation_loss(TASKS, s, tt).sum())({k: jnp.asarray(v) for k, v in t.items()})
    assert all(float(jnp.abs(v).sum()) == 0.0 for v in g.values())


def test_sandwich_sampler_structure_determinism_and_coverage():
    smp = S.SandwichSampler(S.WIDTHS, ("seg", "depth"), n=4, seed=7)
    c = smp.configs(5)
    assert len(c) == 4 and c[0] == S.WidthConfig.uniform(1.0, ["seg", "depth"])
    assert c[1] == S.WidthConfig.uniform(0.25, ["seg", "depth"])
    assert c == smp.configs(5) and c != smp.configs(6)
    seen = {"enc": set(), "seg": set(), "depth": set()}
    for step in range(60):
        for cfg in smp.configs(step)[2:]:
            cfg.validate(S.WIDTHS, ["seg", "depth"])
            seen["enc"].add(cfg.encoder)
            seen["seg"].add(cfg.decoder("seg"))
            seen["depth"].add(cfg.decoder("depth"))
    assert all(v == set(S.WIDTHS) for v in seen.values())
    assert len(S.SandwichSampler((0.5, 1.0), ("a", "b"), n=3).pool) == 8        # whole 2**3 grid
    big = S.SandwichSampler(S.WIDTHS, ("a", "b", "c"), n=3, pool_size=16, seed=1)
    assert len(big.pool) == 16 == len(set(big.pool)) and big.pool == S.SandwichSampler(
        S.WIDTHS, ("a", "b", "c"), n=3, pool_size=16, seed=1).pool
    # groups: the pool shuffled and cut into groups of n - 2; every pool entry in some group
    g3 = S.SandwichSampler(S.WIDTHS, ("a", "b", "c"), n=5, pool_size=10, seed=1)
    assert len(g3.groups) == 4 and all(len(g) == 3 for g in g3.groups)       # ceil(10 / 3), last wraps
    flat = [c for g in g3.groups for c in g]
    assert set(flat) == set(g3.pool) and len(set(flat[:10])) == 10 and flat[10:] == flat[:2]
    assert S.SandwichSampler(S.WIDTHS, ("a",), n=2).groups == ((),)
    with pytest.raises(ValueError, match="n >= 2"):
        S.SandwichSampler(S.WIDTHS, ("a",), n=1)


def _model(tasks=tuple(TASKS[:2])):
    tasks = list(tasks)
    return tasks, build(lambda: S.SlimmableMultiTask(S.SlimCNN((8, 8, 1), channels=(8,), groups=4, rngs=nnx.Rngs(0)),
                                                     tasks, output_hw=(8, 8), decoder_channels=8, groups=4,
                                                     rngs=nnx.Rngs(1)), seed=4, scale=0.3)


def _batch(n=4):
    rng = np.random.default_rng(5)
    return {"inputs": jnp.asarray(rng.normal(size=(n, 8, 8, 1)).astype(np.float32)),
            "labels": {"seg": jnp.asarray(rng.integers(0, 4, (n, 8, 8))),
                       "depth": jnp.asarray(rng.uniform(size=(n, 8, 8, 1)).astype(np.float32))}}


def _manual(m, tasks, batch, configs, sub_labels=True):
    teacher = m.forward(batch["inputs"], configs[0])
    lab = losses_from_outputs(tasks, teacher.outputs, batch)
    kd, ck = 0.0, 0.0
    for cfg in configs[1:]:
        out = m.forward(batch["inputs"], cfg)
        if sub_labels:
            lab = lab + losses_from_outputs(tasks, out.outputs, batch)
        kd = kd + jnp.mean(S.inplace_distillation_loss(tasks, out.outputs, teacher.outputs))
        ck = ck + S.cikd_loss(out.features, teacher.features)
    return lab, kd, ck


@pytest.mark.parametrize("sub_labels", [True, False])
def test_sandwich_losses_host_sampling_equal_the_manual_composition(sub_labels):
    tasks, m = _model()
    graph, state = nnx.split(m)
    smp = S.SandwichSampler(m.widths, [t.name for t in tasks], n=3, seed=0)
    batch = _batch()

    @jax.jit
    def both(state, batch):
        mm = nnx.merge(graph, state)
        got = S.sandwich_losses(mm, batch, tasks, smp, step=3, sub_labels=sub_labels)
        return (got.labelled, got.distill, got.cikd), _manual(mm, tasks, batch, smp.configs(3), sub_labels)

    got, want = both(state, batch)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    assert float(got[1]) > 0 and float(got[2]) > 0


def test_sandwich_losses_of_a_group_use_that_groups_configurations():
    tasks, m = _model(TASKS[:1])
    smp = S.SandwichSampler((0.5, 1.0), [t.name for t in tasks], n=3, seed=0)   # a pool of 2**2 configs
    m.widths = (0.5, 1.0)  # a model trained at these two widths (norm parameters exist for all four)
    graph, state = nnx.split(m)
    batch = _batch()
    assert len(smp.groups) == 4
    for g in (0, 3):
        got = jax.jit(lambda s, b: (lambda r: (r.labelled, r.distill, r.cikd))(
            S.sandwich_losses(nnx.merge(graph, s), b, tasks, smp, group=g)))(state, batch)
        configs = (smp.widest, smp.narrowest) + smp.groups[g]
        want = jax.jit(lambda s, b: _manual(nnx.merge(graph, s), tasks, b, configs))(state, batch)
        for a, w in zip(got, want):
            np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="exactly one of step="):
        S.sandwich_losses(m, batch, tasks, smp)
    with pytest.raises(ValueError, match="group must be in 0..3"):
        S.sandwich_losses(m, batch, tasks, smp, group=4)


@pytest.mark.slow
def test_sandwich_gradient_of_a_group_is_finite_and_reaches_every_part():
    tasks, m = _model(TASKS[:1])
    smp = S.SandwichSampler((0.5, 1.0), [t.name for t in tasks], n=3, seed=0)
    m.widths = (0.5, 1.0)
    graph, params, rest = nnx.split(m, nnx.Param, ...)
    batch = _batch()
    loss = lambda p: S.sandwich_losses(nnx.merge(graph, p, rest), batch, tasks, smp, group=1).total()
    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(v)).all() for v in leaves)
    assert float(sum(jnp.abs(v).sum() for v in leaves)) > 0
