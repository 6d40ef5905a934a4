"""Gradient accumulation (``train.accum_steps``): K micro-batches give the full-batch update
(also with partial labels, also sharded on 8 devices), the pooled global-batch LBL of an
M³ViT equals ``accumulated_load_balancing_loss(pooled=True)`` re-derived per micro-batch,
every aggregator's accumulated step equals its K = 1 step (MGDA on the parameters and on the
representation, FAMO with its same-batch post update, RLW, saliency masks, diagnostics),
bad splits and the settings that cannot be exact are refused, and resume stays exact."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import sharding as shd
from mtl.config import base_config, with_defaults
from mtl.nn import heads
from mtl.nn.encoders import build_encoder
from mtl.nn.moe import M3ViT, accumulated_load_balancing_loss
from mtl.nn.multitask import MultiTaskModel
from mtl.tasks import Task, losses_from_outputs
from mtl.train.loop import run
from mtl.train.optimizer import make_optimizer
from mtl.train.step import Steps
from tiny_runs import read_metrics, tiny_config

TASKS = [Task("cls", heads.Classification(4)), Task("reg", heads.Regression(2))]


def mlp_factory(rngs):
    return MultiTaskModel(build_encoder("mlp", (12,), rngs=rngs, hidden=(16,)), TASKS, rngs=rngs)


def make_batch(n, seed=0, partial=True):
    rng = np.random.default_rng(seed)
    reg_mask = np.ones(n, bool)
    if partial:  # unequal label counts per micro-batch; one task label-free in some micro-batches
        reg_mask = rng.random(n) > 0.4
        reg_mask[1::4] = False
    return {"inputs": rng.normal(size=(n, 12)).astype(np.float32),
            "labels": {"cls": rng.integers(0, 4, n).astype(np.int32),
                       "reg": rng.normal(size=(n, 2)).astype(np.float32)},
            "masks": {"cls": np.ones(n, bool), "reg": reg_mask}}


def one_step(k, axes, devices, batch, factory=mlp_factory, tasks=TASKS, **kw):
    steps = Steps(factory, tasks, make_optimizer("sgd", 0.5, 10, schedule="constant", momentum=0.0),
                  shd.make_mesh(axes, devices), accum_steps=k, **kw)
    state, m = steps.step(steps.init(), steps.put_batch(batch))
    return steps, jax.device_get(state.params), jax.device_get(m)


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, **tol)


def test_accumulated_step_equals_full_batch_step_with_partial_labels():
    batch = make_batch(32)   # unequal label counts per micro-batch: exact by label-count weighting
    one = jax.devices()[:1]
    _, p1, m1 = one_step(1, {"data": 1}, one, batch)
    for k in (2, 4):
        _, pk, mk = one_step(k, {"data": 1}, one, batch)
        assert_trees_close(pk, p1, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(mk["losses"], m1["losses"], rtol=1e-6)
        np.testing.assert_allclose(mk["grad_norm"], m1["grad_norm"], rtol=1e-5)
        assert bool(mk["ok"])


def test_accumulated_step_sharded_on_8_devices_and_split_moves_no_data():
    batch = make_batch(32, seed=1)
    _, p1, m1 = one_step(1, {"data": 1}, jax.devices()[:1], batch)
    steps, p8, m8 = one_step(2, {"data": 8}, jax.devices(), batch)
    assert_trees_close(p8, p1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m8["losses"], m1["losses"], rtol=1e-6)
    # the strided micro-batch split is local to every device (no all-to-all / gather of the
    # batch); only the gradient and label-count sums are all-reduced
    with steps.activate():
        hlo = steps.train_step.lower(steps.init(), steps.put_batch(batch)).compile().as_text()
    colls = set(re.findall(r"(all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)", hlo))
    assert colls <= {"all-reduce"}, colls


def test_nan_in_one_micro_batch_skips_the_whole_step():
    steps = Steps(mlp_factory, TASKS, make_optimizer("sgd", 0.5, 10), shd.make_mesh({"data": 1}, jax.devices()[:1]),
                  accum_steps=4)
    state = steps.init()
    p0 = jax.device_get(state.params)
    batch = make_batch(32)
    batch["inputs"][5, 0] = np.nan        # sample 5 is in micro-batch 1 (strided split)
    state, m = steps.step(state, steps.put_batch(batch))
    assert not bool(m["ok"]) and int(state.nonfinite_count) == 1
    assert [int(v) for v in state.first_nonfinite] == [0, 0]
    assert_trees_close(jax.device_get(state.params), p0, rtol=0, atol=0)


def test_micro_batch_split_is_strided():
    steps = Steps(mlp_factory, TASKS, make_optimizer("sgd", 0.1, 10), shd.make_mesh({"data": 1}, jax.devices()[:1]),
                  accum_steps=4)
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    with steps.activate():
        micro = jax.jit(steps.split_micro_batches)({"inputs": x})["inputs"]
    for m in range(4):
        np.testing.assert_array_equal(micro[m], x[m::4])


# ---------------------------------------------------------------- pooled load-balancing loss
VIT = dict(patch=4, dim=16, depth=2, num_heads=2, num_experts=4, k=2, expert_hidden=8, capacity_factor=None,
           lbl="global", lbl_weight=1.0, z_weight=0.0, impl="dense")
VTASKS = [Task("a", heads.Classification(3)), Task("b", heads.Regression(2))]


def vit_factory(rngs):
    return M3ViT((8, 8, 1), VTASKS, rngs=rngs, **VIT)


def np_stats(probs, idx, e):
    """(counts [E], mean probs [E]) of one micro-batch, in numpy."""
    probs, idx = np.asarray(probs).reshape(-1, e), np.asarray(idx).reshape(-1)
    return np.bincount(idx, minlength=e).astype(np.float64), probs.mean(0)


def test_pooled_lbl_equals_accumulated_lbl_from_micro_batch_statistics():
    k, e, n = 2, VIT["num_experts"], 8
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.random((n, 8, 8, 1)).astype(np.float32),
             "labels": {"a": rng.integers(0, 3, n).astype(np.int32), "b": rng.normal(size=(n, 2)).astype(np.float32)}}
    steps = Steps(vit_factory, VTASKS, make_optimizer("sgd", 1.0, 10), shd.make_mesh({"data": 1}, jax.devices()[:1]),
                  accum_steps=k)
    assert steps.pool_routing
    state = steps.init()
    params, rest, gd = state.params, state.rest, steps.graphdef
    with steps.activate():
        grads, losses, aux_loss, _ = jax.jit(steps.accumulated_gradients)(params, rest, batch)

    # per-micro-batch routing statistics (the documented strided split), re-derived in numpy
    micro = [{"inputs": batch["inputs"][j::k], "labels": {t: v[j::k] for t, v in batch["labels"].items()}}
             for j in range(k)]
    fwd = jax.jit(lambda p, x: nnx.merge(gd, p, rest).forward_with_aux(x)[1]["routing"])
    routing = [fwd(params, mb["inputs"]) for mb in micro]
    layers = [(t, l) for t in ("a", "b") for l in range(len(routing[0]["a"]))]
    stats = {tl: [np_stats(r[tl[0]][tl[1]]["probs"], r[tl[0]][tl[1]]["indices"], e) for r in routing]
             for tl in layers}
    np_pooled, np_micro = [], []
    for tl in layers:
        counts, probs = np.stack([s[0] for s in stats[tl]]), np.stack([s[1] for s in stats[tl]])
        f_pool = counts.sum(0) / counts.sum()
        np_pooled.append(np.mean([e * np.sum(f_pool * probs[j]) for j in range(k)]))
        np_micro.append(np.mean([e * np.sum(counts[j] / counts[j].sum() * probs[j]) for j in range(k)]))
    np.testing.assert_allclose(aux_loss, np.mean(np_pooled), rtol=1e-5)
    assert abs(np.mean(np_pooled) - np.mean(np_micro)) > 1e-4      # the micro version is another loss

    # gradient: accumulated_load_balancing_loss on the micro-batches' statistics (counts fixed)
    # plus the task losses (equal micro-batches: the mean of the micro-batch means)
    counts = {tl: jnp.asarray(np.stack([s[0] for s in stats[tl]])) for tl in layers}

    def reference(p):   # [pooled objective, micro objective], and the two LBLs
        model = nnx.merge(gd, p, rest)
        outs = [model.forward_with_aux(mb["inputs"]) for mb in micro]
        task = sum(jnp.sum(losses_from_outputs(VTASKS, o[0], mb)) for o, mb in zip(outs, micro)) / k
        mp = {(t, l): jnp.stack([o[1]["routing"][t][l]["probs"].reshape(-1, e).mean(0) for o in outs])
              for t, l in layers}
        lbl = jnp.stack([jnp.mean(jnp.stack([accumulated_load_balancing_loss(counts[tl], mp[tl], pooled=pooled)
                                             for tl in layers])) for pooled in (True, False)])
        return task + VIT["lbl_weight"] * lbl, lbl

    def ref_grads(p):   # value, LBLs and the gradients of both objectives (one forward)
        v, pullback, lbl = jax.vjp(reference, p, has_aux=True)
        return v, lbl, pullback(jnp.array([1.0, 0.0]))[0], pullback(jnp.array([0.0, 1.0]))[0]

    def full_objective(p):   # the K = 1 step's objective on the whole batch (no injected counts)
        l, aux, _ = steps._losses(p, rest, batch)
        return jnp.sum(l) + aux, aux

    v, lbl, g_pool, g_micro = jax.jit(ref_grads)(params)
    (_, aux1), g1 = jax.jit(jax.value_and_grad(full_objective, has_aux=True))(params)
    np.testing.assert_allclose(lbl[0], aux_loss, rtol=1e-5)
    np.testing.assert_allclose(lbl[1], np.mean(np_micro), rtol=1e-5)
    np.testing.assert_allclose(v[0], jnp.sum(losses) + aux_loss, rtol=1e-5)
    assert_trees_close(grads, g_pool, rtol=1e-4, atol=1e-7)
    diff = max(np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(jax.device_get(g_pool)),
                                                      jax.tree.leaves(jax.device_get(g_micro))))
    assert diff > 1e-4

    # no capacity drops, equal micro-batches: the pooled LBL is the full-batch (K = 1) LBL,
    # and the accumulated gradient is the K = 1 step's gradient
    np.testing.assert_allclose(aux1, aux_loss, rtol=1e-5)
    assert_trees_close(grads, g1, rtol=1e-4, atol=1e-7)
    # K = 1: the existing LBL is both accumulated variants with a single micro-batch
    r1 = fwd(params, batch["inputs"])
    for pooled in (True, False):
        one = [accumulated_load_balancing_loss(*(jnp.asarray(a)[None] for a in np_stats(
            r1[t][l]["probs"], r1[t][l]["indices"], e)), pooled=pooled) for t, l in layers]
        np.testing.assert_allclose(np.mean(one), aux1, rtol=1e-5)


# ---------------------------------------------------------------- errors
def test_non_divisible_batch_is_refused():
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    steps = Steps(mlp_factory, TASKS, make_optimizer("sgd", 0.1, 10), mesh, accum_steps=3)
    with pytest.raises(ValueError, match=r"32 samples .*accum_steps=3"):
        steps.step(steps.init(), steps.put_batch(make_batch(32)))
    c = base_config()
    c.train.batch_size, c.train.accum_steps = 32, 3
    with pytest.raises(ValueError, match=r"batch_size=32 .*accum_steps=3"):
        with_defaults(c)


# ---------------------------------------------------------------- aggregators under accumulation
def train(k, optim, batches, axes=None, devices=None, diagnostics=False):
    """``len(batches)`` steps; (final state, per-step metrics) on the host."""
    steps = Steps(mlp_factory, TASKS, make_optimizer("sgd", 0.5, 10, schedule="constant", momentum=0.0),
                  shd.make_mesh(axes or {"data": 1}, devices or jax.devices()[:1]), accum_steps=k, optim=optim)
    state, ms = steps.init(), []
    for b in batches:
        state, m = steps.step(state, steps.put_batch(b), diagnostics=diagnostics)
        ms.append(jax.device_get(m))
    return jax.device_get(state), ms


def assert_same_run(run_k, run_1, keys=("weights", "losses")):
    (sk, mk), (s1, m1) = run_k, run_1
    assert_trees_close(sk.params, s1.params, rtol=1e-5, atol=1e-6)
    assert_trees_close(sk.agg_state, s1.agg_state, rtol=1e-5, atol=1e-6)
    for a, b in zip(mk, m1):
        assert bool(a["ok"]) and bool(b["ok"])
        for key in keys:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_partial_labels_split_unevenly_over_micro_batches():
    b = make_batch(32)
    counts = [int(b["masks"]["reg"][m::4].sum()) for m in range(4)]
    assert counts[1] == 0 and len(set(counts)) > 2    # K=4: uneven, and absent from micro-batch 1
    assert int(b["masks"]["reg"][0::2].sum()) != int(b["masks"]["reg"][1::2].sum())   # K=2: uneven


@pytest.mark.parametrize("k,optim", [
    (4, {"aggregator": "mgda"}),
    (2, {"aggregator": "mgda", "sparse_fraction": 0.3, "sparse_criterion": "saliency"})])
def test_mgda_params_path_accumulated_equals_full_batch(k, optim):
    """Per-task Jacobian rows summed over micro-batches, scaled by label shares: same G, same
    MGDA weights, same update, same diagnostics (from the full-batch G) as K = 1; the saliency
    mask of the first step is chosen from the whole batch's gradient."""
    batches = [make_batch(32, seed=s) for s in (0, 1)]
    run_1 = train(1, optim, batches, diagnostics=True)
    run_k = train(k, optim, batches, diagnostics=True)
    assert_same_run(run_k, run_1, keys=("weights", "losses", "cosines", "grad_norms", "conflict_fraction"))
    assert 0.02 < float(run_1[1][0]["weights"][0]) < 0.98        # an interior MGDA solution
    if optim.get("sparse_fraction"):
        assert_trees_close(run_k[0].sparse_mask, run_1[0].sparse_mask, rtol=0, atol=0)


