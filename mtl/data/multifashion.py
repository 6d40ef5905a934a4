"""MultiFashion / MultiMNIST: two items overlaid on one canvas, one task per item.

Each example places two images from an IDX dataset on a ``canvas x canvas`` black
canvas: the *left* item up-left, the *right* item down-right, pixel-wise max where
they overlap. Task ``"left"`` is the left item's class, ``"right"`` the right one's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mtl.data.base import ArraySource, DataBundle, TaskInfo
from mtl.data.idx import find_idx_dir, load_idx_split

FASHION_MNIST_ENV = "MTL_FASHION_MNIST_DIR"
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
MNIST_ENV = "MTL_MNIST_DIR"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES = 10


def find_fashion_mnist(data_dir=None) -> Path:
    """The directory holding Fashion-MNIST's four IDX files.

    Searches ``data_dir`` if given (and only it), else ``$MTL_FASHION_MNIST_DIR``, then
    ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
    Raises FileNotFoundError naming the directories searched.
    """
    return find_idx_dir(
        data_dir, env_var=FASHION_MNIST_ENV, default_dirs=FASHION_MNIST_DIRS,
        what="Fashion-MNIST",
        hint=("Install it with `apt-get install dataset-fashion-mnist` (puts the files in "
              f"{FASHION_MNIST_DIRS[0]}), or pass data_dir= (or set ${FASHION_MNIST_ENV}) "
              "to any directory with the four standard IDX files."))


def find_mnist(data_dir=None) -> Path:
    """The directory holding MNIST's four IDX files: ``data_dir``, else ``$MTL_MNIST_DIR``."""
    return find_idx_dir(data_dir, env_var=MNIST_ENV, what="MNIST",
                        hint=(f"Pass data_dir= (or set ${MNIST_ENV}) to a directory with the "
                              "four standard IDX files."))


_DATASETS = {"fashion_mnist": (find_fashion_mnist, "multifashion"),
             "mnist": (find_mnist, "multimnist")}


def pair_offsets(item: int, canvas: int, shift: int) -> tuple[int, int]:
    """Top-left corners ``(left, right)`` of the two items, the same along rows and columns.

    The pair is centred: ``left = (canvas - item - shift) // 2`` and
    ``right = left + shift``. For 28-pixel items, ``canvas=36, shift=6`` gives
    ``left = 1`` (rows/cols 1..28) and ``right = 7`` (rows/cols 7..34).
    """
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    if canvas < item + shift:
        raise ValueError(f"canvas={canvas} cannot hold two {item}-pixel items shifted by "
                         f"{shift}: need canvas >= item + shift = {item + shift}")
    left = (canvas - item - shift) // 2
    return left, left + shift


def overlay_pairs(images: np.ndarray, left: np.ndarray, right: np.ndarray,
                  canvas: int, shift: int) -> np.ndarray:
    """Canvases [n, canvas, canvas] (dtype of ``images``) with ``images[left[i]]`` up-left
    and ``images[right[i]]`` down-right (offsets from :func:`pair_offsets`), max where
    they overlap. ``images`` is [N, s, s]."""
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square images [N, s, s], got shape {images.shape}")
    s = images.shape[1]
    a, b = pair_offsets(s, canvas, shift)
    out = np.zeros((len(left), canvas, canvas), images.dtype)
    out[:, a:a + s, a:a + s] = images[left]
    region = out[:, b:b + s, b:b + s]
    np.maximum(region, images[right], out=region)
    return out


