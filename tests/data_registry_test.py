"""Dataset registry: names, keyword checking, and dispatch."""
import numpy as np
import pytest

from mtl.data.registry import DATASETS, load_dataset


def test_registered_names():
    assert set(DATASETS) == {"mmoe_synthetic", "multitab", "multifashion", "domain_mixture", "tfds", "dense_fashion",
                             "python_stdlib", "tfds_text"}


def test_dispatch_matches_direct_call():
    from mtl.data.synthetic import multitab_synthetic
    a = load_dataset("multitab", num_tasks=2, n_train=5, n_test=3, dim=4, seed=1)
    b = multitab_synthetic(num_tasks=2, n_train=5, n_test=3, dim=4, seed=1)
    np.testing.assert_array_equal(a.train.inputs, b.train.inputs)
    assert load_dataset("mmoe_synthetic", n_train=3, n_test=2, dim=3).task_names == \
        ["task1", "task2"]


def test_unknown_name_lists_valid_names_and_suggests():
    with pytest.raises(ValueError, match=r"unknown dataset 'multitabb'.*'mmoe_synthetic'.*"
                                         r"Did you mean 'multitab'\?"):
        load_dataset("multitabb")
    with pytest.raises(ValueError, match=r"valid names are \[.*'tfds_text'\]\.$"):
        load_dataset("zzzzzz")


def test_unknown_and_missing_keywords():
    with pytest.raises(TypeError, match=r"unknown keyword 'n_trian'.*Did you mean 'n_train'"):
        load_dataset("mmoe_synthetic", n_trian=10)
    with pytest.raises(TypeError, match=r"needs the keyword\(s\) \['name'\]"):
        load_dataset("tfds")


def test_tfds_through_registry():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        b = load_dataset("tfds", name="mnist", tasks={"digit": "label"})
    assert b.task("digit").dim == 10 and len(b.train) == 3