def test_mgda_representation_path_accumulated_equals_full_batch():
    """G = Σ_m G_m over the micro-batches' disjoint rows of Z; the encoder is re-run per
    micro-batch to pull Σ_t w_t ∂L_t/∂Z back."""
    batches = [make_batch(32, seed=s) for s in (2, 3)]
    optim = {"aggregator": "mgda", "grad_on": "representation"}
    assert_same_run(train(4, optim, batches), train(1, optim, batches))


@pytest.mark.parametrize("optim", [{"aggregator": "famo"}, {"aggregator": "rlw"}])
def test_loss_only_methods_accumulated_equal_full_batch(optim):
    """FAMO: weights from the whole batch's losses, then the same-batch post update on the
    whole batch re-evaluated (a forward-only scan): the logits, hence step 2's weights, agree.
    RLW: the same key gives the same random weights; heads "plain" per micro-batch."""
    batches = [make_batch(32, seed=s) for s in (4, 5)]
    run_1, run_2 = train(1, optim, batches), train(2, optim, batches)
    assert_same_run(run_2, run_1)
    w = [m["weights"] for m in run_1[1]]
    assert abs(float(w[0][0] - w[1][0])) > 1e-4     # the weights move between steps (state / key)


def test_mgda_accumulated_sharded_on_8_devices_equals_single_device_full_batch():
    batches = [make_batch(32, seed=6)]
    optim = {"aggregator": "mgda"}
    assert_same_run(train(2, optim, batches, {"data": 8}, jax.devices()), train(1, optim, batches))


