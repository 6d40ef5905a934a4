"""Slimmable multi-task network on PASCAL-Context (semantic segmentation + edges) through
tensorflow-datasets. Does not run offline: PASCAL-Context is not in tfds, so it needs a
user-prepared tfds builder (array_record), by default named ``pascal_context``
(``--config.data.kwargs.name``), with splits ``train`` (4,998 images) and ``validation``
(5,105; used as the test split) and the features

    image:        tfds.features.Image(shape=(None, None, 3))                     uint8 RGB,
                  any size (the VOC images are at most 500x500)
    segmentation: tfds.features.LabeledImage(labels=<59 class names>, shape=(None, None, 1))
                  uint8 ids 0..58 of the 59 most frequent classes, 255 = all other pixels
                  (background / rare classes; ignored), same size as the image
    edges:        (optional, argument ``edges_feature``) tfds.features.Tensor(shape=(None, None),
                  dtype=uint8) 0/1 boundary map, 255 = unlabelled

By default ``edges`` is derived from the segmentation map after resizing (label boundaries,
2 pixels thick; mtl.data.tfds_source.PixelLabels), so only image and segmentation are needed.
Images are brought to 320x320 by a centred crop to the square aspect, then resize (image:
area; labels: nearest neighbour); the argument ``stretch`` resizes the whole image instead::

    mtl train --config configs/slimmable_pascal_context.py --config.data.kwargs.data_dir=DIR \\
        --workdir runs/pascal_context
    mtl train --config configs/slimmable_pascal_context.py:vit,edges_feature ...

The argument is ``ENCODER[,edges_feature][,stretch]`` with ENCODER ``cnn`` (default) or ``vit``.
Widths (0.25, 0.5, 0.75, 1), sandwich training as in configs/slimmable_dense.py.
"""
from mtl.config import base_config

SIZE = (320, 320)


def get_config(arg=None):
    parts = [p for p in (arg or "cnn").split(",") if p]
    encoder = parts[0] if parts else "cnn"
    extra = set(parts[1:])
    if encoder not in ("cnn", "vit") or not extra <= {"edges_feature", "stretch"}:
        raise ValueError(f"configs/slimmable_pascal_context.py: argument {arg!r}; use "
                         "ENCODER[,edges_feature][,stretch] with ENCODER cnn or vit")
    c = base_config()
    c.name = f"slimmable_pascal_context_{encoder}"
    c.data.name = "tfds"
    edges = ("edges", "edges") if "edges_feature" in extra else ("segmentation", "edges")
    c.data.kwargs = dict(
        name="pascal_context", train_split="train", test_split="validation", data_dir=None,
        inputs="image", tasks={"seg": ("segmentation", "segmentation"), "edges": edges},
        pixel={"seg": {"ignore": 255},
               "edges": {"ignore": 255} if "edges_feature" in extra else {"from_segmentation": True}},
        resize=dict(size=SIZE, fit="stretch" if "stretch" in extra else "crop", image="area"))
    c.data.val_fraction = 0.05
    c.model.arch = "slimmable"
    c.model.encoder = encoder
    c.model.arch_kwargs = dict(widths=(0.25, 0.5, 0.75, 1.0), decoder_channels=64, groups=8,
                               sandwich=dict(n=4, kd_weight=1.0, cikd_weight=1.0, sub_labels=True, pool_size=8))
    if encoder == "cnn":
        c.model.encoder_kwargs = dict(channels=(32, 64, 128, 256), groups=8)
    else:
        c.model.encoder_kwargs = dict(patch=16, dim=384, depth=6, num_heads=6, mlp_ratio=4.0)
    c.train.steps = 40000
    c.train.batch_size = 8
    c.train.eval_batch_size = 32
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.checkpoint_every = 2000
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 500
    return c
