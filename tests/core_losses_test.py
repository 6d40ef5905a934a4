"""Losses, metrics and masked per-task losses vs numpy re-derivations (float64 references)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl import losses as L
from mtl import metrics as M
from mtl.nn.heads import Classification, MultiLabel, Regression
from mtl.tasks import Task, TaskSet, losses_from_outputs, masked_mean, metric_sums

RTOL = 1e-5


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- numpy references

def np_softmax_xent(logits, labels):
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None].astype(np.int64), -1)[..., 0]
    return nll.reshape(nll.shape[0], -1).mean(1)


def np_sigmoid_xent(logits, labels):
    z = logits.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-z))
    ll = labels * np.log(p) + (1 - labels) * np.log(1 - p)
    return -ll.reshape(ll.shape[0], -1).mean(1)


def _per_sample_mean(x):
    return x.reshape(x.shape[0], -1).mean(1)


# ---------------------------------------------------------------- 1. losses and metrics

@pytest.mark.parametrize("shape", [(5, 4), (3, 6, 4)])  # [B, C] and per-token [B, L, C]
def test_softmax_xent_matches_numpy(shape):
    logits = _rng(1).normal(size=shape).astype(np.float32) * 3
    labels = _rng(2).integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    got = np.asarray(L.softmax_xent(jnp.asarray(logits), jnp.asarray(labels)))
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got, np_softmax_xent(logits, labels), rtol=RTOL, atol=1e-6)


def test_softmax_xent_hand_case():
    # logits (0, log 3): p = (1/4, 3/4); label 1 -> -log(3/4); label 0 -> log 4
    logits = jnp.asarray([[0.0, np.log(3.0)], [0.0, np.log(3.0)]])
    got = np.asarray(L.softmax_xent(logits, jnp.asarray([1, 0])))
    np.testing.assert_allclose(got, [-np.log(0.75), np.log(4.0)], rtol=1e-6)


@pytest.mark.parametrize("bad", [
    3, 7,
    -1,
])
def test_out_of_range_label_on_a_labelled_row_is_not_silently_scored(bad):
    # 3 classes: a label outside [0, 3) must not produce a plausible finite loss
    got = np.asarray(L.softmax_xent(jnp.zeros((2, 3)), jnp.asarray([0, bad])))
    np.testing.assert_allclose(got[0], np.log(3.0), rtol=1e-6)
    assert not np.isfinite(got[1])


@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3)])
def test_sigmoid_xent_matches_numpy(shape):
    logits = _rng(3).normal(size=shape).astype(np.float32) * 4
    labels = _rng(4).integers(0, 2, size=shape).astype(np.float32)
    got = np.asarray(L.sigmoid_xent(jnp.asarray(logits), jnp.asarray(labels)))
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got, np_sigmoid_xent(logits, labels), rtol=RTOL, atol=1e-6)


def test_sigmoid_xent_large_logits_stay_finite():
    # log(1 + e^-|z|) form: no overflow; exact value |z| when the label is wrong
    logits = jnp.asarray([[200.0, -200.0]])
    got = float(L.sigmoid_xent(logits, jnp.asarray([[0.0, 1.0]]))[0])
    np.testing.assert_allclose(got, 200.0, rtol=1e-6)


@pytest.mark.parametrize("fn_loss,fn_metric,ref", [
    (L.mse, M.mse, lambda d: d ** 2),
    (L.l1, M.mae, np.abs),
])
@pytest.mark.parametrize("shape", [(4,), (4, 3), (2, 5, 3)])
def test_regression_losses_and_metrics(fn_loss, fn_metric, ref, shape):
    p = _rng(5).normal(size=shape).astype(np.float32)
    t = _rng(6).normal(size=shape).astype(np.float32)
    want = _per_sample_mean(ref(p.astype(np.float64) - t))
    for fn in (fn_loss, fn_metric):
        got = np.asarray(fn(jnp.asarray(p), jnp.asarray(t)))
        assert got.shape == (shape[0],)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-7)


def test_mse_hand_case():
    got = np.asarray(L.mse(jnp.asarray([[1.0, 2.0], [0.0, 0.0]]), jnp.asarray([[0.0, 0.0], [3.0, -1.0]])))
    np.testing.assert_allclose(got, [(1 + 4) / 2, (9 + 1) / 2])
    got = np.asarray(M.mae(jnp.asarray([[1.0, 2.0], [0.0, 0.0]]), jnp.asarray([[0.0, 0.0], [3.0, -1.0]])))
    np.testing.assert_allclose(got, [1.5, 2.0])


def test_accuracy_pooled_and_per_token():
    logits = jnp.asarray([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    np.testing.assert_array_equal(np.asarray(M.accuracy(logits, jnp.asarray([1, 1, 2]))), [1.0, 0.0, 1.0])
    # per token [B=2, L=4, C=3]: sample 0 gets 3/4 positions right, sample 1 gets 1/4
    lg = _rng(7).normal(size=(2, 4, 3)).astype(np.float32)
    pred = lg.argmax(-1)
    lab = pred.copy()
    lab[0, 2] = (lab[0, 2] + 1) % 3
    lab[1, :3] = (lab[1, :3] + 1) % 3
    np.testing.assert_allclose(np.asarray(M.accuracy(jnp.asarray(lg), jnp.asarray(lab))), [0.75, 0.25])


def test_multilabel_accuracy():
    logits = jnp.asarray([[1.0, -1.0, 0.5, -0.2], [-3.0, -1.0, -0.5, 2.0]])
    labels = jnp.asarray([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    # row 0: T F T F vs 1 0 0 0 -> right, right, wrong, right = 3/4; row 1: F F F T vs 1 1 0 1 -> 2/4
    np.testing.assert_allclose(np.asarray(M.multilabel_accuracy(logits, labels)), [0.75, 0.5])
    # per token [B, L, K]
    lg = _rng(8).normal(size=(3, 2, 5)).astype(np.float32)
    lb = _rng(9).integers(0, 2, size=(3, 2, 5)).astype(np.float32)
    want = _per_sample_mean(((lg > 0) == (lb > 0.5)).astype(np.float64))
    np.testing.assert_allclose(np.asarray(M.multilabel_accuracy(jnp.asarray(lg), jnp.asarray(lb))), want)


def test_registries_and_directions():
    assert L.LOSSES["softmax_xent"] is L.softmax_xent and L.LOSSES["l1"] is L.l1
    assert M.HIGHER_IS_BETTER == {"accuracy": True, "multilabel_accuracy": True, "mse": False, "mae": False,
                                  "miou": True, "pixel_accuracy": True, "pixel_mae": False, "rmse": False,
                                  "f1": True, "binary_pixel_accuracy": True, "bits_per_byte": False}
    assert set(M.HIGHER_IS_BETTER) == set(M.METRICS)


# ---------------------------------------------------------------- 2. tasks and masking

def test_masked_mean_partial_and_all_masked():
    v = jnp.asarray([1.0, 2.0, 3.0, 10.0])
    assert float(masked_mean(v, jnp.asarray([True, False, True, False]))) == 2.0
    assert float(masked_mean(v, jnp.asarray([1, 1, 1, 1]))) == 4.0
    out = masked_mean(v, jnp.zeros(4, bool))
    assert float(out) == 0.0 and not np.isnan(float(out))
    # NaN placeholders in masked-out entries never reach the value or the gradient
    nan_v = jnp.asarray([1.0, np.nan, 3.0, np.inf])
    m = jnp.asarray([True, False, True, False])
    assert float(masked_mean(nan_v, m)) == 2.0
    g = np.asarray(jax.grad(lambda x: masked_mean(x, m))(nan_v))
    np.testing.assert_array_equal(g, [0.5, 0.0, 0.5, 0.0])
    assert float(masked_mean(nan_v, jnp.zeros(4, bool))) == 0.0


def _two_tasks():
    return [Task("cls", Classification(out=4)), Task("reg", Regression(out=2))]


def _batch_with_bad_masked_rows():
    rng = _rng(10)
    B = 6
    logits = rng.normal(size=(B, 4)).astype(np.float32)
    reg = rng.normal(size=(B, 2)).astype(np.float32)
    y_cls = rng.integers(0, 4, size=B).astype(np.int32)
    y_reg = rng.normal(size=(B, 2)).astype(np.float32)
    m_cls = np.array([1, 1, 0, 1, 0, 1], bool)
    m_reg = np.array([0, 1, 1, 0, 1, 1], bool)
    y_cls[~m_cls] = np.array([99, -5])     # out-of-range labels on masked rows
    y_reg[~m_reg] = np.nan                 # NaN labels on masked rows
    outputs = {"cls": logits, "reg": reg}
    batch = {"inputs": None, "labels": {"cls": y_cls, "reg": y_reg}, "masks": {"cls": m_cls, "reg": m_reg}}
    return outputs, batch


def test_losses_from_outputs_masked_vs_numpy():
    tasks = _two_tasks()
    outputs, batch = _batch_with_bad_masked_rows()
    got = np.asarray(losses_from_outputs(tasks, {k: jnp.asarray(v) for k, v in outputs.items()}, batch))
    assert got.shape == (2,) and np.all(np.isfinite(got))
    mc, mr = batch["masks"]["cls"], batch["masks"]["reg"]
    want_cls = np_softmax_xent(outputs["cls"][mc], batch["labels"]["cls"][mc]).mean()
    want_reg = ((outputs["reg"][mr].astype(np.float64) - batch["labels"]["reg"][mr]) ** 2).mean(1).mean()
    np.testing.assert_allclose(got, [want_cls, want_reg], rtol=RTOL)


def test_masked_bad_labels_do_not_leak_into_gradients():
    tasks = _two_tasks()
    outputs, batch = _batch_with_bad_masked_rows()

    def total(outs):
        return jnp.sum(losses_from_outputs(tasks, outs, batch))

    grads = jax.grad(total)({k: jnp.asarray(v) for k, v in outputs.items()})
    for name in ("cls", "reg"):
        g = np.asarray(grads[name])
        m = batch["masks"][name]
        assert np.all(np.isfinite(g)), name
        np.testing.assert_array_equal(g[~m], 0.0)
        assert np.any(g[m] != 0)
    # the regression gradient on labelled rows: d/dp mean_i mean_j (p-y)^2 = 2 (p-y) / (n_i * 2)
    mr = batch["masks"]["reg"]
    want = 2 * (outputs["reg"] - np.nan_to_num(batch["labels"]["reg"])) / (mr.sum() * 2)
    want[~mr] = 0
    np.testing.assert_allclose(np.asarray(grads["reg"]), want, rtol=1e-5, atol=1e-7)


def test_no_mask_means_all_labelled_and_all_masked_task_is_zero():
    tasks = _two_tasks()
    outputs, batch = _batch_with_bad_masked_rows()
    batch["labels"]["cls"] = np.abs(batch["labels"]["cls"]) % 4
    batch["labels"]["reg"] = np.nan_to_num(batch["labels"]["reg"])
    no_masks = {"labels": batch["labels"]}
    got = np.asarray(losses_from_outputs(tasks, outputs, no_masks))
    want_cls = np_softmax_xent(outputs["cls"], batch["labels"]["cls"]).mean()
    np.testing.assert_allclose(got[0], want_cls, rtol=RTOL)
    none = {"labels": batch["labels"], "masks": {"cls": np.zeros(6, bool), "reg": np.ones(6, bool)}}
    got = np.asarray(losses_from_outputs(tasks, outputs, none))
    assert got[0] == 0.0


def test_metric_sums_vs_numpy():
    tasks = _two_tasks()
    outputs, batch = _batch_with_bad_masked_rows()
    res = metric_sums(tasks, {k: jnp.asarray(v) for k, v in outputs.items()}, batch)
    assert set(res) == {"cls", "reg"}
    assert set(res["cls"]) == {"loss", "accuracy"} and set(res["reg"]) == {"loss", "mse", "mae"}
    mc, mr = batch["masks"]["cls"], batch["masks"]["reg"]
    lc, yc = outputs["cls"][mc], batch["labels"]["cls"][mc]
    lr, yr = outputs["reg"][mr].astype(np.float64), batch["labels"]["reg"][mr]
    want = {
        "cls": {"loss": np_softmax_xent(lc, yc).sum(), "accuracy": (lc.argmax(-1) == yc).sum()},
        "reg": {"loss": ((lr - yr) ** 2).mean(1).sum(), "mse": ((lr - yr) ** 2).mean(1).sum(),
                "mae": np.abs(lr - yr).mean(1).sum()},
    }
    counts = {"cls": mc.sum(), "reg": mr.sum()}
    for t, d in want.items():
        for k, v in d.items():
            s, c = res[t][k]
            np.testing.assert_allclose(float(s), v, rtol=RTOL, err_msg=f"{t}/{k}")
            assert float(c) == counts[t]


def test_label_shape_mismatch_names_task_and_shapes():
    tasks = [Task("height", Regression(out=1))]
    outputs = {"height": jnp.zeros((5, 1))}
    with pytest.raises(ValueError) as e:
        losses_from_outputs(tasks, outputs, {"labels": {"height": np.zeros(5, np.float32)}})
    msg = str(e.value)
    assert "height" in msg and "(5,)" in msg and "(5, 1)" in msg
    tasks = [Task("digit", Classification(out=10))]
    with pytest.raises(ValueError) as e:
        losses_from_outputs(tasks, {"digit": jnp.zeros((4, 10))}, {"labels": {"digit": np.zeros((4, 10), np.int32)}})
    msg = str(e.value)
    assert "digit" in msg and "(4, 10)" in msg and "(4,)" in msg


def test_float_labels_for_classification_raise():
    tasks = [Task("digit", Classification(out=3))]
    with pytest.raises(ValueError, match="digit.*integer"):
        losses_from_outputs(tasks, {"digit": jnp.zeros((2, 3))}, {"labels": {"digit": np.zeros(2, np.float32)}})


def test_missing_labels_for_a_task_raise_keyerror():
    tasks = [Task("a", Regression())]
    with pytest.raises(KeyError, match="'a'"):
        losses_from_outputs(tasks, {"a": jnp.zeros((2, 1))}, {"labels": {"b": np.zeros((2, 1))}})


def test_task_defaults():
    c = Task("c", Classification(out=3))
    assert c.loss is L.softmax_xent
    assert dict(c.metrics) == {"accuracy": M.accuracy} and c.higher_is_better == {"accuracy": True}
    assert c.primary_metric == "accuracy"
    r = Task("r", Regression(out=2))
    assert r.loss is L.mse and list(r.metrics) == ["mse", "mae"]
    assert r.higher_is_better == {"mse": False, "mae": False}
    ml = Task("m", MultiLabel(out=5))
    assert ml.loss is L.sigmoid_xent and ml.metrics["accuracy"] is M.multilabel_accuracy
    assert ml.higher_is_better == {"accuracy": True}
    # explicit choices are kept; known metric names still get their direction
    t = Task("x", Regression(), loss=L.l1, metrics={"mae": M.mae, "score": M.mse}, higher_is_better={"score": True})
    assert t.loss is L.l1 and t.higher_is_better == {"mae": False, "score": True}


def test_unknown_metric_needs_higher_is_better():
    with pytest.raises(ValueError, match="higher_is_better"):
        Task("x", Regression(), metrics={"r2": M.mse})


def test_head_must_be_a_spec():
    with pytest.raises(TypeError, match="HeadSpec"):
        Task("x", head="classification")


def test_taskset():
    a, b = Task("a", Regression()), Task("b", Classification(out=2))
    ts = TaskSet([a, b])
    assert ts.names == ["a", "b"] and ts["b"] is b and ts[0] is a
    with pytest.raises(KeyError, match="'c'"):
        ts["c"]
    with pytest.raises(ValueError, match="unique"):
        TaskSet([a, Task("a", Classification(out=2))])
    with pytest.raises(ValueError):
        TaskSet([])
