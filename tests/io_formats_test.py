"""safetensors (single, sharded), orbax and artifacts: exact round trips, interchangeability, bad input."""
import json
import os

import ml_dtypes
import numpy as np
import pytest

import mtl.io as mio
from mtl import checkpoint as ckpt


def tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {"encoder/blocks/0/attn/qkv/kernel": rng.normal(size=(8, 6, 4)).astype(np.float32),
            "encoder/blocks/0/attn/qkv/bias": rng.normal(size=(6, 4)).astype(np.float32),
            "encoder/norm/scale": rng.normal(size=(8,)).astype(np.float16),
            "encoder/bf": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
            "encoder/step": np.arange(5, dtype=np.int64),
            "encoder/scalar": np.array(2.5, np.float64),
            "encoder/empty": np.zeros((0, 3), np.float32)}


def assert_same(a, b):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def test_safetensors_single_file_matches_the_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    t = {k: v for k, v in tensors().items() if v.dtype != ml_dtypes.bfloat16}  # no bf16 in its numpy API
    ours = mio.save_safetensors(str(tmp_path / "ours.safetensors"), t, metadata={"format": "pt"})
    assert_same(t, st.load_file(ours))                       # ours -> reference reader
    st.save_file(t, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    src = mio.SafetensorsSource(str(tmp_path / "ref.safetensors"))
    assert src.metadata == {"format": "pt"}
    assert_same(t, {p: src.load(p) for p in src.paths()})     # reference writer -> ours
    assert src.spec("encoder/norm/scale") == mio.TensorSpec((8,), np.dtype(np.float16))


def test_bfloat16_round_trip_against_torch(tmp_path):
    torch = pytest.importorskip("torch")
    stt = pytest.importorskip("safetensors.torch")
    x = np.random.default_rng(1).normal(size=(4, 7)).astype(ml_dtypes.bfloat16)
    f = mio.save_safetensors(str(tmp_path / "bf.safetensors"), {"w": x})
    got = stt.load_file(f)["w"]
    assert got.dtype == torch.bfloat16 and got.view(torch.int16).numpy().tobytes() == x.view(np.int16).tobytes()
    stt.save_file({"w": got * 2}, str(tmp_path / "bf2.safetensors"))
    back = mio.load_safetensors(str(tmp_path / "bf2.safetensors"))["w"]
    assert back.dtype == ml_dtypes.bfloat16 and np.array_equal(back.astype(np.float32), 2 * x.astype(np.float32))


def test_sharded_write_has_hf_layout_and_reads_back(tmp_path):
    t = tensors()
    out = mio.save_safetensors(str(tmp_path / "sharded"), t, max_shard_bytes=500)
    files = sorted(os.listdir(out))
    n = len(files) - 1
    assert n > 1 and files[-1] == "model.safetensors.index.json"
    assert files[:-1] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.load(open(os.path.join(out, files[-1])))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in t.values())
    assert sorted(index["weight_map"]) == sorted(t)
    for name, shard in index["weight_map"].items():  # every shard holds what the index says, nothing else
        hdr, _ = mio.safetensors.read_header(os.path.join(out, shard))
        assert name in hdr
    for path in (out, os.path.join(out, "model.safetensors.index.json")):
        assert_same(t, mio.load_safetensors(path))
    st = pytest.importorskip("safetensors.numpy")
    nobf = {k: v for k, v in t.items() if v.dtype != ml_dtypes.bfloat16}  # the reference's numpy API has no bf16
    ref = mio.save_safetensors(str(tmp_path / "nobf"), nobf, max_shard_bytes=500)
    merged = {}
    for f in sorted(os.listdir(ref))[:-1]:
        merged.update(st.load_file(os.path.join(ref, f)))
    assert_same(nobf, merged)
    # a directory whose tensors fit one shard is one model.safetensors, as save_pretrained writes it
    one = mio.save_safetensors(str(tmp_path / "one"), t)
    assert os.listdir(one) == ["model.safetensors"]


def test_writer_takes_tensors_in_any_order_and_checks_them(tmp_path):
    t = tensors()
    specs = mio.specs_of(mio.SafetensorsSource(mio.save_safetensors(str(tmp_path / "a.safetensors"), t)))
    out = str(tmp_path / "b")
    w = mio.SafetensorsWriter(out, specs, max_shard_bytes=300)
    for k in reversed(list(t)):
        w(k, t[k])
    with pytest.raises(ValueError, match="written twice"):
        w("encoder/step", t["encoder/step"])
    assert not os.path.exists(out)  # nothing under the final name before close
    w.close()
    assert_same(t, mio.load_safetensors(out))
    w = mio.SafetensorsWriter(str(tmp_path / "c.safetensors"), specs)
    with pytest.raises(ValueError, match=r"'encoder/norm/scale' is \(8,\) float32, planned as \(8,\) float16"):
        w("encoder/norm/scale", t["encoder/norm/scale"].astype(np.float32))
    with pytest.raises(KeyError, match="not among"):
        w("nope", t["encoder/step"])
    with pytest.raises(ValueError, match="never written"):
        w.close()
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b"]  # the temporary file is gone too
    with pytest.raises(FileExistsError, match="overwrite"):
        mio.SafetensorsWriter(out, specs)


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    t = tensors()
    out = mio.save_safetensors(str(tmp_path / "m.safetensors"), t)
    before = open(out, "rb").read()
    with pytest.raises(RuntimeError):
        with mio.SafetensorsWriter(out, t, overwrite=True) as w:
            w("encoder/step", t["encoder/step"] + 1)
            raise RuntimeError("merge failed midway")
    assert open(out, "rb").read() == before and os.listdir(tmp_path) == ["m.safetensors"]


