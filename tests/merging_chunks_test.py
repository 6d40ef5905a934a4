"""Merging large tensors in row chunks: the chunks give the whole-tensor merge bit for bit, read and write
only their rows, and the methods that cannot be chunked (RegMean) or inputs that do not match are refused
before anything is written."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl.io as mio
import mtl.merging as mm
from mtl.merging import dare_mask
from mtl.merging.files import merge_files
from mtl.merging.sources import Chunk, row_chunks, stream_inputs

K = 3
BIG = "enc/embed"  # 37 x 24 float32: 3552 bytes per model


def make(seed=0):
    rng = np.random.default_rng(seed)
    pre = {BIG: rng.normal(size=(37, 24)).astype(np.float32),
           "enc/kernel": rng.normal(size=(8, 6)).astype(np.float32),
           "enc/bias": rng.normal(size=(6,)).astype(np.float32)}
    fts = [{p: (a + rng.normal(size=a.shape) * 0.1).astype(np.float32) for p, a in pre.items()} for _ in range(K)]
    return pre, fts


BUDGET = 4 * 10 * 24 * (K + 1)  # 10 rows of every model at once: chunks of 10, 10, 10 and 7 rows of BIG

CASES = [("average", {}), ("task_arithmetic", {"lam": 0.4}), ("ties", {"k": 30.0, "lam": 0.9}),
         ("ties", {"k": 60.0, "mode": "max"}), ("dare", {"p": 0.4, "seed": 3}),
         ("dare", {"p": 0.5, "seed": 1, "then": "ties", "k": 40.0, "mode": "sum"})]


def test_row_chunks_plan():
    keys = row_chunks([BIG, "enc/bias"], {BIG: ((37, 24), 4), "enc/bias": ((6,), 4)}, K + 1, BUDGET)
    assert [str(k) for k in keys] == [f"{BIG}[rows 0:10]", f"{BIG}[rows 10:20]", f"{BIG}[rows 20:30]",
                                      f"{BIG}[rows 30:37]", "enc/bias"]
    assert keys[3].last and not keys[0].last and keys[1].offset == 10 * 24 and keys[0].total == 37 * 24
    one_row = row_chunks([BIG], {BIG: ((37, 24), 4)}, K + 1, 1)  # a budget under one row: one row per chunk
    assert len(one_row) == 37
    assert row_chunks([BIG], {BIG: ((37, 24), 4)}, K + 1, None) == [BIG]
    with pytest.raises(ValueError, match="positive"):
        row_chunks([BIG], {BIG: ((37, 24), 4)}, K + 1, 0)


def test_keep_mask_of_a_chunk_is_the_rows_of_the_whole_mask():
    w = np.array([0x1234567, 0x89ABCDEF], np.uint32)
    t = dare_mask.threshold(0.3)
    whole = dare_mask.keep_mask_np((37, 24), w, t)
    for a, b in [(0, 10), (10, 20), (30, 37)]:
        np.testing.assert_array_equal(dare_mask.keep_mask_np((b - a, 24), w, t, offset=a * 24), whole[a:b])
        got = jax.jit(lambda o: dare_mask.keep_mask((b - a, 24), w, t, o))(np.uint32(a * 24))  # noqa: B023
        np.testing.assert_array_equal(np.asarray(got), whole[a:b])


@pytest.mark.parametrize("method,kw", CASES)
def test_chunked_merge_equals_whole_tensor_merge(method, kw):
    pre, fts = make()
    inp, _, _ = stream_inputs(pre, fts, chunk_bytes=BUDGET)
    assert sum(isinstance(k, Chunk) for k in inp.paths) == 4
    want = mm.merge_stream(method, pre, fts, **kw)
    got = mm.merge_stream(method, pre, fts, chunk_bytes=BUDGET, **kw)
    assert list(got) == list(want)
    for p in want:
        assert np.asarray(got[p]).tobytes() == np.asarray(want[p]).tobytes(), (method, kw, p)


def test_chunked_fisher_and_layerwise_combine():
    pre, fts = make(1)
    rng = np.random.default_rng(2)
    fishers = [{p: np.abs(rng.normal(size=a.shape)).astype(np.float32) for p, a in pre.items()} for _ in range(K)]
    coeffs = {p: jnp.asarray(rng.uniform(0.1, 0.9, size=K).astype(np.float32)) for p in pre}
    for method, kw in [("fisher", {"fishers": fishers}), ("combine", {"coeffs": coeffs})]:
        want = mm.merge_stream(method, pre, fts, **kw)
        got = mm.merge_stream(method, pre, fts, chunk_bytes=BUDGET, **kw)
        for p in want:
            assert np.asarray(got[p]).tobytes() == np.asarray(want[p]).tobytes(), (method, p)


class Spy:
    """A source that records the largest number of bytes any one read returned."""

    def __init__(self, src):
        self.src, self.largest = src, 0

    def paths(self):
        return self.src.paths()

    def spec(self, p):
        return self.src.spec(p)

    def _seen(self, x):
        self.largest = max(self.largest, x.nbytes)
        return x

    def load(self, p):
        return self._seen(self.src.load(p))

    def load_rows(self, p, a, b):
        return self._seen(self.src.load_rows(p, a, b))


@pytest.mark.parametrize("overlap", [True, False])
def test_merge_files_in_row_chunks(tmp_path, overlap):
    """safetensors in and out: each chunk is read and written alone, the file equals the unchunked merge."""
    pre, fts = make(4)
    base = mio.save_safetensors(str(tmp_path / "base.safetensors"), pre)
    paths = [mio.save_safetensors(str(tmp_path / f"ft{k}.safetensors"), f) for k, f in enumerate(fts)]
    whole = merge_files("ties", base, paths, str(tmp_path / "whole.safetensors"), chunk_bytes=None, k=30.0)
    spies = [Spy(mio.open_source(p)) for p in [base, *paths]]
    chunked = merge_files("ties", spies[0], spies[1:], str(tmp_path / f"chunked{overlap}.safetensors"),
                          chunk_bytes=BUDGET, prefetch=overlap, write_behind=overlap, k=30.0)
    with open(whole, "rb") as f, open(chunked, "rb") as g:
        assert f.read() == g.read()
    assert max(s.largest for s in spies) == 10 * 24 * 4  # the largest read: one 10-row chunk of BIG
    small = merge_files("average", base, paths, str(tmp_path / "auto.safetensors"))  # "auto": nothing chunked
    want = mm.merge_stream("average", pre, fts)
    got = mio.load_safetensors(small)
    assert all(got[p].tobytes() == np.asarray(want[p]).tobytes() for p in pre)


def test_sink_without_chunks_gets_whole_tensors():
    pre, fts = make(5)
    seen = []
    mm.merge_stream("task_arithmetic", pre, fts, chunk_bytes=BUDGET, sink=lambda p, x: seen.append((p, x)))
    want = mm.merge_stream("task_arithmetic", pre, fts)
    assert [p for p, _ in seen] == list(want) and all(type(p) is str for p, _ in seen)
    assert all(np.asarray(x).tobytes() == np.asarray(want[p]).tobytes() for p, x in seen)


def test_refused_before_anything_is_written(tmp_path):
    pre, fts = make(6)
    base = mio.save_safetensors(str(tmp_path / "base.safetensors"), pre)
    paths = [mio.save_safetensors(str(tmp_path / f"ft{k}.safetensors"), f) for k, f in enumerate(fts)]
    grams = [{"enc/kernel": np.eye(8, dtype=np.float32), BIG: np.eye(37, dtype=np.float32)} for _ in range(K)]
    out = str(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=rf"RegMean cannot merge '{BIG}' in row chunks"):
        merge_files("regmean", base, paths, out, chunk_bytes=BUDGET, grams=grams)
    assert sorted(os.listdir(tmp_path)) == ["base.safetensors"] + [f"ft{k}.safetensors" for k in range(K)]
    # "auto" leaves RegMean's tensors whole
    merge_files("regmean", base, paths, out, chunk_bytes="auto", grams=grams)
    longer = dict(fts[1], **{BIG: np.zeros((40, 24), np.float32)})
    with pytest.raises(ValueError, match=rf"parameter '{BIG}' differs: 'pretrained' has \(37, 24\) float32,"
                                         r" 'model 2' has \(40, 24\) float32"):
        mm.merge_stream("average", pre, [fts[0], longer, fts[2]], chunk_bytes=BUDGET)


def test_non_finite_input_names_the_chunk():
    pre, fts = make(7)
    bad = dict(fts[2], **{BIG: fts[2][BIG].copy()})
    bad[BIG][23, 5] = np.nan
    with pytest.raises(ValueError, match=rf"'{BIG}\[rows 20:30\]' of 'c' has non-finite"):
        mm.merge_stream("ties", pre, [fts[0], fts[1], bad], names=["a", "b", "c"], chunk_bytes=BUDGET, k=50.0)
