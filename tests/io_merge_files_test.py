"""merge_files / `mtl merge-files`: out-of-core merges of mixed formats equal the in-memory merge bit for bit."""
import os

import jax
import numpy as np
import pytest

import mtl.io as mio
import mtl.merging as mm
from mtl import checkpoint as ckpt
from mtl.merging.files import merge_files, parse_size

K = 3


def make(seed=0):
    rng = np.random.default_rng(seed)
    pre = {"enc/layers/0/kernel": rng.normal(size=(16, 8)).astype(np.float32),
           "enc/layers/0/bias": rng.normal(size=(8,)).astype(np.float32),
           "enc/out/kernel": rng.normal(size=(8, 12)).astype(np.float32),
           "enc/count": np.arange(3, dtype=np.int32)}
    fts = []
    for _ in range(K):
        ft = {p: (a + (rng.normal(size=a.shape) * 0.1).astype(a.dtype)) if a.dtype == np.float32 else a
              for p, a in pre.items()}
        ft["head/kernel"] = rng.normal(size=(8, 2)).astype(np.float32)
        fts.append(ft)
    return pre, fts


def write_mixed(tmp_path, pre, fts):
    """The base as one safetensors file, the fine-tunes as artifact, orbax and sharded safetensors."""
    base = mio.save_safetensors(str(tmp_path / "base.safetensors"), pre)
    nest = lambda flat: mio.artifacts._nest(flat)  # noqa: E731
    paths = [ckpt.export_artifact(str(tmp_path / "ft0.mtl"), nest(fts[0]), {}),
             ckpt.save_orbax_tree(str(tmp_path / "ft1_orbax"), nest(fts[1])),
             mio.save_safetensors(str(tmp_path / "ft2"), fts[2], max_shard_bytes=300)]
    return base, paths


CASES = [("average", {}), ("task_arithmetic", {"lam": 0.4}), ("ties", {"k": 30, "lam": 0.9}),
         ("dare", {"p": 0.3, "seed": 1})]


@pytest.mark.parametrize("method,kw", CASES)
def test_merge_files_equals_in_memory_merge(tmp_path, method, kw):
    pre, fts = make()
    base, paths = write_mixed(tmp_path, pre, fts)
    ref = mm.merge_stream(method, pre, fts, exclude=["head/*"], **kw)  # in memory, from dicts
    ref_tree = mm.MERGERS[method](pre, mm.task_vectors(fts, pre, exclude=["head/*"]), **kw) \
        if method != "average" else None
    for overlap in (True, False):  # read-ahead and write-behind threads, or everything in order
        out = merge_files(method, base, paths, str(tmp_path / f"m{overlap}"), exclude=["head/*"],
                          prefetch=overlap, write_behind=overlap, max_shard_bytes=400, **kw)
        got = mio.load_safetensors(out)
        assert list(got) == list(pre)
        for p in pre:
            assert got[p].dtype == pre[p].dtype and got[p].tobytes() == np.asarray(ref[p]).tobytes(), p
            if ref_tree is not None:
                assert got[p].tobytes() == np.asarray(mm.flatten(ref_tree)[p]).tobytes(), p
    # an independent check of one method: task arithmetic is θ0 + λ Σ τ_k
    if method == "task_arithmetic":
        p = "enc/out/kernel"
        expect = pre[p].astype(np.float64) + 0.4 * sum(f[p].astype(np.float64) - pre[p] for f in fts)
        np.testing.assert_allclose(got[p], expect, rtol=1e-6, atol=1e-6)
        assert np.array_equal(got["enc/count"], pre["enc/count"])


def test_artifact_output_keeps_the_base_metadata(tmp_path):
    pre, fts = make()
    nest = mio.artifacts._nest
    base = ckpt.export_artifact(str(tmp_path / "base.mtl"), nest(pre), {"tasks": ["x"], "input_shape": [16]})
    paths = [mio.save_safetensors(str(tmp_path / f"f{i}.safetensors"), f) for i, f in enumerate(fts)]
    out = merge_files("task_arithmetic", base, paths, str(tmp_path / "merged.mtl"), exclude=["head/*"], lam=0.3)
    meta = ckpt.read_artifact_metadata(out)
    assert meta["tasks"] == ["x"] and meta["merge"]["method"] == "task_arithmetic"
    got = mio.open_source(out)
    ref = mm.merge_stream("task_arithmetic", pre, fts, exclude=["head/*"], lam=0.3)
    for p in pre:
        assert got.load(p).tobytes() == np.asarray(ref[p]).tobytes()
    with pytest.raises(ValueError, match="artifact output needs the model's metadata"):
        merge_files("average", paths[0], paths[1:], str(tmp_path / "m2.mtl"), exclude=["head/*"])


