"""The full-scale slimmable configs (configs/slimmable_nyud.py, configs/slimmable_pascal_context.py)
build and train a couple of steps through the real TfdsSource and the normal trainer, on tfds
mock data at a tiny size (the real datasets are not available offline)."""
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from mtl.config import load_config_file  # noqa: E402
from mtl.train.loop import run  # noqa: E402


class NyudV2Mtl(tfds.core.GeneratorBasedBuilder):
    """The user-prepared labelled NYUD-v2 builder configs/slimmable_nyud.py:labelled expects."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(480, 640, 3)),
            "segmentation": tfds.features.LabeledImage(labels=40, shape=(480, 640, 1)),
            "depth": tfds.features.Tensor(shape=(480, 640), dtype=np.float32),
            "normals": tfds.features.Tensor(shape=(480, 640, 3), dtype=np.float32),
        }))

    def _split_generators(self, dl_manager):
        raise NotImplementedError("user-prepared; only mocked here")

    def _generate_examples(self):
        raise NotImplementedError


class PascalContext(tfds.core.GeneratorBasedBuilder):
    """The user-prepared PASCAL-Context builder configs/slimmable_pascal_context.py expects."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "segmentation": tfds.features.LabeledImage(labels=59, shape=(None, None, 1)),
            "edges": tfds.features.Tensor(shape=(None, None), dtype=np.uint8),
        }))

    def _split_generators(self, dl_manager):
        raise NotImplementedError("user-prepared; only mocked here")

    def _generate_examples(self):
        raise NotImplementedError


class _Examples:
    """A mocked data source with plausible labels: ids in [0, k) and 255, depth with holes,
    unit normals with missing (0, 0, 0) pixels, varying image sizes for dynamic shapes."""

    def __init__(self, info, n=16):
        self.dataset_info, self.n = info, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        f = self.dataset_info.features
        h, w = [s if s is not None else int(rng.integers(20, 40)) for s in f["image"].shape[:2]]
        ex = {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)}
        if "segmentation" in f:
            seg = rng.integers(0, f["segmentation"].num_classes, (h, w, 1)).astype(np.uint8)
            seg[rng.random((h, w, 1)) < 0.1] = 255
            ex["segmentation"] = seg
        if "depth" in f:
            ex["depth"] = np.where(rng.random((h, w)) < 0.1, 0, rng.uniform(0.5, 10, (h, w))).astype(np.float32)
        if "normals" in f:
            nrm = rng.normal(size=(h, w, 3))
            nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
            nrm[rng.random((h, w)) < 0.1] = 0
            ex["normals"] = nrm.astype(np.float32)
        if "edges" in f:
            e = (rng.random((h, w)) < 0.2).astype(np.uint8)
            e[rng.random((h, w)) < 0.05] = 255
            ex["edges"] = e
        return ex


def _data_source(builder, split=None, **kwargs):
    return _Examples(builder.info)


def _mock(kind):
    """tfds's own nyu_depth_v2 features with random values, or the plausible examples above."""
    return tfds.testing.mock_data(num_examples=16) if kind == "random" else \
        tfds.testing.mock_data(as_data_source_fn=_data_source)


# (config, mock, tiny size, {task: a metric}, {task: head out})
CASES = {
    "nyu_depth_v2": ("configs/slimmable_nyud.py", "random", (12, 16), {"depth": "rmse"}, {"depth": 1}),
    "nyud_labelled": ("configs/slimmable_nyud.py:cnn,labelled", "examples", (12, 16),
                      {"seg": "miou", "depth": "rmse", "normals": "mae", "edges": "f1"},
                      {"seg": 40, "depth": 1, "normals": 3, "edges": 1}),
    "pascal_context": ("configs/slimmable_pascal_context.py", "examples", (16, 16),
                       {"seg": "miou", "edges": "f1"}, {"seg": 59, "edges": 1}),
    "pascal_context_vit": ("configs/slimmable_pascal_context.py:vit,edges_feature", "examples", (16, 16),
                           {"seg": "miou", "edges": "f1"}, {"seg": 59, "edges": 1}),
}


