"""MultiFashion built from tiny hand-written IDX files, checked against a hand overlay."""
from pathlib import Path

import numpy as np
import pytest

from mtl.data import multifashion as mf
from mtl.data.idx import write_idx

SIZE = 8  # item side length of the tiny fake dataset


@pytest.fixture
def tiny_dir(tmp_path):
    """6 train / 4 test 8x8 items; every item distinct; classes 0..9."""
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        imgs = rng.integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", imgs)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
        data[prefix] = (imgs, labels)
    return tmp_path, data


def _hand_overlay(a, b, canvas, lo, hi):
    """Loop-based reference: a at (lo, lo), b at (hi, hi), max where both cover."""
    out = np.zeros((canvas, canvas), np.uint8)
    for r in range(SIZE):
        for c in range(SIZE):
            out[lo + r, lo + c] = a[r, c]
    for r in range(SIZE):
        for c in range(SIZE):
            out[hi + r, hi + c] = max(out[hi + r, hi + c], b[r, c])
    return out


def test_pair_offsets_documented_values():
    assert mf.pair_offsets(28, 36, 6) == (1, 7)
    assert mf.pair_offsets(8, 12, 2) == (1, 3)
    assert mf.pair_offsets(8, 8, 0) == (0, 0)
    with pytest.raises(ValueError, match="canvas=12.*need canvas >= item \\+ shift = 13"):
        mf.pair_offsets(8, 12, 5)


def test_canvas_equals_hand_overlay_and_labels_match(tiny_dir):
    d, data = tiny_dir
    b = mf.multifashion(d, n_train=9, n_test=4, canvas=12, shift=2, seed=3)
    assert b.name == "multifashion" and b.task_names == ["left", "right"]
    assert all(t.kind == "classification" and t.dim == 10 for t in b.tasks)
    assert b.input_shape == (12, 12, 1) and b.input_dtype == "float32"
    assert b.meta["offsets"] == (1, 3)
    for split, prefix, n in (("train", "train", 9), ("test", "t10k", 4)):
        imgs, labels = data[prefix]
        src = getattr(b, split)
        left, right = b.meta[f"{split}_left"], b.meta[f"{split}_right"]
        assert len(src) == n and (left != right).all()
        batch = src[np.arange(n)]
        assert batch["inputs"].shape == (n, 12, 12, 1) and batch["inputs"].dtype == np.float32
        for i in range(n):
            ref = _hand_overlay(imgs[left[i]], imgs[right[i]], 12, 1, 3)
            np.testing.assert_array_equal(batch["inputs"][i, ..., 0],
                                          ref.astype(np.float32) / np.float32(255))
            assert batch["labels"]["left"][i] == labels[left[i]]
            assert batch["labels"]["right"][i] == labels[right[i]]
        assert batch["labels"]["left"].dtype == np.int32
        assert 0.0 <= batch["inputs"].min() and batch["inputs"].max() <= 1.0


def test_pairs_sampling(tiny_dir):
    d, _ = tiny_dir
    b = mf.multifashion(d, canvas=10, shift=2, seed=0)
    assert len(b.train) == 6 and len(b.test) == 4  # defaults: whole splits
    assert sorted(b.meta["train_left"]) == list(range(6))  # each item left once
    c = mf.multifashion(d, n_train=50, n_test=2, canvas=10, shift=2, seed=0)
    assert len(c.train) == 50 and (c.meta["train_left"] != c.meta["train_right"]).all()


def test_determinism_and_seed(tiny_dir):
    d, _ = tiny_dir
    a = mf.multifashion(d, n_train=20, n_test=4, canvas=10, shift=2, seed=1)
    b = mf.multifashion(d, n_train=20, n_test=4, canvas=10, shift=2, seed=1)
    c = mf.multifashion(d, n_train=20, n_test=4, canvas=10, shift=2, seed=2)
    np.testing.assert_array_equal(a.train.inputs, b.train.inputs)
    np.testing.assert_array_equal(a.test.labels["right"], b.test.labels["right"])
    assert not np.array_equal(a.meta["train_right"], c.meta["train_right"])


def test_resize_is_area_average(tiny_dir):
    d, _ = tiny_dir
    full = mf.multifashion(d, n_train=5, n_test=2, canvas=12, shift=2, seed=4)
    half = mf.multifashion(d, n_train=5, n_test=2, canvas=12, shift=2, seed=4, resize=6)
    x = full.train.inputs[..., 0].astype(np.float64)
    blocks = x.reshape(5, 6, 2, 6, 2).mean(axis=(2, 4))  # 2x2 block means
    np.testing.assert_allclose(half.train.inputs[..., 0], blocks, atol=1e-6)
    assert half.input_shape == (6, 6, 1)
    np.testing.assert_array_equal(half.train.labels["left"], full.train.labels["left"])
    # non-integer factor: rows of the resampling matrix are convex weights
    m = mf.area_resize_matrix(36, 28)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
    assert (m >= 0).all() and m.shape == (28, 36)


def test_argument_errors(tiny_dir):
    d, _ = tiny_dir
    with pytest.raises(ValueError, match="dataset must be one of"):
        mf.multifashion(d, dataset="cifar")
    with pytest.raises(ValueError, match="canvas=9"):
        mf.multifashion(d, canvas=9, shift=2)
    with pytest.raises(ValueError, match="n_train"):
        mf.multifashion(d, n_train=0, canvas=10, shift=2)
    with pytest.raises(ValueError, match="resize"):
        mf.multifashion(d, canvas=10, shift=2, resize=11)


def test_mnist_variant_uses_env(tiny_dir, monkeypatch):
    d, _ = tiny_dir
    monkeypatch.setenv("MTL_MNIST_DIR", str(d))
    b = mf.multifashion(dataset="mnist", n_train=3, n_test=2, canvas=10, shift=2)
    assert b.name == "multimnist" and len(b.train) == 3


def test_not_found_message(tmp_path, monkeypatch):
    monkeypatch.delenv("MTL_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(mf, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(FileNotFoundError) as e:
        mf.find_fashion_mnist()
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "MTL_FASHION_MNIST_DIR" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data_dir" in msg
    assert "train-images-idx3-ubyte" in msg
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        mf.multifashion(tmp_path)


def test_env_var_is_searched(tiny_dir, monkeypatch):
    d, _ = tiny_dir
    monkeypatch.setenv("MTL_FASHION_MNIST_DIR", str(d))
    assert mf.find_fashion_mnist() == d


REAL = Path(mf.FASHION_MNIST_DIRS[0])


@pytest.mark.skipif(not (REAL / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("MTL_FASHION_MNIST_DIR", raising=False)
    b = mf.multifashion(n_train=2000, n_test=500, seed=0)
    assert b.input_shape == (36, 36, 1) and len(b.train) == 2000 and len(b.test) == 500
    x = b.train.inputs
    assert x.min() == 0.0 and x.max() == 1.0
    # left item covers rows/cols 1..28, right item 7..34: the border rows/cols are empty
    assert not x[:, 0].any() and not x[:, 35].any() and not x[:, :, 0].any()
    assert x[:, 1:29, 1:29].mean() > 0.1
    counts = np.bincount(b.train.labels["left"], minlength=10)
    assert counts.min() > 100  # all ten classes present
    assert set(np.unique(b.test.labels["right"])) == set(range(10))
