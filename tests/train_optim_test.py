"""Per-task gradient aggregation inside the train step (config.optim), against
independent references: per-task gradients taken one task at a time with jax.grad,
the 2-task MGDA closed form in numpy, hand-built F-MTL perturbations; sharded = single
device; partial labels; diagnostics; exact resume with a stateful method; bad input."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import sharding as shd
from mtl.nn import heads
from mtl.nn.encoders import build_encoder
from mtl.nn.multitask import MultiTaskModel
from mtl.tasks import Task
from mtl.train.optimizer import make_optimizer
from mtl.train.step import Steps
from tiny_runs import read_metrics, tiny_config as _tiny_config

TASKS = [Task("cls", heads.Classification(4)), Task("reg", heads.Regression(2))]


def factory(rngs):
    return MultiTaskModel(build_encoder("mlp", (6,), rngs=rngs, hidden=(8,)), TASKS, rngs=rngs)


def make_batch(rng, n, partial=True):
    return {
        "inputs": rng.normal(size=(n, 6)).astype(np.float32),
        "labels": {"cls": rng.integers(0, 4, n).astype(np.int32), "reg": rng.normal(size=(n, 2)).astype(np.float32)},
        "masks": {"cls": np.ones(n, bool), "reg": (rng.random(n) > 0.3) if partial else np.ones(n, bool)},
    }


def sgd1():
    return make_optimizer("sgd", 1.0, 10, schedule="constant", momentum=0.0)


def one_device():
    return shd.make_mesh({"data": 1}, jax.devices()[:1])


def reference_grads(steps, state, b):
    """Per-task gradients, one task at a time (no Jacobian machinery), as flat numpy
    vectors split into (encoder, heads) parts, plus per-task grads w.r.t. the representation."""
    graphdef, params, rest = nnx.split(steps.model(state.params), nnx.Param, ...)
    x = jnp.asarray(b["inputs"])

    def loss_t(out, t):
        if t == 0:
            logp = jax.nn.log_softmax(out)
            return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(b["labels"]["cls"])[:, None], 1))
        mask = jnp.asarray(b["masks"]["reg"])
        per = jnp.mean((out - jnp.asarray(b["labels"]["reg"])) ** 2, axis=1)
        return jnp.sum(per * mask) / jnp.maximum(mask.sum(), 1)

    def task_loss(p, t):
        return loss_t(nnx.merge(graphdef, p, rest)(x)[TASKS[t].name], t)

    def rep_loss(z, t):
        m = nnx.merge(graphdef, params, rest)
        return loss_t(m.heads[TASKS[t].name](z), t)

    z = nnx.merge(graphdef, params, rest).features(x)
    gs = [jax.grad(task_loss)(params, t) for t in range(2)]
    enc = [np.concatenate([np.ravel(a) for a in jax.tree.leaves(g["encoder"])]) for g in gs]
    hd = [jax.tree.map(np.asarray, g["heads"]) for g in gs]
    gz = [np.asarray(jax.grad(rep_loss)(z, t)).ravel() for t in range(2)]

    def enc_grad(w):  # ∇_enc Σ w_t L_t with w held constant
        g = jax.grad(lambda p: sum(w[t] * task_loss(p, t) for t in range(2)))(params)
        return np.concatenate([np.ravel(a) for a in jax.tree.leaves(g["encoder"])])

    return enc, hd, gz, enc_grad


def mgda2(g1, g2):
    """Closed-form 2-task MGDA (Sener & Koltun): w1 = clip((g2-g1)·g2/‖g1-g2‖², 0, 1)."""
    d = g1 - g2
    w1 = np.clip(np.dot(g2 - g1, g2) / max(np.dot(d, d), 1e-30), 0.0, 1.0)
    return np.array([w1, 1 - w1])


def flat_delta(p0, p1, part):
    return np.concatenate([np.ravel(np.asarray(b) - np.asarray(a))
                           for a, b in zip(jax.tree.leaves(p0[part]), jax.tree.leaves(p1[part]))])


@pytest.mark.parametrize("grad_on,head_grads,jacobian", [("params", "plain", "keep"),
                                                          ("representation", "plain", "keep"),
                                                          ("representation", "weighted", "keep"),
                                                          ("params", "weighted", "stream")])
def test_mgda_step_matches_per_task_reference(grad_on, head_grads, jacobian):
    rng = np.random.default_rng(0)
    b = make_batch(rng, 16)
    steps = Steps(factory, TASKS, sgd1(), one_device(),
                  optim=dict(aggregator="mgda", grad_on=grad_on, head_grads=head_grads, jacobian=jacobian))
    state = steps.init()
    enc, hd, gz, enc_grad = reference_grads(steps, state, b)
    p0 = jax.device_get(state.params)
    state, m = steps.step(state, steps.put_batch(b), diagnostics=True)
    p1 = jax.device_get(state.params)
    gv = enc if grad_on == "params" else gz
    w = mgda2(*gv)
    np.testing.assert_allclose(np.asarray(m["weights"]), w, rtol=2e-3, atol=2e-4)
    # shared update = -(w1 g1 + w2 g2); heads get their own unweighted gradient ("plain")
    # or w_t times it ("weighted")
    np.testing.assert_allclose(flat_delta(p0, p1, "encoder"), -enc_grad(w), rtol=2e-3, atol=1e-5)
    hw = w if head_grads == "weighted" else np.ones(2)
    for t, name in enumerate(["cls", "reg"]):
        for a, c, g in zip(jax.tree.leaves(p0["heads"][name]), jax.tree.leaves(p1["heads"][name]),
                           jax.tree.leaves(hd[t][name])):
            np.testing.assert_allclose(np.asarray(c) - np.asarray(a), -hw[t] * g, rtol=2e-3, atol=1e-6)
    # diagnostics from the same per-task gradients
    cos = np.dot(gv[0], gv[1]) / np.linalg.norm(gv[0]) / np.linalg.norm(gv[1])
    np.testing.assert_allclose(float(m["cosines"][0, 1]), cos, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m["grad_norms"]), [np.linalg.norm(g) for g in gv], rtol=1e-4)
    assert float(m["conflict_fraction"]) == float(cos < 0)


def test_loss_weighting_scales_only_the_shared_gradient():
    """RLW (random weights, read back from the step's metrics): encoder moves by
    -Σ w_t g_t, each head by minus its own unweighted gradient."""
    rng = np.random.default_rng(1)
    b = make_batch(rng, 16)
    steps = Steps(factory, TASKS, sgd1(), one_device(), optim=dict(aggregator="rlw"))
    state = steps.init()
    _, hd, _, enc_grad = reference_grads(steps, state, b)
    p0 = jax.device_get(state.params)
    state, m = steps.step(state, steps.put_batch(b))
    w = np.asarray(m["weights"])
    assert abs(w[0] - w[1]) > 1e-3 and abs(w.sum() - 1) < 1e-5
    np.testing.assert_allclose(flat_delta(jax.device_get(p0), jax.device_get(state.params), "encoder"),
                               -enc_grad(w), rtol=1e-4, atol=1e-6)
    p1 = jax.device_get(state.params)
    for a, c, g in zip(jax.tree.leaves(p0["heads"]["reg"]), jax.tree.leaves(p1["heads"]["reg"]),
                       jax.tree.leaves(hd[1]["reg"])):
        np.testing.assert_allclose(np.asarray(c) - np.asarray(a), -g, rtol=1e-4, atol=1e-6)


def test_absent_task_gets_zero_weight():
    rng = np.random.default_rng(2)
    b = make_batch(rng, 16)
    b["masks"]["reg"][:] = False
    b["labels"]["reg"][:] = np.nan
    steps = Steps(factory, TASKS, sgd1(), one_device(), optim=dict(aggregator="mgda"))
    state = steps.init()
    enc, _, _, _ = reference_grads(steps, state, b)
    p0 = jax.device_get(state.params)
    state, m = steps.step(state, steps.put_batch(b))
    assert bool(m["ok"])
    np.testing.assert_array_equal(np.asarray(m["weights"]), [1.0, 0.0])
    np.testing.assert_allclose(flat_delta(p0, jax.device_get(state.params), "encoder"), -enc[0],
                               rtol=1e-4, atol=1e-6)


def test_fmtl_update_matches_hand_computation():
    """EW + F-MTL: shared update = -(Σ g_t + Σ h_t), h_t = ∇L_t(θ + ρ g_t/‖g_t‖) - g_t."""
    rng = np.random.default_rng(3)
    b = make_batch(rng, 16)
    rho = 0.3
    steps = Steps(factory, TASKS, sgd1(), one_device(), optim=dict(aggregator="ew", fmtl_rho=rho))
    state = steps.init()
    graphdef, params, rest = nnx.split(steps.model(state.params), nnx.Param, ...)
    enc, _, _, _ = reference_grads(steps, state, b)
    flat0, unravel = jax.flatten_util.ravel_pytree(params["encoder"])

    def task_loss_enc(flat_enc, t):
        p = jax.tree.map(lambda v: v, params)
        p["encoder"] = unravel(flat_enc)
        out = nnx.merge(graphdef, p, rest)(jnp.asarray(b["inputs"]))[TASKS[t].name]
        if t == 0:
            logp = jax.nn.log_softmax(out)
            return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(b["labels"]["cls"])[:, None], 1))
        mask = jnp.asarray(b["masks"]["reg"])
        return jnp.sum(jnp.mean((out - jnp.asarray(b["labels"]["reg"])) ** 2, axis=1) * mask) / mask.sum()

    g = [np.asarray(jax.grad(task_loss_enc)(flat0, t)) for t in range(2)]
    np.testing.assert_allclose(np.sort(np.concatenate(g)), np.sort(np.concatenate(enc)), rtol=1e-5, atol=1e-7)
    gt = [np.asarray(jax.grad(task_loss_enc)(flat0 + rho * g[t] / np.linalg.norm(g[t]), t)) for t in range(2)]
    expected = -(gt[0] + gt[1])  # Σ g + Σ (g~ - g)
    p0 = jax.device_get(state.params)
    state, m = steps.step(state, steps.put_batch(b))
    delta = np.asarray(jax.flatten_util.ravel_pytree(jax.device_get(state.params)["encoder"])[0]) - np.asarray(
        jax.flatten_util.ravel_pytree(p0["encoder"])[0])
    np.testing.assert_allclose(delta, expected, rtol=1e-4, atol=1e-6)


def test_sparse_training_updates_only_the_mask():
    rng = np.random.default_rng(4)
    steps = Steps(factory, TASKS, make_optimizer("adam", 1e-2, 10), one_device(),
                  optim=dict(aggregator="pcgrad", sparse_fraction=0.25))
    state = steps.init()
    p0 = jax.device_get(state.params)
    enc0 = np.concatenate([np.abs(np.ravel(a)) for a in jax.tree.leaves(p0["encoder"])])
    for _ in range(3):
        state, m = steps.step(state, steps.put_batch(make_batch(rng, 16)))
    p1 = jax.device_get(state.params)
    moved = flat_delta(p0, p1, "encoder") != 0
    keep = np.zeros(enc0.size, bool)
    keep[np.argsort(-enc0, kind="stable")[:int(round(0.25 * enc0.size))]] = True
    assert moved.any() and not moved[~keep].any()
    assert np.any(flat_delta(p0, p1, "heads") != 0)


def test_saliency_mask_is_chosen_on_the_first_step_and_kept():
    """optim.sparse_criterion="saliency": the mask is the top fraction of |θ ⊙ ∇Σ_t L_t| on
    the first batch (numpy top-k of per-task reference gradients), only those entries move,
    and later steps keep the same mask."""
    rng = np.random.default_rng(11)
    b0, b1 = make_batch(rng, 16), make_batch(rng, 16)
    steps = Steps(factory, TASKS, make_optimizer("adam", 1e-2, 10), one_device(),
                  optim=dict(aggregator="mgda", sparse_fraction=0.3, sparse_criterion="saliency"))
    state = steps.init()
    enc, _, _, _ = reference_grads(steps, state, b0)
    p0 = jax.device_get(state.params)
    theta = np.concatenate([np.ravel(a) for a in jax.tree.leaves(p0["encoder"])])
    score = np.abs(theta * (enc[0] + enc[1]))
    keep = np.zeros(theta.size, bool)
    keep[np.argsort(-score, kind="stable")[:int(round(0.3 * theta.size))]] = True
    state, _ = steps.step(state, steps.put_batch(b0))
    mask0 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(jax.device_get(state.sparse_mask))])
    np.testing.assert_array_equal(mask0, keep)
    state, _ = steps.step(state, steps.put_batch(b1))
    mask1 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(jax.device_get(state.sparse_mask))])
    np.testing.assert_array_equal(mask1, keep)
    moved = flat_delta(p0, jax.device_get(state.params), "encoder") != 0
    assert moved.any() and not moved[~keep].any()


def test_famo_same_batch_update_matches_the_pure_functions():
    """FAMO's default update_on="same_batch": after the step, the logits take one update
    from (losses before, losses of the updated model on the same batch), recomputed here
    with the aggregator's pure functions and an independent forward pass."""
    from mtl.optim import get_aggregator
    from mtl.train.grad_tools import present_mask
    from mtl.train.step import task_losses
    rng = np.random.default_rng(12)
    b = make_batch(rng, 16)
    steps = Steps(factory, TASKS, sgd1(), one_device(), optim=dict(aggregator="famo"))
    state = steps.init()
    state, m = steps.step(state, steps.put_batch(b))
    agg = get_aggregator("famo")
    present = present_mask(TASKS, jax.tree.map(jnp.asarray, b))
    w, st = agg.weights(agg.init(2), losses=jnp.asarray(m["losses"]), present=present)
    np.testing.assert_allclose(np.asarray(m["weights"]), np.asarray(w), rtol=1e-6)
    after = task_losses(steps.model(state.params), jax.tree.map(jnp.asarray, b), TASKS)
    expected = agg.update(st, losses=after, present=present)
    np.testing.assert_allclose(np.asarray(state.agg_state["main"][0]), np.asarray(expected[0]),
                               rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(expected[0])).max() > 0  # the logits did move
    # the next-batch variant leaves the logits untouched until the next step
    steps2 = Steps(factory, TASKS, sgd1(), one_device(),
                   optim=dict(aggregator="famo", hparams=dict(update_on="next_batch")))
    s2, _ = steps2.step(steps2.init(), steps2.put_batch(b))
    assert np.abs(np.asarray(s2.agg_state["main"][0])).max() == 0


@pytest.mark.parametrize("grad_on,jacobian", [("params", "keep"), ("representation", "keep"),
                                              ("params", "stream")])
def test_sharded_jacobian_step_equals_single_device(grad_on, jacobian):
    rng = np.random.default_rng(5)
    batches = [make_batch(rng, 32) for _ in range(3)]

    def fac(rngs):
        return MultiTaskModel(build_encoder("mlp", (6,), rngs=rngs, hidden=(32, 16)), TASKS, rngs=rngs)

    def run_on(axes, devices):
        mesh = shd.make_mesh(axes, devices)
        steps = Steps(fac, TASKS, make_optimizer("sgd", 0.05, 10, schedule="constant"), mesh,
                      optim=dict(aggregator="mgda", grad_on=grad_on, jacobian=jacobian))
        state = steps.init()
        ws = []
        for b in batches:
            state, m = steps.step(state, steps.put_batch(b))
            ws.append(np.asarray(m["weights"]))
        return state, np.stack(ws)

    s1, w1 = run_on({"data": 1}, jax.devices()[:1])
    s8, w8 = run_on({"data": 2, "fsdp": 4}, jax.devices())
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(s8.params))
    np.testing.assert_allclose(w8, w1, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(s1.params)), jax.tree.leaves(jax.device_get(s8.params))):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_unknown_aggregator_lists_valid_names():
    from mtl.config import apply_overrides, base_config, with_defaults
    cfg = apply_overrides(base_config(), ["optim.aggregator=cagrd"])
    with pytest.raises(ValueError, match=r"unknown aggregator 'cagrd'.*cagrad.*upgrad"):
        with_defaults(cfg)
    cfg = apply_overrides(base_config(), ["optim.aggregator=cagrad", "optim.hparams.c=0.5"])
    assert with_defaults(cfg).optim.hparams.c == 0.5
    with pytest.raises(TypeError, match=r"unknown hyper-parameter.*cc"):
        with_defaults(apply_overrides(base_config(), ["optim.aggregator=cagrad", "optim.hparams.cc=0.5"]))
    with pytest.raises(ValueError, match="grad_on"):
        with_defaults(apply_overrides(base_config(), ["optim.grad_on=reps"]))


