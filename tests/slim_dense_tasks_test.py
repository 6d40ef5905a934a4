"""Per-pixel task kinds (segmentation, dense_regression, edges): metrics on hand-worked cases
(also with unlabelled pixels), task wiring from dataset infos, and a short `mtl train` run of the slimmable model."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mtl import metrics as M
from mtl.data.base import TaskInfo
from mtl.nn.heads import DenseRegression, Edges, Segmentation, head_from_json
from mtl.tasks import Task, losses_from_outputs


def _logits_for(pred, k):
    """Logits whose argmax is ``pred``."""
    return np.eye(k, dtype=np.float32)[pred] * 5.0


def test_mean_iou_per_image_hand_worked():
    # image 0: label [0 0 1 1], pred [0 1 1 1]: IoU(0) = 1/2, IoU(1) = 2/3, class 2 absent -> (1/2 + 2/3) / 2
    # image 1: label [2 2 2 2], pred [2 2 2 0]: IoU(2) = 3/4, IoU(0) = 0/1 -> 3/8
    labels = np.array([[[0, 0], [1, 1]], [[2, 2], [2, 2]]])
    pred = np.array([[[0, 1], [1, 1]], [[2, 2], [2, 0]]])
    got = np.asarray(M.mean_iou(jnp.asarray(_logits_for(pred, 3)), jnp.asarray(labels)))
    np.testing.assert_allclose(got, [(1 / 2 + 2 / 3) / 2, 3 / 8], rtol=1e-6)


def test_rmse_and_f1_per_image_hand_worked():
    p = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]], np.float32).reshape(2, 2, 2, 1)
    t = np.array([[1.0, 2.0, 3.0, 6.0], [1.0, 1.0, 1.0, 1.0]], np.float32).reshape(2, 2, 2, 1)
    np.testing.assert_allclose(M.rmse(jnp.asarray(p), jnp.asarray(t)), [1.0, 1.0], rtol=1e-6)
    # image 0: predicted edges {0, 1}, true {1, 2}: tp=1 -> F1 = 2/(2+2); image 1: none and none -> 1
    logits = np.array([[3.0, 3.0, -3.0, -3.0], [-1.0, -1.0, -1.0, -1.0]], np.float32).reshape(2, 2, 2, 1)
    edges = np.array([[0, 1, 1, 0], [0, 0, 0, 0]], np.float32).reshape(2, 2, 2, 1)
    np.testing.assert_allclose(M.binary_f1(jnp.asarray(logits), jnp.asarray(edges)), [0.5, 1.0], rtol=1e-6)


def test_tasks_from_dataset_infos_get_per_pixel_losses_and_metrics():
    seg = Task.from_info(TaskInfo("seg", "segmentation", 3))
    dep = Task.from_info(TaskInfo("depth", "dense_regression", 1))
    edg = Task.from_info(TaskInfo("edges", "edges", 1))
    assert list(seg.metrics) == ["miou", "pixel_accuracy"] and seg.higher_is_better["miou"]
    assert list(dep.metrics) == ["rmse", "mae"] and not dep.higher_is_better["rmse"]
    assert list(edg.metrics) == ["f1", "pixel_accuracy"] and edg.higher_is_better["f1"]
    for t in (seg, dep, edg):
        assert head_from_json(t.head.to_json()) == t.head       # artifacts round-trip the kind
    rng = np.random.default_rng(0)
    out = {"seg": rng.normal(size=(2, 2, 2, 3)).astype(np.float32),
           "depth": rng.normal(size=(2, 2, 2, 1)).astype(np.float32),
           "edges": rng.normal(size=(2, 2, 2, 1)).astype(np.float32)}
    batch = {"labels": {"seg": rng.integers(0, 3, (2, 2, 2)), "depth": rng.uniform(size=(2, 2, 2, 1)),
                        "edges": rng.integers(0, 2, (2, 2, 2, 1)).astype(np.float32)}}
    got = np.asarray(losses_from_outputs([seg, dep, edg], out, batch))
    z = out["seg"] - out["seg"].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, batch["labels"]["seg"][..., None], -1).mean()
    l1 = np.abs(out["depth"] - batch["labels"]["depth"]).mean()
    e, y = out["edges"], batch["labels"]["edges"]
    bce = (np.maximum(e, 0) - e * y + np.log1p(np.exp(-np.abs(e)))).mean()
    np.testing.assert_allclose(got, [ce, l1, bce], rtol=1e-5)
    with pytest.raises(ValueError, match="labels have shape \\(2, 2\\) but the segmentation head predicts"):
        losses_from_outputs([seg], out, {"labels": {"seg": np.zeros((2, 2), np.int32)}})
    assert isinstance(seg.head, Segmentation) and isinstance(dep.head, DenseRegression) and isinstance(edg.head, Edges)


def test_unlabelled_pixels_are_left_out_of_losses_and_metrics():
    """-1 segmentation ids and NaN float labels are ignored: hand-worked per-image values."""
    import jax

    seg, dep, edg = (Task.from_info(TaskInfo(*a)) for a in
                     (("seg", "segmentation", 3), ("depth", "dense_regression", 1), ("edges", "edges", 1)))
    # segmentation, image 0: label [0 -1 1 1], pred [0 1 1 1] -> IoU(0) = 1, IoU(1) = 2/2 -> mIoU 1, acc 3/3
    # (counting the ignored pixel would give mIoU (1 + 2/3) / 2); image 1: all unlabelled -> 0
    labels = np.array([[[0, -1], [1, 1]], [[-1, -1], [-1, -1]]])
    pred = np.array([[[0, 1], [1, 1]], [[2, 2], [2, 0]]])
    logits = jnp.asarray(_logits_for(pred, 3))
    np.testing.assert_allclose(M.mean_iou(logits, jnp.asarray(labels))[0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(M.pixel_accuracy(logits, jnp.asarray(labels)), [1.0, 0.0], rtol=1e-6)
    z = np.random.default_rng(1).normal(size=(2, 2, 2, 3)).astype(np.float32)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want0 = -np.mean([logp[0, 0, 0, 0], logp[0, 1, 0, 1], logp[0, 1, 1, 1]])
    got = np.asarray(seg.loss(jnp.asarray(z), jnp.asarray(labels)))
    np.testing.assert_allclose(got, [want0, 0.0], rtol=1e-5)
    bad = labels.copy()
    bad[0, 0, 0] = 7  # an id that is neither a class nor the ignore id is still an error (NaN)
    assert np.isnan(np.asarray(seg.loss(jnp.asarray(z), jnp.asarray(bad)))[0])
    # depth: NaN pixels ignored; loss, rmse and mae over the rest; the gradient stays finite
    p = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32).reshape(1, 2, 2, 1)
    t = np.array([[2.0, np.nan, 2.5, 1.0]], np.float32).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(dep.loss(jnp.asarray(p), jnp.asarray(t)), [(1 + 0.5 + 3) / 3], rtol=1e-6)
    np.testing.assert_allclose(dep.metrics["rmse"](jnp.asarray(p), jnp.asarray(t)), [np.sqrt((1 + 0.25 + 9) / 3)], rtol=1e-6)
    np.testing.assert_allclose(dep.metrics["mae"](jnp.asarray(p), jnp.asarray(t)), [1.5], rtol=1e-6)
    g = jax.grad(lambda q: dep.loss(q, jnp.asarray(t)).sum())(jnp.asarray(p))
    np.testing.assert_allclose(np.asarray(g).reshape(-1), [-1 / 3, 0.0, 1 / 3, 1 / 3], atol=1e-7)
    # edges: predicted {0, 1}, true {1} with pixel 0 unlabelled -> on pixels 1..3: tp = 1, F1 = 1; acc 3/3
    e = np.array([[3.0, 3.0, -3.0, -3.0]], np.float32).reshape(1, 2, 2, 1)
    y = np.array([[np.nan, 1.0, 0.0, 0.0]], np.float32).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(edg.metrics["f1"](jnp.asarray(e), jnp.asarray(y)), [1.0], rtol=1e-6)
    np.testing.assert_allclose(edg.metrics["pixel_accuracy"](jnp.asarray(e), jnp.asarray(y)), [1.0], rtol=1e-6)
    ev, yv = e.reshape(-1)[1:], y.reshape(-1)[1:]
    bce = (np.maximum(ev, 0) - ev * yv + np.log1p(np.exp(-np.abs(ev)))).mean()
    np.testing.assert_allclose(edg.loss(jnp.asarray(e), jnp.asarray(y)), [bce], rtol=1e-5)


@pytest.mark.slow
def test_mtl_train_runs_the_widest_slimmable_configuration(tmp_path):
    from mtl.config import load_config_file
    from mtl.data.idx import write_idx
    from mtl.train.loop import run

    rng = np.random.default_rng(0)
    data = tmp_path / "fm"
    data.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    cfg = load_config_file("configs/slimmable_dense.py:mlp")
    cfg.data.kwargs = dict(data_dir=str(data), n_train=64, n_test=16, canvas=28, seed=0)
    cfg.model.encoder_kwargs = dict(hidden=(32,))
    cfg.model.arch_kwargs = dict(widths=(0.5, 1.0), decoder_hidden=(16,))
    cfg.train.steps, cfg.train.eval_every, cfg.train.log_every, cfg.train.checkpoint_every = 6, 3, 3, 3
    cfg.train.batch_size, cfg.train.eval_batch_size = 8, 16
    run(cfg, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    text = json.dumps(recs)
    for key in ("miou", "rmse", "f1"):
        assert key in text
    assert os.path.exists(tmp_path / "run" / "config.json")
