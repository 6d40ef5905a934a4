"""TfdsSource / tfds_bundle: tfds.testing.mock_data (offline) and plain record lists."""
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from mtl.data.base import TaskInfo  # noqa: E402
from mtl.data.tfds_source import TfdsSource, tfds_bundle  # noqa: E402


@pytest.fixture
def mock_mnist():
    with tfds.testing.mock_data(num_examples=6):
        yield


def test_bundle_from_mock_mnist(mock_mnist):
    b = tfds_bundle("mnist", {"digit": "label"})
    assert b.tasks == [TaskInfo("digit", "classification", 10)]  # from ClassLabel
    assert b.input_shape == (28, 28, 1) and b.input_dtype == "float32"
    assert len(b.train) == 6 and len(b.test) == 6 and b.val is None
    raw = tfds.data_source("mnist", split="train")  # independent reference: raw records
    idx = np.array([4, 0, 4, -1])
    batch = b.train[idx]
    assert batch["inputs"].shape == (4, 28, 28, 1) and batch["inputs"].dtype == np.float32
    assert batch["labels"]["digit"].dtype == np.int32 and batch["masks"]["digit"].all()
    for j, i in enumerate([4, 0, 4, 5]):
        np.testing.assert_array_equal(batch["inputs"][j], raw[i]["image"] / np.float32(255))
        assert batch["labels"]["digit"][j] == raw[i]["label"]


def test_defaults_val_split_and_shapes(mock_mnist):
    b = tfds_bundle("mnist", val_split="train[:50%]",
                    preprocess={"image": "float32", "label": "int32"})
    assert b.task_names == ["label"] and b.val is not None
    x = b.train[np.array([1])]["inputs"]
    assert x.max() > 1.0  # "float32" casts without scaling
    empty = b.train[np.zeros(0, np.int64)]
    assert empty["inputs"].shape == (0, 28, 28, 1) and empty["labels"]["label"].shape == (0,)
    grid = b.train[np.array([[0, 1], [2, 3]])]
    assert grid["inputs"].shape == (2, 2, 28, 28, 1) and grid["masks"]["label"].shape == (2, 2)


def test_errors_name_the_fix(mock_mnist):
    with pytest.raises(ValueError, match=r"no feature 'lable'.*did you mean 'label'.*"
                                         r"\['image', 'label'\]"):
        tfds_bundle("mnist", {"digit": "lable"})
    with pytest.raises(ValueError, match="no feature 'img'"):
        tfds_bundle("mnist", inputs="img")
    with pytest.raises(ValueError, match="dim=5 but feature 'label' has 10 classes"):
        tfds_bundle("mnist", {"digit": ("label", "classification", 5)})
    with pytest.raises(ValueError, match="cannot infer the dim"):
        tfds_bundle("mnist", {"digit": ("label", "multilabel")})
    b = tfds_bundle("mnist")
    with pytest.raises(IndexError, match="index 6 out of range"):
        b.train[np.array([0, 6])]


def test_open_failure_is_explained(tmp_path):
    with pytest.raises(RuntimeError, match="(?s)could not open tfds dataset 'mnist'.*array_record"):
        tfds_bundle("mnist", data_dir=str(tmp_path))


class _Records:
    """Plain records with a working batched read (counts calls)."""

    def __init__(self, recs):
        self.recs, self.batched_calls = recs, 0

    def __len__(self):
        return len(self.recs)

    def __getitem__(self, i):
        return self.recs[i]

    def __getitems__(self, keys):
        self.batched_calls += 1
        return [self.recs[k] for k in keys]


def _records():
    return [{"x": np.full((3,), i, np.uint8),
             "meta": {"target": np.array([i, -i], np.float64), "cls": np.int64(i % 3)},
             "tags": np.array([0, 2] if i % 2 else [1], np.int64),
             "ragged": np.zeros(i + 1)} for i in range(5)]


def test_source_kinds_and_batched_reads():
    tasks = [TaskInfo("reg", "regression", 2), TaskInfo("c", "classification", 3),
             TaskInfo("tags", "multilabel", 4)]
    recs = _Records(_records())
    src = TfdsSource(recs, inputs="x", tasks=tasks,
                     labels={"reg": "meta/target", "c": "meta/cls", "tags": "tags"},
                     multihot=["tags"], preprocess={"meta/cls": lambda v: 2 - v})
    batch = src[np.array([3, 1])]
    assert recs.batched_calls == 1
    np.testing.assert_array_equal(batch["inputs"], np.array([[3] * 3, [1] * 3], np.float32) / np.float32(255))
    assert batch["labels"]["reg"].dtype == np.float32
    np.testing.assert_array_equal(batch["labels"]["reg"], [[3, -3], [1, -1]])
    np.testing.assert_array_equal(batch["labels"]["c"], [2, 1])  # 2 - (i % 3)
    np.testing.assert_array_equal(batch["labels"]["tags"], [[1, 0, 1, 0], [1, 0, 1, 0]])
    np.testing.assert_array_equal(src[np.array([0])]["labels"]["tags"], [[0, 1, 0, 0]])


