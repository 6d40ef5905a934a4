"""IDX reader/writer: hand-built bytes, round trips, and corrupt files."""
import gzip
import struct

import numpy as np
import pytest

from mtl.data.idx import (find_idx_dir, load_idx_classification, load_idx_split, read_idx,
                          write_idx)


def test_read_hand_built_file(tmp_path):
    # magic 0x00000803 (uint8, 3 dims), dims 2 x 2 x 3, then 12 bytes
    raw = struct.pack(">I", 0x0803) + struct.pack(">III", 2, 2, 3) + bytes(range(12))
    (tmp_path / "a").write_bytes(raw)
    arr = read_idx(tmp_path / "a")
    np.testing.assert_array_equal(arr, np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    # int32 big-endian, 1 dim, gzip-compressed
    raw = struct.pack(">I", 0x0C01) + struct.pack(">I", 3) + struct.pack(">iii", -1, 7, 2**30)
    (tmp_path / "b.gz").write_bytes(gzip.compress(raw))
    arr = read_idx(tmp_path / "b.gz")
    assert arr.dtype == np.int32 and arr.dtype.isnative
    np.testing.assert_array_equal(arr, [-1, 7, 2**30])
    # float64, 2 dims
    raw = struct.pack(">I", 0x0E02) + struct.pack(">II", 1, 2) + struct.pack(">dd", 0.5, -3.25)
    (tmp_path / "c").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "c"), [[0.5, -3.25]])


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
def test_round_trip(tmp_path, dtype, name):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = write_idx(tmp_path / name, arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr)


def test_gzip_detected_by_content_not_name(tmp_path):
    arr = np.arange(6, dtype=np.uint8)
    path = write_idx(tmp_path / "no_suffix", arr, compress=True)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_truncated_and_trailing(tmp_path):
    path = write_idx(tmp_path / "full", np.zeros((4, 5, 5), np.uint8))
    raw = path.read_bytes()
    (tmp_path / "short").write_bytes(raw[:-7])
    with pytest.raises(ValueError, match=r"short: truncated.*\(4, 5, 5\).*100.*93"):
        read_idx(tmp_path / "short")
    (tmp_path / "long").write_bytes(raw + b"\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(tmp_path / "long")
    (tmp_path / "hdr").write_bytes(raw[:9])  # 3 dims need a 16-byte header
    with pytest.raises(ValueError, match="truncated header"):
        read_idx(tmp_path / "hdr")
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        read_idx(tmp_path / "tiny")
    gz = gzip.compress(raw)
    (tmp_path / "short.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(ValueError, match="short.gz: corrupt or truncated gzip"):
        read_idx(tmp_path / "short.gz")


def test_foreign_files(tmp_path):
    (tmp_path / "zip").write_bytes(b"PK\x03\x04" + b"\x00" * 20)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "zip")
    (tmp_path / "code").write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="unknown IDX type code 0x07"):
        read_idx(tmp_path / "code")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot store dtype"):
        write_idx(tmp_path / "u16", np.zeros(3, np.uint16))


def _write_split_files(d, gz=True, n_train=5, n_test=3, size=4):
    rng = np.random.default_rng(1)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(d / f"{prefix}-images-idx3-ubyte{ext}",
                  rng.integers(0, 256, (n, size, size), dtype=np.uint8))
        write_idx(d / f"{prefix}-labels-idx1-ubyte{ext}",
                  rng.integers(0, 10, n, dtype=np.uint8))


def test_find_and_load_idx_dir(tmp_path, monkeypatch):
    _write_split_files(tmp_path, gz=False)
    assert find_idx_dir(tmp_path) == tmp_path
    imgs, labels = load_idx_split(tmp_path, "test")
    assert imgs.shape == (3, 4, 4) and labels.dtype == np.int32
    monkeypatch.setenv("MTL_TEST_IDX", str(tmp_path))
    assert find_idx_dir(env_var="MTL_TEST_IDX") == tmp_path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty} \\(data_dir\\)"):
        find_idx_dir(empty, env_var="MTL_TEST_IDX", default_dirs=[tmp_path])  # no fallback


def test_load_idx_classification(tmp_path):
    _write_split_files(tmp_path)
    b = load_idx_classification(tmp_path, task="digit", name="tiny")
    assert b.task_names == ["digit"] and b.task("digit").dim == 10
    assert b.input_shape == (4, 4, 1)
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(b.train.inputs[..., 0], raw.astype(np.float32) / 255)
    np.testing.assert_array_equal(b.test.labels["digit"],
                                  read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(ValueError, match="outside"):
        load_idx_classification(tmp_path, num_classes=2)
