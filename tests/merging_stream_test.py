"""Streaming == in-memory, sharded (8 simulated devices) == unsharded, and the registry."""
import collections
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mtl.merging as mm

K = 3


def make_tree(rng):
    return {"enc": {"layers": {0: {"kernel": rng.normal(size=(16, 8)).astype(np.float32),
                                   "bias": rng.normal(size=(8,)).astype(np.float32)}}},
            "out": {"kernel": rng.normal(size=(16, 8)).astype(np.float32)}}


def setup(seed=0):
    rng = np.random.default_rng(seed)
    pre = make_tree(rng)
    fts = []
    for _ in range(K):
        ft = jax.tree.map(lambda a: a + (rng.normal(size=a.shape) * 0.1).astype(np.float32), pre)
        ft["head"] = {"kernel": rng.normal(size=(8, 2)).astype(np.float32)}  # task-specific, not in pretrained
        fts.append(ft)
    fishers = [jax.tree.map(lambda a: rng.uniform(0, 1, size=a.shape).astype(np.float32), pre) for _ in range(K)]
    grams = [{"enc/layers/0/kernel": mm.gram(rng.normal(size=(40, 16))), "out/kernel": mm.gram(rng.normal(size=(30, 16)))}
             for _ in range(K)]
    return pre, fts, fishers, grams


def cases(fishers, grams, pre):
    lw = mm.layerwise_coeffs({p: v for p, v in mm.flatten(pre).items() if not p.endswith("bias")}, K)
    lw = {p: v * jnp.array([1.0, 0.5, -0.2]) for p, v in lw.items()}
    return [
        ("average", {}),
        ("task_arithmetic", {"lam": 0.4}),
        ("combine", {"coeffs": lw}),
        ("ties", {"k": 25, "mode": "mean"}),
        ("ties", {"k": 10, "mode": "max", "lam": 0.5}),
        ("dare", {"p": 0.5, "seed": 3, "then": "ties", "k": 60, "mode": "sum", "lam": 0.3}),
        ("fisher", {"fishers": fishers}),
        ("regmean", {"grams": grams, "alpha": 0.8}),
    ]


def in_memory(name, pre, tvs, hp):
    if name == "combine":
        return mm.combine(pre, tvs, **hp)
    return mm.MERGERS[name](pre, tvs, **hp)


def _settle(still_alive, seconds=2.0):
    """Wait (up to ``seconds``) until jaxlib has dropped its references to finished host transfers.

    jaxlib releases the host array of a completed ``device_put`` from its transfer thread a moment
    later (the Python reference is freed at its next garbage pass), so right after a transfer the
    source's array can still be alive although the merge holds no reference to it. A reference the
    merge itself kept never goes away, so the count after this wait still catches it.
    """
    from jax._src.lib import _jax
    deadline = time.monotonic() + seconds
    while still_alive() and time.monotonic() < deadline:
        _jax.collect_garbage()
        time.sleep(0.001)


class CountingSource:
    """A lazy source that hands out fresh copies and records loads and live copies."""

    def __init__(self, tree):
        self.flat = mm.flatten(tree)
        self.loads = collections.Counter()
        self.alive = 0
        self.max_alive = 0

    def paths(self):
        return list(self.flat)

    def _dead(self):
        self.alive -= 1

    def load(self, path):
        _settle(lambda: self.alive > 0)
        self.loads[path] += 1
        x = np.array(self.flat[path])
        self.alive += 1
        self.max_alive = max(self.max_alive, self.alive)
        weakref.finalize(x, self._dead)
        return x


def test_streaming_equals_in_memory_bit_exact():
    pre, fts, fishers, grams = setup(0)
    exclude = ["head/*", "*bias"]
    tvs = mm.task_vectors(fts, pre, exclude=exclude)
    for name, hp in cases(fishers, grams, pre):
        want = mm.flatten(in_memory(name, pre, tvs, hp))
        got = mm.merge_stream(name, pre, fts, exclude=exclude, **hp)
        assert list(got) == list(want), name
        for p in want:
            np.testing.assert_array_equal(got[p], want[p], err_msg=f"{name} {hp} {p}")