# ------------------------------------------------------------------ through the loop
def tiny_config(steps=30, **optim):
    return _tiny_config(steps=steps, num_tasks=3, correlation=0.0, optim=optim)


def test_diagnostics_are_logged(tmp_path):
    from mtl.train.loop import run
    wd = str(tmp_path / "run")
    run(tiny_config(steps=10, aggregator="dwa", diagnostics_every=4), wd)
    diag = [r for r in read_metrics(wd) if r["split"] == "diagnostics"]
    assert [r["step"] for r in diag] == [4, 8]
    for r in diag:
        cos = np.array(list(r["cosines"].values()))
        assert len(cos) == 3 and np.all(np.abs(cos) <= 1)
        assert r["conflict_fraction"] == pytest.approx(np.mean(cos < 0))
        assert all(v > 0 for v in r["grad_norms"].values())
        assert sum(r["weights"].values()) == pytest.approx(3.0, rel=1e-5)  # DWA: Σ w = T
    train = [r for r in read_metrics(wd) if r["split"] == "train"]
    assert set(train[0]["weights"]) == {"t0", "t1", "t2"}


@pytest.mark.parametrize("aggregator", ["famo"])
def test_resume_with_stateful_aggregator_is_exact(tmp_path, aggregator):
    """(FAMO, same-batch update: the extra forward pass and the logits' state resume exactly)"""
    from mtl.checkpoint import CheckpointStore
    from mtl.train.loop import run
    cfg = tiny_config(steps=30, aggregator=aggregator)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run(cfg, full)
    run(cfg, part, _stop_after=14)
    assert CheckpointStore(os.path.join(part, "checkpoints")).latest_step() == 10
    run(cfg, part)
    ra, rb = (json.load(open(os.path.join(d, "results.json"))) for d in (full, part))
    assert ra["test"] == rb["test"] and ra["val"] == rb["val"]
    ma, mb = read_metrics(full), read_metrics(part)
    assert ma == mb
    w = [r["weights"] for r in ma if r["split"] == "train"]
    assert w[0] != w[-1]  # the state really evolves (so restoring it matters)