@pytest.mark.parametrize("optim,match", [
    ({"aggregator": "mgda", "fmtl_rho": 0.05}, "F-MTL"),
    ({"aggregator": "ew", "grad_on": "representation", "rep_mtl": 0.1}, "Rep-MTL"),
    ({"aggregator": "mgda", "jacobian": "stream"}, "stream")])
def test_settings_that_cannot_be_exact_are_refused_before_anything_is_written(tmp_path, optim, match):
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    with pytest.raises(ValueError, match=rf"accum_steps=2 .*{match}"):
        Steps(mlp_factory, TASKS, make_optimizer("sgd", 0.1, 10), mesh, accum_steps=2, optim=optim)
    Steps(mlp_factory, TASKS, make_optimizer("sgd", 0.1, 10), mesh, accum_steps=1, optim=optim)   # K = 1 is fine
    if match == "F-MTL":   # through the loop: refused when the steps are built, before the workdir
        with pytest.raises(ValueError, match="F-MTL"):
            run(tiny_config(steps=2, accum_steps=2, optim=optim), str(tmp_path / "wd"))
        assert not (tmp_path / "wd").exists()


# ---------------------------------------------------------------- resume
def test_resume_with_accumulation_is_exact(tmp_path):
    cfg = lambda: tiny_config(steps=12, accum_steps=4, optim={"diagnostics_every": 5})
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    rf = run(cfg(), full)
    run(cfg(), part, _stop_after=11)   # checkpoint at 10, then one more step that is redone
    rp = run(cfg(), part)
    assert rp["val"] == rf["val"] and rp["test"] == rf["test"]
    assert read_metrics(full) == read_metrics(part)
    assert any(r["split"] == "diagnostics" for r in read_metrics(full))


def test_workdir_written_before_accum_steps_existed_is_not_another_run(tmp_path):
    import json
    import os

    from mtl.config import to_json
    from mtl.train.loop import WorkdirConflictError, _prepare_workdir

    cfg_json = to_json(with_defaults(tiny_config()))
    old = json.loads(json.dumps(cfg_json))
    del old["train"]["accum_steps"]             # a config.json from before the key was added
    os.makedirs(tmp_path / "wd")
    with open(tmp_path / "wd" / "config.json", "w") as f:
        json.dump(old, f)
    _prepare_workdir(str(tmp_path / "wd"), cfg_json, overwrite=False, resume=False)   # same run
    changed = json.loads(json.dumps(cfg_json))
    changed["train"]["accum_steps"] = 2
    with pytest.raises(WorkdirConflictError, match="accum_steps"):
        _prepare_workdir(str(tmp_path / "wd"), changed, overwrite=False, resume=False)
