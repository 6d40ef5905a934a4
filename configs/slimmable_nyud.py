"""Slimmable multi-task network on NYUD-v2 at full scale, read through tensorflow-datasets.
Does not run offline: the data must be prepared (array_record) on a machine with network
access first. The config argument is ``ENCODER[,labelled]``, ENCODER ``cnn`` (default) or ``vit``.

Default: tfds's ``nyu_depth_v2`` (about 47k train / 654 validation frames: the FastDepth /
sparse-to-dense preprocessing of the raw Kinect sequences, filled depth). Its only features are ``image`` uint8
[480, 640, 3] and ``depth`` float16 [480, 640] (metres): **depth is its only task** - tfds's
nyu_depth_v2 has no semantic labels and no surface normals. Its 654 validation frames are
the standard NYUD-v2 test images, so they are the test split here; model selection uses
``data.val_fraction`` of train. Frames are resized to 240x320 (same aspect; depth nearest
neighbour, 0 / non-finite depth = invalid pixel, left out of loss and metrics)::

    python -c "import tensorflow_datasets as tfds; tfds.builder('nyu_depth_v2', \\
        data_dir='DIR', file_format='array_record').download_and_prepare()"
    # a 34 GB download; preparing needs tensorflow and h5py (training does not)
    mtl train --config configs/slimmable_nyud.py --config.data.kwargs.data_dir=DIR --workdir runs/nyud

``labelled``: the multi-task NYUD-v2 setting (the 1,449 labelled frames: 795 train / 654
test; 40 classes of Gupta et al. 2013; depth; surface normals; edges) is not in tfds. It needs
a user-prepared tfds builder, by default named ``nyud_v2_mtl`` (``--config.data.kwargs.name``),
with splits ``train`` and ``test`` and the features

    image:        tfds.features.Image(shape=(480, 640, 3))                 uint8 RGB
    segmentation: tfds.features.LabeledImage(labels=<40 class names>, shape=(480, 640, 1))
                  uint8 class ids 0..39, 255 = unlabelled (ignored)
    depth:        tfds.features.Tensor(shape=(480, 640), dtype=float32)    metres, 0 = missing
    normals:      tfds.features.Tensor(shape=(480, 640, 3), dtype=float32) unit normals,
                  (0, 0, 0) = missing

Tasks: ``seg`` (segmentation, dim from the LabeledImage), ``depth`` and ``normals``
(dense_regression, L1; normals are regressed as 3 values per pixel), ``edges`` derived from
the segmentation map after resizing (label boundaries, mtl.data.tfds_source.PixelLabels)::

    mtl train --config configs/slimmable_nyud.py:cnn,labelled --config.data.kwargs.data_dir=DIR \\
        --workdir runs/nyud_mtl

Widths (0.25, 0.5, 0.75, 1), sandwich rule with in-place distillation and CIKD as in
configs/slimmable_dense.py; then ``mtl slim --workdir RUN --budget ... --preference ...``.
"""
from mtl.config import base_config

NYUD_SIZE = (240, 320)


def get_config(arg=None):
    parts = [p for p in (arg or "cnn").split(",") if p]
    encoder = parts[0] if parts else "cnn"
    extra = set(parts[1:])
    if encoder not in ("cnn", "vit") or not extra <= {"labelled"}:
        raise ValueError(f"configs/slimmable_nyud.py: argument {arg!r}; use ENCODER[,labelled] with "
                         "ENCODER cnn or vit")
    labelled = "labelled" in extra
    c = base_config()
    c.name = f"slimmable_nyud_{'mtl_' if labelled else ''}{encoder}"
    c.data.name = "tfds"
    resize = dict(size=NYUD_SIZE, fit="stretch", image="area", depth="nearest")
    if labelled:
        c.data.kwargs = dict(
            name="nyud_v2_mtl", train_split="train", test_split="test", data_dir=None, inputs="image",
            tasks={"seg": ("segmentation", "segmentation"), "depth": ("depth", "dense_regression"),
                   "normals": ("normals", "dense_regression"), "edges": ("segmentation", "edges")},
            pixel={"seg": {"ignore": 255}, "edges": {"from_segmentation": True}}, resize=resize)
    else:
        c.data.kwargs = dict(name="nyu_depth_v2", train_split="train", test_split="validation",
                             data_dir=None, inputs="image",
                             tasks={"depth": ("depth", "dense_regression")}, resize=resize)
    c.data.val_fraction = 0.1 if labelled else 0.02
    c.model.arch = "slimmable"
    c.model.encoder = encoder
    c.model.arch_kwargs = dict(widths=(0.25, 0.5, 0.75, 1.0), decoder_channels=64, groups=8,
                               sandwich=dict(n=4, kd_weight=1.0, cikd_weight=1.0, sub_labels=True, pool_size=8))
    if encoder == "cnn":
        c.model.encoder_kwargs = dict(channels=(32, 64, 128, 256), groups=8)
    else:
        c.model.encoder_kwargs = dict(patch=16, dim=384, depth=6, num_heads=6, mlp_ratio=4.0)
    c.train.steps = 20000 if labelled else 30000
    c.train.batch_size = 8 if labelled else 16
    c.train.eval_batch_size = 32
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.checkpoint_every = 2000
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 500
    return c