def test_bad_inputs_leave_nothing_behind(tmp_path):
    pre, fts = make()
    base, _ = write_mixed(tmp_path, pre, fts)
    bad = dict(fts[1])
    bad["enc/out/kernel"] = bad["enc/out/kernel"][:, :6]
    good0 = mio.save_safetensors(str(tmp_path / "g0.safetensors"), fts[0])
    bad1 = mio.save_safetensors(str(tmp_path / "bad1.safetensors"), bad)
    out = str(tmp_path / "merged")
    with pytest.raises(ValueError, match=r"'enc/out/kernel' differs: 'pretrained' has \(8, 12\) float32, .*bad1\.safetensors' has \(8, 6\) float32"):
        merge_files("task_arithmetic", base, [good0, bad1], out, exclude=["head/*"])
    nan = dict(fts[1])
    nan["enc/layers/0/bias"] = nan["enc/layers/0/bias"].copy()
    nan["enc/layers/0/bias"][3] = np.nan
    nanf = mio.save_safetensors(str(tmp_path / "nan.safetensors"), nan)
    with pytest.raises(ValueError, match="non-finite"):
        merge_files("ties", base, [good0, nanf], out, exclude=["head/*"], k=20)
    with pytest.raises(ValueError, match="has parameter 'head/kernel' that 'pretrained' lacks"):
        merge_files("average", base, [good0], out)
    assert not any(n.startswith("merged") for n in os.listdir(tmp_path))
    with pytest.warns(UserWarning, match="identical to 'pretrained'"):
        merge_files("average", base, [good0, base], str(tmp_path / "w.safetensors"), exclude=["head/*"])


def test_cli_merge_files(tmp_path, capsys):
    from mtl.cli import main

    pre, fts = make()
    base, paths = write_mixed(tmp_path, pre, fts)
    out = str(tmp_path / "cli_out")
    rc = main(["merge-files", "--method", "ties", "--base", base, "--models", *paths, "--out", out,
               "--exclude", "head/*", "--kw", "k=30", "--kw", "lam=0.9", "--max-shard-size", "400B"])
    assert rc == 0, capsys.readouterr().err
    ref = mm.merge_stream("ties", pre, fts, exclude=["head/*"], k=30, lam=0.9)
    got = mio.load_safetensors(out)
    assert all(got[p].tobytes() == np.asarray(ref[p]).tobytes() for p in pre)
    assert len(os.listdir(out)) > 2  # sharded + index
    assert main(["merge-files", "--method", "ties", "--base", base, "--models", *paths, "--out", out]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["merge-files", "--method", "nope", "--base", base, "--models", paths[0], "--out",
                 str(tmp_path / "z")]) == 1
    assert "nope" in capsys.readouterr().err and not os.path.exists(tmp_path / "z")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100") == 100
    assert parse_size(None) is None and parse_size("1.5MB") == 1_500_000
    with pytest.raises(ValueError, match="KB/MB/GB"):
        parse_size("lots")


def test_prefetch_reads_ahead_and_stays_correct(tmp_path):
    pre, _ = make()
    src = mio.SafetensorsSource(mio.save_safetensors(str(tmp_path / "p.safetensors"), pre))
    order = [p for p in pre if p != "enc/count"]
    with mio.prefetch_all([src], order) as (w,):
        for p in order + order[:1] + ["enc/count", order[2]]:  # in order, wrap, then two surprises
            assert w.load(p).tobytes() == pre[p].tobytes()
        assert w.hits == len(order) and w.misses == 3
    jax.clear_caches()


def test_write_behind_surfaces_a_writer_failure():
    from mtl.merging.files import _WriteBehind

    got = []

    def sink(p, x):
        if p == "b":
            raise OSError("disk full")
        got.append((p, x.copy()))

    wb = _WriteBehind(sink)
    wb("a", np.ones(2))
    wb("b", np.ones(2))
    with pytest.raises(OSError, match="disk full"):
        for p in "cdefgh":  # raised at a later call once the thread has failed, at the latest by finish()
            wb(p, np.ones(2))
        wb.finish()
    wb.finish_quietly()
    assert [p for p, _ in got] == ["a"]
