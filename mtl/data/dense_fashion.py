"""DenseFashion: Fashion-MNIST garments composited with occlusion; three per-pixel tasks.

Construction of one ``canvas x canvas`` example (deterministic: split ``k`` (train 0,
test 1) draws everything from ``numpy.random.default_rng([seed, k])``, in example order):

1. ``K`` garments, ``K`` uniform in ``objects = (k_min, k_max)``, drawn uniformly (with
   replacement) from that split's IDX images (train examples from the train files,
   test from t10k).
2. Each garment gets a depth ``d`` uniform in ``depth_range`` (smaller = nearer) and is
   shrunk by perspective: side ``round(28 * s)`` with ``s`` falling linearly from
   ``scale[1]`` at the nearest depth to ``scale[0]`` at the farthest (area averaging,
   :func:`mtl.data.multifashion.area_resize_matrix`), so apparent size is a depth cue.
3. Its top-left corner is uniform over the positions that keep it inside the canvas.
   Its *support* is the pixels whose intensity exceeds ``threshold`` (of 1).
4. Painter's algorithm, farthest first: each garment overwrites the image, the labels
   and the instance map on its support; so a nearer garment occludes a farther one.

Labels (see :func:`composite`): ``seg`` int [H, W] = garment class + 1 of the visible
garment, 0 = background (11 classes); ``depth`` float [H, W, 1] = the visible garment's
depth, ``background_depth`` (1.0, farther than all) elsewhere; ``edges`` float 0/1
[H, W, 1] = occluding contours (:func:`boundaries`): pixels with a 4-neighbour of another
visible instance that is not nearer, i.e. garment outlines and occlusion boundaries, one
pixel thick on the nearer side (neighbours outside the canvas are ignored). Inputs float32 [n, H, W, 1] in [0, 1] (black background).
"""
from __future__ import annotations

import numpy as np

from mtl.data.base import ArraySource, DataBundle, TaskInfo
from mtl.data.idx import load_idx_split
from mtl.data.multifashion import FASHION_MNIST_CLASSES, area_resize_matrix, find_fashion_mnist

NUM_CLASSES = 11  # background + 10 garments
BACKGROUND_DEPTH = 1.0


