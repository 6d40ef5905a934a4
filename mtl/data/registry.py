"""Datasets by name: ``load_dataset("multitab", num_tasks=4)`` -> DataBundle.

A new dataset is one factory returning a :class:`~mtl.data.base.DataBundle` plus one
line in :data:`DATASETS`.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable

from mtl.data.base import DataBundle
from mtl.data.dense_fashion import dense_fashion
from mtl.data.bytecorpus import python_stdlib, tfds_text
from mtl.data.domains import domain_mixture
from mtl.data.multifashion import multifashion
from mtl.data.synthetic import mmoe_synthetic, multitab_synthetic
from mtl.data.tfds_source import tfds_bundle

DATASETS: dict[str, Callable[..., DataBundle]] = {
    "mmoe_synthetic": mmoe_synthetic,
    "multitab": multitab_synthetic,
    "multifashion": multifashion,
    "dense_fashion": dense_fashion,
    "domain_mixture": domain_mixture,
    "tfds": tfds_bundle,
    "python_stdlib": python_stdlib,
    "tfds_text": tfds_text,
}


def load_dataset(name: str, /, **kwargs) -> DataBundle:
    """Build the dataset registered as ``name`` with keyword arguments ``kwargs``.

    Raises ValueError for an unknown name (listing the valid ones, with the closest
    match) and TypeError for a keyword the factory does not take or a missing one.
    """
    if name not in DATASETS:
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}; valid names are {sorted(DATASETS)}.{hint}")
    factory = DATASETS[name]
    params = inspect.signature(factory).parameters
    valid = [p for p, v in params.items()
             if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"dataset {name!r} got an unknown keyword {key!r}; it takes "
                            f"{valid}.{hint}")
    missing = [p for p in valid if params[p].default is inspect.Parameter.empty
               and p not in kwargs]
    if missing:
        raise TypeError(f"dataset {name!r} needs the keyword(s) {missing}")
    return factory(**kwargs)