def area_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] box-filter weights: output pixel j averages the input interval
    ``[j, j+1) * n_in / n_out`` (weights by overlap length; rows sum to 1)."""
    edges_out = np.arange(n_out + 1) * (n_in / n_out)
    lo = np.maximum(edges_out[:-1, None], np.arange(n_in)[None, :])
    hi = np.minimum(edges_out[1:, None], np.arange(1, n_in + 1)[None, :])
    return (np.clip(hi - lo, 0.0, None) * (n_out / n_in)).astype(np.float32)


def area_resize(images: np.ndarray, size: int) -> np.ndarray:
    """Downsample float images [n, H, W] to [n, size, size] by area averaging."""
    a = area_resize_matrix(images.shape[1], size)
    b = area_resize_matrix(images.shape[2], size)
    return np.matmul(np.matmul(a, images), b.T)


def _draw_pairs(rng: np.random.Generator, num_items: int, n: int):
    """Left items without replacement while ``n <= num_items`` (each used at most once),
    else with replacement; the right item is uniform over the *other* items."""
    left = rng.permutation(num_items)[:n] if n <= num_items else rng.integers(0, num_items, n)
    right = (left + rng.integers(1, num_items, n)) % num_items
    return left.astype(np.int64), right.astype(np.int64)


def multifashion(data_dir=None, n_train: int | None = None, n_test: int | None = None,
                 canvas: int = 36, shift: int = 6, seed: int = 0,
                 dataset: str = "fashion_mnist", resize: int | None = None) -> DataBundle:
    """MultiFashion (or MultiMNIST with ``dataset="mnist"``): two-item overlay, two tasks.

    * Items come from the IDX files found by :func:`find_fashion_mnist` (or
      :func:`find_mnist`); train examples from the train files, test from t10k.
    * ``n_train`` / ``n_test`` default to the split sizes (60k / 10k). Pairs are drawn
      from ``default_rng([seed, 0])`` (train) and ``[seed, 1]`` (test): left items
      without replacement (while n <= split size), right item uniform over the other
      images, so the two items are never the same image (they may share a class).
    * Placement: see :func:`pair_offsets` (28-pixel items, canvas 36, shift 6: left
      item at rows/cols 1..28, right at 7..34), pixel-wise max where they overlap.
    * ``resize``: optional output side length; the canvas is downsampled by area
      averaging (:func:`area_resize`), e.g. ``resize=28`` for the classic 28x28
      MultiMNIST. Default None keeps ``canvas x canvas``.

    Inputs float32 [n, H, W, 1] in [0, 1] (uint8 / 255). Tasks ``"left"`` and
    ``"right"``: classification, dim 10, int32 labels. ``meta`` holds the item indices
    of every example (``train_left``, ``train_right``, ``test_left``, ``test_right``),
    the offsets and the source directory.
    """
    if dataset not in _DATASETS:
        raise ValueError(f"dataset must be one of {sorted(_DATASETS)}, got {dataset!r}")
    for name, v in (("canvas", canvas), ("shift", shift), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if resize is not None and (not isinstance(resize, (int, np.integer)) or not
                               0 < resize <= canvas):
        raise ValueError(f"resize must be None or an integer in [1, canvas={canvas}], "
                         f"got {resize!r}")
    finder, bundle_name = _DATASETS[dataset]
    directory = finder(data_dir)

    sources, meta = {}, {"dataset": dataset, "data_dir": str(directory), "canvas": canvas,
                         "shift": shift, "resize": resize, "seed": int(seed)}
    for k, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        images, labels = load_idx_split(directory, split)
        num_items = images.shape[0]
        bad = (labels < 0) | (labels >= NUM_CLASSES)
        if bad.any():
            raise ValueError(f"{directory} ({split}): label {labels[bad][0]} outside "
                             f"[0, {NUM_CLASSES})")
        if num_items < 2:
            raise ValueError(f"{directory} ({split}): need >= 2 images to make pairs, "
                             f"got {num_items}")
        n = num_items if n is None else n
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n_{split} must be None or an integer >= 1, got {n!r}")
        left, right = _draw_pairs(np.random.default_rng([int(seed), k]), num_items, int(n))
        x = overlay_pairs(images, left, right, canvas, shift).astype(np.float32)
        x /= np.float32(255.0)
        if resize is not None and resize != canvas:
            x = area_resize(x, resize)
        sources[split] = ArraySource(x[..., None], {"left": labels[left],
                                                    "right": labels[right]})
        meta[f"{split}_left"], meta[f"{split}_right"] = left, right
        meta["offsets"] = pair_offsets(images.shape[1], canvas, shift)
    if dataset == "fashion_mnist":
        meta["class_names"] = FASHION_MNIST_CLASSES
    tasks = [TaskInfo("left", "classification", NUM_CLASSES),
             TaskInfo("right", "classification", NUM_CLASSES)]
    return DataBundle(name=bundle_name, tasks=tasks, train=sources["train"],
                      test=sources["test"], input_shape=sources["train"].inputs.shape[1:],
                      input_dtype="float32", meta=meta)