def test_source_errors():
    recs = _records()
    t = [TaskInfo("c", "classification", 3)]
    with pytest.raises(ValueError, match="'ragged'.*fixed-shape"):
        TfdsSource(recs, inputs="ragged", tasks=t, labels={"c": "meta/cls"})[np.arange(3)]
    with pytest.raises(ValueError, match="class id 2 from feature 'meta/cls' is outside"):
        TfdsSource(recs, inputs="x", tasks=[TaskInfo("c", "classification", 2)],
                   labels={"c": "meta/cls"})[np.arange(3)]
    with pytest.raises(ValueError, match="one class id per example"):
        TfdsSource(recs, inputs="x", tasks=t, labels={"c": "meta/target"})[np.arange(2)]
    with pytest.raises(ValueError, match="gives 2 values per example"):
        TfdsSource(recs, inputs="x", tasks=[TaskInfo("r", "regression", 3)],
                   labels={"r": "meta/target"})[np.arange(2)]
    with pytest.raises(ValueError, match="labels must map every task"):
        TfdsSource(recs, inputs="x", tasks=t, labels={"d": "meta/cls"})
    with pytest.raises(ValueError, match="preprocess given for \\['nope'\\]"):
        TfdsSource(recs, inputs="x", tasks=t, labels={"c": "meta/cls"}, preprocess={"nope": None})
    with pytest.raises(ValueError, match="unknown preprocessing 'scale'"):
        TfdsSource(recs, inputs="x", tasks=t, labels={"c": "meta/cls"}, preprocess={"x": "scale"})
    with pytest.raises(ValueError, match="multihot tasks \\['c'\\]"):
        TfdsSource(recs, inputs="x", tasks=t, labels={"c": "meta/cls"}, multihot=["c"])


def test_infer_dim_from_feature_info():
    from mtl.data.tfds_source import infer_dim
    f = tfds.features
    assert infer_dim(f.ClassLabel(num_classes=7), "classification") == (7, False)
    assert infer_dim(f.Sequence(f.ClassLabel(num_classes=5)), "multilabel") == (5, True)
    assert infer_dim(f.Tensor(shape=(4,), dtype=np.int64), "multilabel") == (4, False)
    assert infer_dim(f.Scalar(dtype=np.float32), "regression") == (1, False)
    assert infer_dim(f.Tensor(shape=(3,), dtype=np.float32), "regression") == (3, False)
    for feat, kind in [(f.Tensor(shape=(None,), dtype=np.float32), "regression"),
                       (f.Scalar(dtype=np.int64), "classification"),
                       (f.ClassLabel(num_classes=3), "multilabel")]:
        with pytest.raises(ValueError, match="cannot infer the dim"):
            infer_dim(feat, kind)


class MtlTinyTestDataset(tfds.core.GeneratorBasedBuilder):
    """A real (unmocked) tfds dataset, prepared offline as ArrayRecord in a tmp dir."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
            "kind": tfds.features.ClassLabel(names=["a", "b", "c"]),
            "target": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(10, 0), "test": self._generate_examples(4, 1)}

    def _generate_examples(self, n, seed):
        rng = np.random.default_rng(seed)
        for i in range(n):
            yield i, {"image": rng.integers(0, 256, (4, 4, 1), dtype=np.uint8), "kind": i % 3,
                      "target": np.array([i, -2 * i], np.float32)}


def test_real_array_record_dataset(tmp_path):
    MtlTinyTestDataset(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    b = tfds_bundle("mtl_tiny_test_dataset", {"k": "kind", "t": ("target", "regression")},
                    data_dir=str(tmp_path))
    assert b.tasks == [TaskInfo("k", "classification", 3), TaskInfo("t", "regression", 2)]
    assert len(b.train) == 10 and len(b.test) == 4 and b.input_shape == (4, 4, 1)
    raw = tfds.data_source("mtl_tiny_test_dataset", split="test", data_dir=str(tmp_path))
    idx = np.array([3, 1, 2])
    batch = b.test[idx]
    assert b.test._batched_reads  # the real ArrayRecord batched read worked
    for j, i in enumerate(idx):
        np.testing.assert_array_equal(batch["inputs"][j],
                                      raw[int(i)]["image"].astype(np.float32) / np.float32(255))
        assert batch["labels"]["k"][j] == raw[int(i)]["kind"]
        np.testing.assert_array_equal(batch["labels"]["t"][j], raw[int(i)]["target"])
        assert batch["labels"]["t"][j, 1] == -2 * batch["labels"]["t"][j, 0]