def test_nan_with_a_jacobian_method_names_task(tmp_path, monkeypatch):
    from mtl.data import registry
    from mtl.data.base import ArraySource, DataBundle, TaskInfo
    from mtl.train.loop import NonFiniteLossError, run

    def bundle():
        r = np.random.default_rng(0)
        x = r.normal(size=(64, 4)).astype(np.float32)
        y2 = x[:, :1].copy()
        y2[:] = np.inf
        src = ArraySource(x, {"good": x.sum(1, keepdims=True), "bad": y2})
        return DataBundle("nan2", [TaskInfo("good", "regression", 1), TaskInfo("bad", "regression", 1)],
                          train=src, test=src, val=src, input_shape=(4,))

    monkeypatch.setitem(registry.DATASETS, "nan2", bundle)
    cfg = tiny_config(steps=5, aggregator="cagrad")
    cfg.data.name, cfg.data.kwargs = "nan2", {}
    with pytest.raises(NonFiniteLossError, match=r"task 'bad' became NaN/inf at step 1;"):
        run(cfg, str(tmp_path / "run"))


def test_rep_mtl_penalty_matches_numpy_and_enters_the_update():
    from mtl.train.routes import rep_mtl_penalty
    rng = np.random.default_rng(6)
    sal = rng.normal(size=(3, 5, 4)).astype(np.float32)
    present = np.array([True, True, False])
    # numpy re-derivation of the documented normalisation (present tasks 0 and 1 only)
    a = np.abs(sal)
    a = a / (a.mean(axis=(1, 2), keepdims=True) + 1e-8)
    a = a * present[:, None, None]
    p = a / (a.sum(0, keepdims=True) + 1e-8)
    neg_ent = np.mean(np.sum(p * np.log(p + 1e-8), axis=0))
    v = sal / np.sqrt(np.sum(sal ** 2, axis=-1, keepdims=True) + 1e-16)
    logits = v[0] @ v[1].T / 0.1
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = neg_ent - np.mean(np.diag(logp))
    np.testing.assert_allclose(float(rep_mtl_penalty(jnp.asarray(sal), jnp.asarray(present))), expected,
                               rtol=1e-4)
    assert float(rep_mtl_penalty(jnp.asarray(sal), jnp.asarray([True, False, False]))) == 0.0
    # in the step: the encoder update changes, the heads' do not
    b = make_batch(rng, 16)
    outs = []
    for lam in (0.0, 1.0):
        steps = Steps(factory, TASKS, sgd1(), one_device(),
                      optim=dict(aggregator="ew", grad_on="representation", rep_mtl=lam))
        state = steps.init()
        p0 = jax.device_get(state.params)
        state, m = steps.step(state, steps.put_batch(b))
        assert bool(m["ok"])
        p1 = jax.device_get(state.params)
        outs.append((flat_delta(p0, p1, "encoder"), flat_delta(p0, p1, "heads")))
    assert np.abs(outs[0][0] - outs[1][0]).max() > 1e-6
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregator", ["pcgrad", "upgrad"])
def test_streamed_gramian_gives_the_kept_jacobian_update(aggregator):
    """optim.jacobian="stream" (G reduced block by block, update from one more backward
    pass) trains exactly like "keep" (update read off the stored J), with partial labels,
    a sparse mask and weighted heads."""
    rng = np.random.default_rng(7)
    batches = [make_batch(rng, 16) for _ in range(3)]
    runs = []
    for jac in ("keep", "stream"):
        steps = Steps(factory, TASKS, make_optimizer("sgd", 0.1, 10, schedule="constant"), one_device(),
                      optim=dict(aggregator=aggregator, jacobian=jac, sparse_fraction=0.5, head_grads="weighted"))
        state = steps.init()
        ws = []
        for b in batches:
            state, m = steps.step(state, steps.put_batch(b))
            ws.append(np.asarray(m["weights"]))
        runs.append((jax.device_get(state.params), np.stack(ws)))
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-6)
    for a, c in zip(jax.tree.leaves(runs[0][0]), jax.tree.leaves(runs[1][0])):
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)