def test_truncated_and_corrupt_files_are_named(tmp_path):
    t = tensors()
    f = mio.save_safetensors(str(tmp_path / "ok.safetensors"), t)
    raw = open(f, "rb").read()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(raw[:-5])
    with pytest.raises(mio.SafetensorsError, match=r"trunc\.safetensors is truncated: tensor .* ends at byte"):
        mio.SafetensorsSource(str(bad))
    bad.write_bytes(raw[:6])
    with pytest.raises(mio.SafetensorsError, match="shorter than the 8-byte header"):
        mio.SafetensorsSource(str(bad))
    n = int.from_bytes(raw[:8], "little")
    bad.write_bytes(raw[:8] + b"{" + b"x" * (n - 1) + raw[8 + n:])
    with pytest.raises(mio.SafetensorsError, match="header is not JSON"):
        mio.SafetensorsSource(str(bad))
    sharded = mio.save_safetensors(str(tmp_path / "sh"), t, max_shard_bytes=300)
    os.remove(os.path.join(sharded, "model-00002-of-%05d.safetensors" % (len(os.listdir(sharded)) - 1)))
    with pytest.raises(FileNotFoundError, match="names shard 'model-00002"):
        mio.SafetensorsSource(sharded)
    (tmp_path / "notes").mkdir()
    with pytest.raises(ValueError, match="unknown checkpoint format; expected a .safetensors file"):
        mio.open_source(str(tmp_path / "notes"))


def test_formats_are_interchangeable(tmp_path):
    """safetensors -> artifact -> orbax -> sharded safetensors: the same bytes at every step."""
    t = {k: v for k, v in tensors().items() if v.dtype != ml_dtypes.bfloat16 and v.size}
    st = mio.save_safetensors(str(tmp_path / "a.safetensors"), t)
    art = mio.convert(st, str(tmp_path / "a.mtl"), metadata={"note": "from safetensors"})
    assert mio.detect_format(art) == "artifact"
    src = mio.open_source(art)
    assert src.meta["note"] == "from safetensors" and src.meta["format"] == ckpt.ARTIFACT_FORMAT
    assert_same(t, {p: src.load(p) for p in src.paths()})
    params, _ = ckpt.load_artifact_params(art)  # loads as a normal artifact too
    assert params["encoder"]["blocks"]["0"]["attn"]["qkv"]["kernel"].tobytes() == \
        t["encoder/blocks/0/attn/qkv/kernel"].tobytes()
    orb = mio.convert(art, str(tmp_path / "orbax_ckpt"), format="orbax")
    assert mio.detect_format(orb) == "orbax"
    o = mio.open_source(orb)
    assert o.spec("encoder/norm/scale") == mio.TensorSpec((8,), np.dtype(np.float16))
    assert_same(t, {p: o.load(p) for p in o.paths()})
    back = mio.convert(orb, str(tmp_path / "back"), max_shard_bytes=200)
    assert_same(t, mio.load_safetensors(back))
    with pytest.raises(ValueError, match="max_shard_bytes applies to safetensors"):
        mio.open_writer(str(tmp_path / "x.mtl"), mio.specs_of(o), max_shard_bytes=10)


def test_artifact_source_checks_metadata_against_params(tmp_path):
    t = {"a": {"w": np.ones((2, 3), np.float32)}}
    art = ckpt.export_artifact(str(tmp_path / "x.mtl"), t, {})
    meta = json.load(open(os.path.join(art, "metadata.json")))
    meta["params"]["a/w"]["shape"] = [3, 2]
    json.dump(meta, open(os.path.join(art, "metadata.json"), "w"))
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"'a/w' has shape \(2, 3\)"):
        mio.ArtifactSource(art)


def test_orbax_training_checkpoint_step_with_a_root(tmp_path):
    store = ckpt.CheckpointStore(str(tmp_path / "ckpts"), asynchronous=False)
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    store.save(7, {"params": {"encoder": {"w": w}}, "opt": {"mu": np.zeros(3, np.float32)}}, {})
    store.close()
    step = str(tmp_path / "ckpts" / "7")
    assert mio.detect_format(step) == "orbax"
    src = mio.OrbaxSource(step, root="params")
    assert src.paths() == ["encoder/w"] and src.load("encoder/w").tobytes() == w.tobytes()
    assert sorted(mio.OrbaxSource(step).paths()) == ["opt/mu", "params/encoder/w"]
    with pytest.raises(KeyError, match="nothing under 'nope'"):
        mio.OrbaxSource(step, root="nope")
