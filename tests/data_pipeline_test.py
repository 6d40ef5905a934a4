"""Batching: deterministic for a seed, host shards partition the global batch, eval covers
every example once, validation is carved from train only."""
import numpy as np
import pytest

from mtl.data.base import ArraySource
from mtl.data.pipeline import TrainBatches, eval_batches, split_validation


def source(n=103):
    x = np.arange(n, dtype=np.float32)[:, None]
    return ArraySource(x, {"t": np.arange(n, dtype=np.int32)})


def test_batches_are_a_function_of_seed_and_step():
    a, b = TrainBatches(source(), 10, seed=3), TrainBatches(source(), 10, seed=3)
    for s in (0, 5, 11, 37):
        np.testing.assert_array_equal(a[s]["labels"]["t"], b[s]["labels"]["t"])
    assert not np.array_equal(TrainBatches(source(), 10, seed=4)[0]["labels"]["t"], a[0]["labels"]["t"])
    # an epoch is a permutation: 10 steps of 10 cover 100 distinct examples
    seen = np.concatenate([a.global_indices(s) for s in range(10)])
    assert len(set(seen.tolist())) == 100
    # a fresh object asked for step 37 directly agrees with one that walked there
    c = TrainBatches(source(), 10, seed=3)
    np.testing.assert_array_equal(c.global_indices(37), a.global_indices(37))


def test_hosts_read_disjoint_slices_of_the_same_global_batch():
    one = TrainBatches(source(), 12, seed=0, process_index=0, process_count=1)
    hosts = [TrainBatches(source(), 12, seed=0, process_index=i, process_count=3) for i in range(3)]
    for s in range(4):
        parts = [h.local_indices(s) for h in hosts]
        assert all(len(p) == 4 for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), one.global_indices(s))
        # each host reads only its own examples
        np.testing.assert_array_equal(np.sort(hosts[1].host_batch(s)["labels"]["t"]), np.sort(parts[1]))
    with pytest.raises(ValueError, match="not divisible"):
        TrainBatches(source(), 10, seed=0, process_index=0, process_count=3)


def test_eval_batches_cover_each_example_once_with_masked_padding():
    seen = []
    for b in eval_batches(source(), 16):
        seen.extend(b["labels"]["t"][b["masks"]["t"]].tolist())
        assert b["inputs"].shape[0] == 16
    assert sorted(seen) == list(range(103))


def test_validation_split_is_disjoint_and_deterministic():
    tr, va = split_validation(source(), 0.2, seed=1)
    tr2, va2 = split_validation(source(), 0.2, seed=1)
    a = tr[np.arange(len(tr))]["labels"]["t"]
    b = va[np.arange(len(va))]["labels"]["t"]
    assert len(b) == round(103 * 0.2) and not set(a) & set(b) and len(a) + len(b) == 103
    np.testing.assert_array_equal(b, va2[np.arange(len(va2))]["labels"]["t"])
    with pytest.raises(ValueError, match="val_fraction"):
        split_validation(source(), 0.0, seed=1)
