"""DenseFashion: composited garments with per-pixel labels, checked on hand-built cases."""
import numpy as np
import pytest

from mtl.data import dense_fashion as df
from mtl.data.idx import write_idx
from mtl.data.registry import load_dataset


def test_composite_hand_built_occlusion():
    """Two 3x3 squares on a 5x5 canvas; the nearer (depth 0.2) covers the overlap."""
    a = np.full((3, 3), 0.5, np.float32)       # class 4, far, at (0, 0)
    b = np.full((3, 3), 0.9, np.float32)       # class 7, near, at (2, 2)
    b[2, 2] = 0.0                              # one pixel below the threshold: not part of b
    img, seg, depth, edges, inst = df.composite([(a, 4, 0.6, (0, 0)), (b, 7, 0.2, (2, 2))], 5, 0.1)
    want_seg = np.array([[5, 5, 5, 0, 0],
                         [5, 5, 5, 0, 0],
                         [5, 5, 8, 8, 8],
                         [0, 0, 8, 8, 8],
                         [0, 0, 8, 8, 0]])
    np.testing.assert_array_equal(seg, want_seg)
    np.testing.assert_array_equal(inst, np.where(want_seg == 5, 1, np.where(want_seg == 8, 2, 0)))
    np.testing.assert_allclose(img, np.where(want_seg == 5, 0.5, np.where(want_seg == 8, 0.9, 0.0)))
    np.testing.assert_allclose(depth, np.where(want_seg == 5, 0.6, np.where(want_seg == 8, 0.2, 1.0)), rtol=1e-6)
    # occluding contours, worked by hand: a pixel with a 4-neighbour of another instance
    # that is not nearer. a is marked only where it touches background (b is nearer);
    # b wherever it touches a or background; background never.
    want_edges = np.array([[0, 0, 1, 0, 0],
                           [0, 0, 1, 0, 0],
                           [1, 1, 1, 1, 1],
                           [0, 0, 1, 0, 1],
                           [0, 0, 1, 1, 0]], bool)
    np.testing.assert_array_equal(edges, want_edges)


def test_composite_order_is_by_depth_not_list_order():
    a = np.ones((2, 2), np.float32)
    near_first = df.composite([(a, 1, 0.3, (0, 0)), (a * 0.5, 2, 0.8, (1, 1))], 3, 0.1)
    assert near_first[1][1, 1] == 2  # class 1 + 1: the nearer garment wins the overlap
    with pytest.raises(ValueError, match="does not fit a 3x3 canvas"):
        df.composite([(a, 1, 0.3, (2, 2))], 3, 0.1)


@pytest.fixture
def tiny_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 5)):
        imgs = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", imgs)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return tmp_path


def test_bundle_labels_are_consistent_and_deterministic(tiny_dir):
    kw = dict(data_dir=tiny_dir, n_train=12, n_test=4, canvas=10, objects=(1, 3), scale=(0.5, 1.0), seed=3)
    b = load_dataset("dense_fashion", **kw)
    assert b.task_names == ["seg", "depth", "edges"] and b.input_shape == (10, 10, 1)
    assert [t.kind for t in b.tasks] == ["segmentation", "dense_regression", "edges"]
    from mtl.data.idx import load_idx_split
    images, labels = load_idx_split(tiny_dir, "train")
    batch = b.train[np.arange(12)]
    rec = b.meta["train_objects"]
    for e in range(12):
        # rebuild the example from its recorded objects with the documented recipe
        items = []
        for idx, cls, d, r, c, side in rec[e][rec[e][:, 0] >= 0]:
            m = df.area_resize_matrix(8, int(side))
            items.append((m @ (images[int(idx)].astype(np.float32) / 255.0) @ m.T, int(cls), d, (int(r), int(c))))
            assert labels[int(idx)] == cls
        img, seg, depth, edges, _ = df.composite(items, 10, b.meta["threshold"])
        np.testing.assert_allclose(batch["inputs"][e, ..., 0], img, atol=1e-6)
        np.testing.assert_array_equal(batch["labels"]["seg"][e], seg)
        np.testing.assert_allclose(batch["labels"]["depth"][e, ..., 0], depth)
        np.testing.assert_array_equal(batch["labels"]["edges"][e, ..., 0], edges)
    # nearer garments are drawn larger (perspective)
    r = rec[rec[..., 0] >= 0]
    assert np.all(np.diff(r[np.argsort(r[:, 2]), 5]) <= 0)
    # background <=> background depth; labelled pixels have depth inside the range
    seg, dep = batch["labels"]["seg"], batch["labels"]["depth"][..., 0]
    np.testing.assert_array_equal(seg == 0, dep == df.BACKGROUND_DEPTH)
    again = load_dataset("dense_fashion", **kw)
    np.testing.assert_array_equal(again.train.inputs, b.train.inputs)
    other = load_dataset("dense_fashion", **{**kw, "seed": 4})
    assert not np.array_equal(other.train.inputs, b.train.inputs)


def test_bad_arguments_are_named(tiny_dir):
    with pytest.raises(ValueError, match="canvas=6 cannot hold a 8-pixel garment"):
        df.dense_fashion(tiny_dir, n_train=2, n_test=2, canvas=6)
    with pytest.raises(ValueError, match="objects must be"):
        df.dense_fashion(tiny_dir, n_train=2, n_test=2, objects=(0, 2))
    with pytest.raises(ValueError, match="scale must be"):
        df.dense_fashion(tiny_dir, n_train=2, n_test=2, scale=(0.5, 1.5))
    with pytest.raises(FileNotFoundError):
        df.dense_fashion(tiny_dir / "missing", n_train=2, n_test=2)
