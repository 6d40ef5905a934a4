"""TfdsSource / tfds_bundle with per-pixel tasks (segmentation, dense_regression, edges):
ignore / invalid pixels, derived edges, resizing, dim inference, one-line errors."""
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from mtl.data.base import TaskInfo  # noqa: E402
from mtl.data.tfds_source import PixelLabels, TfdsSource, tfds_bundle  # noqa: E402

SEG0 = np.array([[0, 0, 1, 255],
                 [0, 0, 1, 1],
                 [2, 2, 2, 2]], np.uint8)
# 4-neighbour label changes (255 is one more label): both sides of every contour
EDGES0 = np.array([[0, 1, 1, 1],
                   [1, 1, 1, 1],
                   [1, 1, 1, 1]], np.float32)
NAN = np.nan


def _records():
    rng = np.random.default_rng(0)
    return [
        {"image": rng.integers(0, 256, (3, 4, 3), dtype=np.uint8), "seg": SEG0[..., None],
         "depth": np.array([[1, 2, 0, 4], [NAN, 6, 7, 8], [9, 10, 11, np.inf]], np.float32),
         "edge": np.array([[0, 1, 255, 0], [1, 1, 0, 0], [0, 0, 0, 1]], np.uint8), "c": 1},
        {"image": rng.integers(0, 256, (3, 4, 3), dtype=np.uint8), "seg": np.full((3, 4, 1), 255, np.uint8),
         "depth": np.zeros((3, 4), np.float32), "edge": np.full((3, 4), 255, np.uint8), "c": 0},
    ]


TASKS = [TaskInfo("seg", "segmentation", 3), TaskInfo("depth", "dense_regression", 1),
         TaskInfo("edge", "edges", 1), TaskInfo("contour", "edges", 1), TaskInfo("c", "classification", 2)]
LABELS = {"seg": "seg", "depth": "depth", "edge": "edge", "contour": "seg", "c": "c"}
PIXEL = {"seg": {"ignore": 255}, "edge": PixelLabels(ignore=255), "contour": {"from_segmentation": True}}