def boundaries(instances: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """bool [H, W]: occluding contours. A pixel is an edge when a 4-neighbour shows another
    instance that is not nearer (``depth[p] <= depth[q]``): the contour is drawn one pixel
    thick on the occluding side (the garment's side of a garment/background outline)."""
    e = np.zeros(instances.shape, bool)
    for axis in (0, 1):
        a = [slice(None), slice(None)]
        b = [slice(None), slice(None)]
        a[axis], b[axis] = slice(1, None), slice(None, -1)   # pixel p and its neighbour q = p - 1
        a, b = tuple(a), tuple(b)
        diff = instances[a] != instances[b]
        e[a] |= diff & (depth[a] <= depth[b])
        e[b] |= diff & (depth[b] <= depth[a])
    return e


def composite(items, canvas: int, threshold: float):
    """Paint ``items`` (each ``(image [s, s] float in [0, 1], class, depth, (row, col))``)
    farthest first onto a black canvas. Returns ``(image, seg, depth, edges, instances)``:
    float32 [H, W], int32 [H, W] (class + 1; 0 background), float32 [H, W],
    bool [H, W], int32 [H, W] (item index + 1 in the given order; 0 background)."""
    image = np.zeros((canvas, canvas), np.float32)
    seg = np.zeros((canvas, canvas), np.int32)
    depth = np.full((canvas, canvas), BACKGROUND_DEPTH, np.float32)
    inst = np.zeros((canvas, canvas), np.int32)
    order = sorted(range(len(items)), key=lambda i: -float(items[i][2]))
    for i in order:
        img, cls, d, (r, c) = items[i]
        s0, s1 = img.shape
        if r < 0 or c < 0 or r + s0 > canvas or c + s1 > canvas:
            raise ValueError(f"item {i} ({s0}x{s1} at {(r, c)}) does not fit a {canvas}x{canvas} canvas")
        support = img > threshold
        win = (slice(r, r + s0), slice(c, c + s1))
        image[win][support] = img[support]
        seg[win][support] = int(cls) + 1
        depth[win][support] = float(d)
        inst[win][support] = i + 1
    return image, seg, depth, boundaries(inst, depth), inst


def _check(name, value, lo, hi):
    a, b = (float(v) for v in value)
    if not lo <= a <= b <= hi:
        raise ValueError(f"{name} must be (low, high) with {lo} <= low <= high <= {hi}; got {tuple(value)}")
    return a, b


def _make_split(images, labels, n, canvas, objects, scale, depth_range, threshold, rng):
    item = images.shape[1]
    if round(item * scale[1]) > canvas:
        raise ValueError(f"canvas={canvas} cannot hold a {item}-pixel garment at scale {scale[1]}: "
                         f"need canvas >= {round(item * scale[1])}")
    mats = {}
    x = np.zeros((n, canvas, canvas), np.float32)
    seg = np.zeros((n, canvas, canvas), np.uint8)
    dep = np.zeros((n, canvas, canvas), np.float32)
    edg = np.zeros((n, canvas, canvas), np.float32)
    record = np.full((n, objects[1], 6), -1.0, np.float32)  # item index, class, depth, row, col, side
    (d0, d1), (s0, s1) = depth_range, scale
    for e in range(n):
        k = int(rng.integers(objects[0], objects[1] + 1))
        idx = rng.integers(0, images.shape[0], k)
        depths = rng.uniform(d0, d1, k)
        items = []
        for j in range(k):
            frac = 0.0 if d1 == d0 else (depths[j] - d0) / (d1 - d0)
            side = max(1, int(round(item * (s1 - frac * (s1 - s0)))))
            if side not in mats:
                mats[side] = area_resize_matrix(item, side)
            m = mats[side]
            img = m @ (images[idx[j]].astype(np.float32) / 255.0) @ m.T
            r, c = rng.integers(0, canvas - side + 1, 2)
            items.append((img, int(labels[idx[j]]), float(depths[j]), (int(r), int(c))))
            record[e, j] = (idx[j], labels[idx[j]], depths[j], r, c, side)
        x[e], s, dep[e], ed, _ = composite(items, canvas, threshold)
        seg[e], edg[e] = s, ed
    return ArraySource(x[..., None], {"seg": seg, "depth": dep[..., None], "edges": edg[..., None]}), record


def dense_fashion(data_dir=None, n_train: int = 10000, n_test: int = 2000, canvas: int = 32,
                  objects=(2, 3), scale=(0.5, 1.0), depth_range=(0.2, 0.9), threshold: float = 0.05,
                  seed: int = 0) -> DataBundle:
    """The DenseFashion bundle (construction in the module docstring).

    Tasks: ``seg`` (segmentation, 11 classes), ``depth`` (dense_regression, 1),
    ``edges`` (edges, 1). ``meta["train_objects"]`` / ``["test_objects"]``: float32
    [n, k_max, 6] rows ``(item index, class, depth, row, col, side)`` per garment, -1 padded.
    """
    for name, v in (("n_train", n_train), ("n_test", n_test), ("canvas", canvas)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    k0, k1 = (int(v) for v in objects)
    if not 1 <= k0 <= k1:
        raise ValueError(f"objects must be (min, max) garments per image with 1 <= min <= max; got {tuple(objects)}")
    scale = _check("scale", scale, 1e-3, 1.0)
    depth_range = _check("depth_range", depth_range, 0.0, BACKGROUND_DEPTH - 1e-6)
    if not 0.0 <= float(threshold) < 1.0:
        raise ValueError(f"threshold must be in [0, 1); got {threshold!r}")
    directory = find_fashion_mnist(data_dir)
    sources, meta = {}, {"data_dir": str(directory), "canvas": int(canvas), "objects": (k0, k1), "scale": scale,
                         "depth_range": depth_range, "threshold": float(threshold), "seed": int(seed),
                         "background_depth": BACKGROUND_DEPTH,
                         "class_names": ("background",) + FASHION_MNIST_CLASSES}
    for k, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        images, labels = load_idx_split(directory, split)
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES - 1):
            raise ValueError(f"{directory} ({split}): labels must be garment classes 0..9")
        rng = np.random.default_rng([int(seed), k])
        sources[split], meta[f"{split}_objects"] = _make_split(
            images, labels, int(n), int(canvas), (k0, k1), scale, depth_range, float(threshold), rng)
    tasks = [TaskInfo("seg", "segmentation", NUM_CLASSES), TaskInfo("depth", "dense_regression", 1),
             TaskInfo("edges", "edges", 1)]
    return DataBundle(name="dense_fashion", tasks=tasks, train=sources["train"], test=sources["test"],
                      input_shape=(int(canvas), int(canvas), 1), input_dtype="float32", meta=meta)