def test_streaming_reads_tensor_by_tensor():
    pre, fts, _, _ = setup(1)
    for name, hp, reads in [("task_arithmetic", {}, 1), ("ties", {"k": 20}, 3)]:
        srcs = [CountingSource(f) for f in fts]
        psrc = CountingSource(pre)
        out = mm.merge_stream(name, psrc, srcs, exclude="head/*", **hp)
        assert set(out) == set(mm.flatten(pre))
        for s in srcs:
            assert dict(s.loads) == {p: reads for p in mm.flatten(pre)}  # heads never read
            assert s.max_alive <= 1  # never more than the current tensor of this model
        assert psrc.max_alive <= 1
    seen = []
    assert mm.merge_stream("average", pre, fts, exclude="head/*", sink=lambda p, x: seen.append(p)) is None
    assert sorted(seen) == sorted(mm.flatten(pre))


def test_streaming_errors_and_warnings():
    pre, fts, _, _ = setup(2)
    with pytest.raises(ValueError, match=r"head/kernel.*exclude"):
        mm.merge_stream("average", pre, fts)
    bad = jax.tree.map(lambda x: x, fts[1])
    bad["out"]["kernel"] = np.zeros((16, 9), np.float32)
    with pytest.raises(ValueError, match=r"out/kernel.*\(16, 8\) float32.*\(16, 9\) float32"):
        mm.merge_stream("average", pre, [fts[0], bad], exclude="head/*", names=["a", "b"])
    nan = jax.tree.map(lambda x: x.copy(), fts[1])
    nan["out"]["kernel"][0, 0] = np.inf
    with pytest.raises(ValueError, match=r"'out/kernel' of 'b' has non-finite"):
        mm.merge_stream("average", pre, [fts[0], nan], exclude="head/*", names=["a", "b"])
    same = dict(pre, head=fts[0]["head"])
    with pytest.warns(UserWarning, match="'b' is identical"):
        mm.merge_stream("average", pre, [fts[0], same], exclude="head/*", names=["a", "b"])


def test_sharded_equals_unsharded():
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    pre, fts, fishers, grams = setup(3)
    tvs = mm.task_vectors(fts, pre, exclude=["head/*", "*bias"])

    def shard(tree):
        return jax.tree.map(lambda x: None if x is None else jax.device_put(
            x, NamedSharding(mesh, P("fsdp", None) if np.ndim(x) == 2 else P("fsdp"))), tree,
            is_leaf=lambda x: x is None)

    spre, stvs, sfish = shard(pre), [shard(t) for t in tvs], [shard(f) for f in fishers]
    assert len(spre["out"]["kernel"].sharding.device_set) == 8
    for name, hp in cases(fishers, grams, pre):
        want = mm.flatten(in_memory(name, pre, tvs, hp))
        shp = dict(hp, fishers=sfish) if name == "fisher" else hp
        got = mm.flatten(in_memory(name, spre, stvs, shp))
        for p in want:
            if name == "regmean":  # sharded contractions may sum in another order
                np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-6, err_msg=f"{name} {p}")
            else:
                np.testing.assert_array_equal(got[p], want[p], err_msg=f"{name} {hp} {p}")
    got = mm.merge_stream("ties", spre, [shard(f) for f in fts], exclude=["head/*", "*bias"], k=20)
    want = mm.flatten(mm.ties(pre, tvs, k=20))
    for p in want:
        np.testing.assert_array_equal(got[p], want[p])
    assert got["out/kernel"].sharding.spec == P("fsdp", None)


def test_registry():
    pre, fts, fishers, _ = setup(4)
    tvs = mm.task_vectors(fts, pre, exclude="head/*")
    assert set(mm.MERGERS) == {"average", "task_arithmetic", "ties", "dare", "fisher", "regmean"}
    merger = mm.get_merger("ties", k=30, mode="sum", lam=0.2)
    for a, b in zip(jax.tree.leaves(merger(pre, tvs)), jax.tree.leaves(mm.ties(pre, tvs, k=30, mode="sum", lam=0.2))):
        np.testing.assert_array_equal(a, b)
    mm.get_merger("fisher", fishers=fishers)(pre, tvs)
    with pytest.raises(ValueError, match="average, dare, fisher, regmean, task_arithmetic, ties"):
        mm.get_merger("tie")
    with pytest.raises(TypeError, match=r"'ties'.*lamda.*valid: k, lam, mode"):
        mm.get_merger("ties", lamda=0.3)
    with pytest.raises(TypeError, match=r"then='ties'.*kk"):
        mm.get_merger("dare", then="ties", kk=3)
    with pytest.raises(ValueError, match="unknown merge core"):
        mm.merge_stream("median", pre, fts)