def test_per_pixel_labels_follow_mtl_conventions():
    recs = _records()
    src = TfdsSource(recs, inputs="image", tasks=TASKS, labels=LABELS, pixel=PIXEL)
    b = src[np.array([0, 1, 0])]
    assert b["inputs"].shape == (3, 3, 4, 3)
    seg = b["labels"]["seg"]
    assert seg.dtype == np.int32 and seg.shape == (3, 3, 4)
    np.testing.assert_array_equal(seg[0], np.where(SEG0 == 255, -1, SEG0.astype(int)))
    assert (seg[1] == -1).all()
    dep = b["labels"]["depth"]
    assert dep.dtype == np.float32 and dep.shape == (3, 3, 4, 1)
    want = np.array([[1, 2, NAN, 4], [NAN, 6, 7, 8], [9, 10, 11, NAN]], np.float32)  # 0, NaN, inf invalid
    np.testing.assert_array_equal(dep[0, ..., 0], want)
    assert np.isnan(dep[1]).all()
    np.testing.assert_array_equal(b["labels"]["edge"][0, ..., 0],
                                  [[0, 1, NAN, 0], [1, 1, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(b["labels"]["contour"][0, ..., 0], EDGES0)
    assert (b["labels"]["contour"][1] == 0).all()   # one region, no contour; derived edges are all labelled
    # a sample without a single labelled pixel is a missing label for that task
    assert b["masks"]["seg"].tolist() == [True, False, True]
    assert b["masks"]["depth"].tolist() == [True, False, True]
    assert b["masks"]["edge"].tolist() == [True, False, True]
    assert b["masks"]["contour"].all() and b["masks"]["c"].all()
    assert b["labels"]["c"].tolist() == [1, 0, 1]
    grid = src[np.array([[0], [1]])]
    assert grid["labels"]["seg"].shape == (2, 1, 3, 4) and grid["masks"]["seg"].shape == (2, 1)
    empty = src[np.zeros(0, np.int64)]
    assert empty["labels"]["depth"].shape == (0, 3, 4, 1) and empty["masks"]["depth"].shape == (0,)
    # zero_is_invalid=False keeps 0 depth (e.g. a signed quantity); non-finite stays invalid
    keep = TfdsSource(recs, inputs="image", tasks=[TASKS[1]], labels={"depth": "depth"},
                      pixel={"depth": {"zero_is_invalid": False}})[np.array([1])]
    assert (keep["labels"]["depth"] == 0).all() and keep["masks"]["depth"].all()


def _big_records(shapes):
    rng = np.random.default_rng(1)
    out = []
    for h, w in shapes:
        out.append({"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                    "seg": rng.integers(0, 3, (h, w), dtype=np.uint8),
                    "depth": rng.uniform(1, 2, (h, w)).astype(np.float32)})
    return out


def test_resize_stretch_and_crop_through_the_source():
    recs = _big_records([(6, 8), (6, 8)])
    tasks = [TaskInfo("seg", "segmentation", 3), TaskInfo("depth", "dense_regression", 1),
             TaskInfo("contour", "edges", 1)]
    labels = {"seg": "seg", "depth": "depth", "contour": "seg"}
    src = TfdsSource(recs, inputs="image", tasks=tasks, labels=labels, resize=(3, 4),
                     pixel={"contour": {"from_segmentation": True}})
    b = src[np.array([1, 0])]
    for j, i in enumerate([1, 0]):
        img = recs[i]["image"].astype(np.float32) / 255
        blocks = img.reshape(3, 2, 4, 2, 3).mean(axis=(1, 3))               # 2x bilinear = 2x2 means
        np.testing.assert_allclose(b["inputs"][j], blocks, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(b["labels"]["seg"][j], recs[i]["seg"][1::2, 1::2])  # nearest
        np.testing.assert_array_equal(b["labels"]["depth"][j, ..., 0], recs[i]["depth"][1::2, 1::2])
        s = recs[i]["seg"][1::2, 1::2].astype(int)                           # edges of the *resized* map
        e = np.zeros((3, 4), bool)
        e[:, 1:] |= s[:, 1:] != s[:, :-1]
        e[:, :-1] |= s[:, 1:] != s[:, :-1]
        e[1:] |= s[1:] != s[:-1]
        e[:-1] |= s[1:] != s[:-1]
        np.testing.assert_array_equal(b["labels"]["contour"][j, ..., 0], e)
    # varying sizes become one batch: centred square crop, then resize (nearest rows/cols 0, 2, 3, 5)
    recs = _big_records([(6, 8), (8, 6)])
    src = TfdsSource(recs, inputs="image", tasks=tasks[:1], labels={"seg": "seg"},
                     resize={"size": (4, 4), "fit": "crop"})
    b = src[np.array([0, 1])]
    assert b["inputs"].shape == (2, 4, 4, 3)
    pick = np.array([0, 2, 3, 5])
    np.testing.assert_array_equal(b["labels"]["seg"][0], recs[0]["seg"][pick][:, 1 + pick])
    np.testing.assert_array_equal(b["labels"]["seg"][1], recs[1]["seg"][1 + pick][:, pick])
    # masked bilinear depth: a 2x downsample of valid depth is the 2x2 block mean
    recs = _big_records([(6, 8)])
    d = TfdsSource(recs, inputs="image", tasks=tasks[1:2], labels={"depth": "depth"},
                   resize={"size": (3, 4), "depth": "bilinear"})[np.array([0])]["labels"]["depth"]
    np.testing.assert_allclose(d[0, ..., 0], recs[0]["depth"].reshape(3, 2, 4, 2).mean(axis=(1, 3)), rtol=1e-6)


def test_per_pixel_errors_are_one_line():
    recs = _records()

    def src(tasks=TASKS[:1], labels=None, pixel=None, records=recs, **kw):
        return TfdsSource(records, inputs="image", tasks=tasks, labels=labels or {t.name: t.name for t in tasks},
                          pixel=pixel, **kw)

    bad = [dict(r, seg=np.zeros((3, 5), np.uint8)) for r in recs]
    with pytest.raises(ValueError, match="label map 'seg' is 3x5 but the input 'image' is 3x4"):
        src(records=bad)[np.array([0])]
    bad = [dict(r, seg=np.zeros((3, 4, 3), np.uint8)) for r in recs]
    with pytest.raises(ValueError, match="shape \\(3, 4, 3\\), not a per-pixel label map \\[H, W\\] or \\[H, W, 1\\]"):
        src(records=bad)[np.array([0])]
    with pytest.raises(ValueError, match="class id 255 in feature 'seg' \\(record 0\\) is outside \\[0, 3\\) "
                                         "and not the ignore value None"):
        src()[np.array([0])]
    with pytest.raises(ValueError, match="must hold integer class ids for segmentation, got dtype float32"):
        src(labels={"seg": "depth"})[np.array([0])]
    with pytest.raises(ValueError, match="edge maps hold 0/1.*has 255"):
        src(tasks=[TASKS[2]])[np.array([0])]
    with pytest.raises(ValueError, match="dim 2\\): feature 'depth' gives 1 values per pixel"):
        src(tasks=[TaskInfo("depth", "dense_regression", 2)])[np.array([0])]
    with pytest.raises(ValueError, match="TfdsSource reads the kinds .* not 'language_model'"):
        src(tasks=[TaskInfo("seg", "language_model", 3)])
    with pytest.raises(ValueError, match="pixel options given for \\['c'\\], which are not per-pixel"):
        src(tasks=[TASKS[0], TASKS[4]], pixel={"c": {}})
    with pytest.raises(ValueError, match="from_segmentation derives an edges task, not a segmentation"):
        src(pixel={"seg": {"from_segmentation": True}})
    with pytest.raises(ValueError, match="ignore has no effect on edges derived"):
        src(tasks=[TASKS[3]], labels={"contour": "seg"}, pixel={"contour": {"from_segmentation": True, "ignore": 255}})
    with pytest.raises(ValueError, match="ignore is for segmentation / edges labels"):
        src(tasks=[TASKS[1]], pixel={"depth": {"ignore": 0}})
    with pytest.raises(ValueError, match="unknown options \\['ignor'\\]"):
        src(pixel={"seg": {"ignor": 255}})
    with pytest.raises(ValueError, match="an edges task has dim 1, got 2"):
        src(tasks=[TaskInfo("edge", "edges", 2)])
    with pytest.raises(ValueError, match="fit must be one of"):
        src(resize={"size": (2, 2), "fit": "pad"})
    bad = [dict(r, image=np.zeros((3, 4, 3, 1), np.uint8)) for r in recs]
    with pytest.raises(ValueError, match="resize takes images \\[H, W, C\\]"):
        src(records=bad, pixel={"seg": {"ignore": 255}}, resize=(2, 2))[np.array([0])]


class MtlDenseTestDataset(tfds.core.GeneratorBasedBuilder):
    """Feature info for dim inference: a LabeledImage segmentation map, depth, edges."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(6, 8, 3)),
            "seg": tfds.features.LabeledImage(labels=5, shape=(6, 8, 1)),
            "depth": tfds.features.Tensor(shape=(6, 8), dtype=np.float32),
            "normals": tfds.features.Tensor(shape=(6, 8, 3), dtype=np.float32),
            "edge": tfds.features.Tensor(shape=(6, 8), dtype=np.uint8),
            "small": tfds.features.Tensor(shape=(3, 4), dtype=np.uint8),
        }))

    def _split_generators(self, dl_manager):
        raise NotImplementedError  # only ever mocked

    def _generate_examples(self):
        raise NotImplementedError


def test_bundle_infers_per_pixel_dims_under_mock_data():
    # mock values are uniform in 0..254: per-example preprocessing maps them to ids / 0-1 edges
    prep = {"seg": lambda v: v % 5, "edge": lambda v: v % 2}
    with tfds.testing.mock_data(num_examples=4):
        b = tfds_bundle("mtl_dense_test_dataset", {
            "seg": ("seg", "segmentation"), "depth": ("depth", "dense_regression"),
            "normals": ("normals", "dense_regression"), "edge": ("edge", "edges"),
            "contour": ("seg", "edges")}, pixel={"contour": {"from_segmentation": True}}, resize=(3, 4),
            preprocess=prep)
        assert b.tasks == [TaskInfo("seg", "segmentation", 5), TaskInfo("depth", "dense_regression", 1),
                           TaskInfo("normals", "dense_regression", 3), TaskInfo("edge", "edges", 1),
                           TaskInfo("contour", "edges", 1)]
        assert b.input_shape == (3, 4, 3) and b.meta["resize"]["size"] == (3, 4)
        assert b.meta["pixel"]["contour"]["from_segmentation"]
        batch = b.train[np.arange(4)]
        assert batch["labels"]["seg"].shape == (4, 3, 4) and batch["labels"]["normals"].shape == (4, 3, 4, 3)
        raw = tfds.data_source("mtl_dense_test_dataset", split="train")
        np.testing.assert_array_equal(batch["labels"]["seg"][2], raw[2]["seg"][1::2, 1::2, 0] % 5)
        np.testing.assert_array_equal(batch["labels"]["edge"][1, ..., 0], raw[1]["edge"][1::2, 1::2] % 2)

        def bundle(tasks, **kw):
            return tfds_bundle("mtl_dense_test_dataset", tasks, preprocess={"edge": prep["edge"]}, **kw)

        with pytest.raises(ValueError, match="dim=4 but feature 'seg' has 5 classes"):
            bundle({"seg": ("seg", "segmentation", 4)})
        with pytest.raises(ValueError, match="cannot infer the dim of a segmentation task.*LabeledImage"):
            bundle({"seg": ("edge", "segmentation")})
        assert bundle({"seg": ("edge", "segmentation", 2)}).tasks == [TaskInfo("seg", "segmentation", 2)]
        with pytest.raises(ValueError, match="unknown kind 'segmentaion' \\(did you mean 'segmentation'\\?\\)"):
            bundle({"seg": ("seg", "segmentaion")})
        with pytest.raises(ValueError, match="feature 'image' has per-example shape \\(6, 8, 3\\), not a "
                                             "per-pixel label map"):
            bundle({"seg": ("image", "segmentation", 3)})
        with pytest.raises(ValueError, match="label map 'small' is 3x4 but the input 'image' is 6x8"):
            tfds_bundle("mtl_dense_test_dataset", {"edge": ("small", "edges")})