def _shrink(cfg, size):
    cfg.data.kwargs.resize.size = size
    cfg.data.val_fraction = 0.25
    cfg.model.encoder_kwargs = (dict(channels=(8, 16), groups=4) if cfg.model.encoder == "cnn"
                                else dict(patch=4, dim=16, depth=1, num_heads=2, mlp_ratio=2.0))
    cfg.model.arch_kwargs = dict(widths=(0.5, 1.0), decoder_channels=8, groups=4,
                                 sandwich=dict(n=2, kd_weight=1.0, cikd_weight=1.0, sub_labels=True, pool_size=2))
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every, cfg.train.checkpoint_every = 2, 1, 2, 2
    cfg.train.batch_size, cfg.train.eval_batch_size = 8, 8
    cfg.optimizer.warmup_steps = 0
    cfg.train.curves = False
    cfg.train.slim_table = False   # the lookup table (one evaluation per width configuration) is tested elsewhere
    return cfg


def test_full_scale_defaults():
    nyu = load_config_file("configs/slimmable_nyud.py")
    assert nyu.data.kwargs.name == "nyu_depth_v2" and nyu.data.kwargs.test_split == "validation"
    assert tuple(nyu.data.kwargs.resize.size) == (240, 320) and list(nyu.data.kwargs.tasks) == ["depth"]
    pc = load_config_file("configs/slimmable_pascal_context.py")
    assert pc.data.kwargs.name == "pascal_context" and pc.data.kwargs.pixel.seg.ignore == 255
    assert pc.data.kwargs.resize.fit == "crop" and pc.data.kwargs.pixel.edges.from_segmentation


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_builds_data_tasks_and_model(case):
    """get_config -> the tfds bundle through the real TfdsSource -> tasks -> slimmable model;
    one eager forward of the widest and the narrowest configuration gives finite losses."""
    from mtl.nn.build import model_factory
    from mtl.tasks import Task, losses_from_outputs
    from mtl.train.loop import load_data
    import jax
    from flax import nnx

    path, mock, size, metrics, dims = CASES[case]
    cfg = _shrink(load_config_file(path), size)
    with _mock(mock):
        bundle, infos, train, val = load_data(cfg)
        batch = train[np.arange(4)]
    assert bundle.input_shape == size + (3,) and batch["inputs"].shape == (4,) + size + (3,)
    assert {i.name: i.dim for i in infos} == dims
    tasks = [Task.from_info(i) for i in infos]
    factory = model_factory(cfg.model, tasks, bundle.input_shape)
    # parameters drawn in numpy: an eager (or jitted) init compiles a kernel per parameter shape,
    # tens of seconds on CPU; the trainer's own init is exercised by the slow test below
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.1).astype(a.dtype)
                         if np.issubdtype(a.dtype, np.floating) else np.zeros(a.shape, a.dtype), state)
    model = nnx.merge(graphdef, state)
    forward = nnx.jit(lambda m, x, w: m(x, w), static_argnums=2)
    for widths in (None, model.narrowest):
        out = forward(model, batch["inputs"], widths)
        for t in tasks:
            assert out[t.name].shape[:3] == (4,) + size
        losses = np.asarray(losses_from_outputs(tasks, out, batch))
        assert losses.shape == (len(tasks),) and np.isfinite(losses).all()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["nyu_depth_v2", "nyud_labelled", "pascal_context"])
def test_config_trains_two_steps_with_the_trainer(tmp_path, case):
    path, mock, size, metrics, dims = CASES[case]
    cfg = _shrink(load_config_file(path), size)
    with _mock(mock):
        res = run(cfg, str(tmp_path / "run"))
    assert {t["name"]: t["head"]["out"] for t in res["tasks"]} == dims
    for task, metric in metrics.items():
        assert np.isfinite(res["test"][task]["loss"]), (task, res["test"][task])
        assert np.isfinite(res["test"][task][metric])
    assert os.path.exists(tmp_path / "run" / "results.json")


def test_config_arguments_are_checked():
    for path in ("configs/slimmable_nyud.py:mlp", "configs/slimmable_nyud.py:cnn,labeled",
                 "configs/slimmable_pascal_context.py:cnn,crop"):
        with pytest.raises(ValueError, match="argument"):
            load_config_file(path)