def test_stream_with_fmtl_is_rejected():
    with pytest.raises(ValueError, match="stream"):
        Steps(factory, TASKS, sgd1(), one_device(), optim=dict(aggregator="mgda", jacobian="stream", fmtl_rho=0.05))


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_diagnostics_step_applies_the_fixed_loss_weights(accum_steps):
    """Plain EW with train.loss_weights: a diagnostics step (per-task Jacobian path) applies
    the same weighted update as an ordinary step, heads included."""
    b = make_batch(np.random.default_rng(13), 16)
    params = []
    for diag in (False, True):
        steps = Steps(factory, TASKS, sgd1(), one_device(), loss_weights=[3.0, 0.5], accum_steps=accum_steps)
        state, m = steps.step(steps.init(), steps.put_batch(b), diagnostics=diag)
        np.testing.assert_allclose(np.asarray(m["weights"]), [3.0, 0.5])
        params.append(jax.device_get(state.params))
    for a, c in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)


def test_solver_certificate_is_in_the_diagnostics():
    """The exact solver's certificate of the step's weights reaches the step's metrics, and
    equals the one the aggregator reports for the same Gramian."""
    from mtl.optim import get_aggregator

    rng = np.random.default_rng(3)
    b = make_batch(rng, 16)
    steps = Steps(factory, TASKS, sgd1(), one_device(), optim=dict(aggregator="upgrad"))
    state = steps.init()
    enc, _, _, _ = reference_grads(steps, state, b)
    _, m = steps.step(state, steps.put_batch(b))
    g = np.stack(enc) @ np.stack(enc).T
    agg = get_aggregator("upgrad")
    _, _, info = agg.weights_info(agg.init(2), gram=jnp.asarray(g, jnp.float32))
    assert float(m["solver_certificate"]) < 1e-4
    np.testing.assert_allclose(float(m["solver_certificate"]), float(info["certificate"]), atol=1e-5)
