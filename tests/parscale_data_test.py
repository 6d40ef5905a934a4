"""Byte corpora for language modelling: the by-file split re-derived with hashlib, windows
shifted by one byte, byte budgets, bad directories refused, the stdlib corpus itself."""
import hashlib
import os

import numpy as np
import pytest

from mtl.data.bytecorpus import corpus_files, python_stdlib
from mtl.data.registry import load_dataset


def make_corpus(root, n=40):
    rng = np.random.default_rng(0)
    files = {}
    for i in range(n):
        rel = os.path.join(f"pkg{i % 3}", f"mod_{i}.py")
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        data = bytes(rng.integers(32, 127, int(rng.integers(50, 400))).astype(np.uint8).tolist())
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        files[rel] = data
    os.makedirs(os.path.join(root, "site-packages"))
    with open(os.path.join(root, "site-packages", "skip.py"), "w") as f:
        f.write("ignored = True\n")
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not python\n")
    return files


def test_split_by_path_hash_and_windows(tmp_path):
    files = make_corpus(str(tmp_path))
    b = load_dataset("python_stdlib", root=str(tmp_path), seq_len=8, val_fraction=0.2, test_fraction=0.2)
    # independent reference: the documented rule, with hashlib, in hash order
    u = {f: int(hashlib.sha256(f.encode()).hexdigest()[:8], 16) / 16 ** 8 for f in files}
    want = {"val": [], "test": [], "train": []}
    for f in sorted(files, key=u.get):
        want["val" if u[f] < 0.2 else "test" if u[f] < 0.4 else "train"].append(f)
    assert b.meta["files"] == {k: len(v) for k, v in want.items()}
    for split, src in (("train", b.train), ("val", b.val), ("test", b.test)):
        stream = np.frombuffer(b"".join(files[f] for f in want[split]), np.uint8)
        n = (stream.size - 1) // 8
        assert len(src) == n
        batch = src[np.array([0, n - 1, 1])]
        for row, i in enumerate([0, n - 1, 1]):
            np.testing.assert_array_equal(batch["inputs"][row], stream[8 * i:8 * i + 8])
            np.testing.assert_array_equal(batch["labels"]["next_byte"][row], stream[8 * i + 1:8 * i + 9])
        assert batch["inputs"].dtype == np.int32 and batch["masks"]["next_byte"].all()
    assert b.tasks[0].kind == "language_model" and b.tasks[0].dim == 256 and b.input_shape == (8,)


def test_byte_budget_takes_whole_files_in_hash_order(tmp_path):
    files = make_corpus(str(tmp_path))
    full = python_stdlib(8, root=str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    cut = python_stdlib(8, root=str(tmp_path), val_fraction=0.2, test_fraction=0.2, max_train_bytes=1000)
    assert cut.meta["bytes"]["train"] == 1000
    np.testing.assert_array_equal(cut.train.stream, full.train.stream[:1000])
    assert cut.meta["bytes"]["val"] == full.meta["bytes"]["val"]


def test_the_split_ignores_other_files_and_listing_order(tmp_path):
    files = make_corpus(str(tmp_path / "a"))
    b1 = python_stdlib(8, root=str(tmp_path / "a"), val_fraction=0.2, test_fraction=0.2)
    os.remove(os.path.join(str(tmp_path / "a"), sorted(files)[0]))  # dropping a file moves no other file
    b2 = python_stdlib(8, root=str(tmp_path / "a"), val_fraction=0.2, test_fraction=0.2)
    assert sum(b1.meta["files"].values()) - 1 == sum(b2.meta["files"].values())
    assert corpus_files(str(tmp_path / "a")) == sorted(set(files) - {sorted(files)[0]})


def test_bad_corpus_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        python_stdlib(root=str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no files"):
        python_stdlib(root=str(tmp_path / "empty"))
    make_corpus(str(tmp_path / "c"), n=6)
    with pytest.raises(ValueError, match="fewer than one window"):
        python_stdlib(4096, root=str(tmp_path / "c"), val_fraction=0.3, test_fraction=0.3)
    with pytest.raises(ValueError, match="val_fraction"):
        python_stdlib(8, root=str(tmp_path / "c"), val_fraction=0.6, test_fraction=0.6)


def test_the_standard_library_corpus():
    b = python_stdlib(64, max_train_bytes=200_000, max_eval_bytes=20_000)
    assert b.meta["files"]["train"] > 500 and min(b.meta["files"].values()) > 10
    assert b.meta["bytes"] == {"train": 200_000, "val": 20_000, "test": 20_000}
    text = bytes(b.train.stream[:20_000]).decode("utf-8", "replace")
    assert "def " in text and "import " in text   # real Python source
    assert "site-packages" not in b.meta["root"]


def test_tfds_text_corpus_through_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    from mtl.data.bytecorpus import tfds_text

    with tfds.testing.mock_data(num_examples=5):
        b = load_dataset("tfds_text", name="lm1b", seq_len=8, splits=("train", "test", "test"))
        raw = tfds.data_source("lm1b", split="train")
        texts = [raw[i]["text"] for i in range(len(raw))]
    stream = b"".join((t.encode() if isinstance(t, str) else bytes(t)) + b"\n" for t in texts)
    np.testing.assert_array_equal(b.train.stream, np.frombuffer(stream, np.uint8))
    w = b.train[np.array([1])]
    np.testing.assert_array_equal(w["labels"]["next_byte"][0], np.frombuffer(stream[9:17], np.uint8))
    with pytest.raises(ValueError, match="splits must name"):
        tfds_text("lm1b", 8, splits=("train",))
