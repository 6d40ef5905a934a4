"""Hugging Face ViT / CLIP vision / GPT-2 into mtl encoders and back: outputs equal transformers' on the same weights.

Tiny random models are built locally with ``transformers`` (no downloads); skipped when it is not installed
(``pip install -e .[hf]``).
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import mtl.io as mio  # noqa: E402
from mtl.io import hf  # noqa: E402
from mtl.merging import merge_stream  # noqa: E402
from mtl.merging.files import merge_files  # noqa: E402
from mtl.merging.tree import flatten  # noqa: E402
from mtl.nn.encoders import ViT  # noqa: E402

TOL = dict(rtol=1e-4, atol=2e-5)


def randomize(model, seed=0, scale=0.2):
    """Every weight drawn at random (layer-norm scales around 1), so a swapped or transposed tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            parts = name.split(".")
            is_norm = "norm" in name or (len(parts) > 1 and parts[-2].startswith("ln"))
            p.copy_(1 + noise if is_norm and name.endswith("weight") else noise)
    return model.eval()


def vit_cfg(**kw):
    return transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48, **kw)


def clip_cfg(**kw):
    return transformers.CLIPVisionConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **kw)


def gpt2_cfg(**kw):
    return transformers.GPT2Config(vocab_size=50, n_positions=12, n_embd=32, n_layer=2, n_head=4,
                                   bos_token_id=0, eos_token_id=0, **kw)


def images(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 16, 16, 3)).astype(np.float32)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_vit_import_matches_transformers(tmp_path):
    m = randomize(transformers.ViTModel(vit_cfg()))
    m.save_pretrained(tmp_path / "vit")
    x = images()
    with torch.no_grad():
        ref = m(pixel_values=nchw(x)).last_hidden_state.numpy()
    enc, src = hf.load_encoder(str(tmp_path / "vit"), pool=None)
    assert src.layout.name == "vit" and src.encoder_kwargs["act"] == "gelu" and src.encoder_kwargs["norm_eps"] == 1e-12
    assert any(n.startswith("pooler.") for n in src.unused)
    np.testing.assert_allclose(np.asarray(enc(jnp.asarray(x))), ref, **TOL)
    cls_enc, _ = hf.load_encoder(str(tmp_path / "vit"))  # pool='cls': the class token of the same tokens
    np.testing.assert_allclose(np.asarray(cls_enc(jnp.asarray(x))), ref[:, 0], **TOL)


def test_vit_for_classification_prefix_and_qkv_without_bias(tmp_path):
    m = randomize(transformers.ViTForImageClassification(vit_cfg(qkv_bias=False, num_labels=3)), seed=1)
    m.save_pretrained(tmp_path / "cls")
    x = images(2, seed=1)
    with torch.no_grad():
        ref = m.vit(pixel_values=nchw(x)).last_hidden_state.numpy()
    enc, src = hf.load_encoder(str(tmp_path / "cls"), pool=None)
    assert src.hf_prefix == "vit." and "classifier.weight" in src.unused
    np.testing.assert_allclose(np.asarray(enc(jnp.asarray(x))), ref, **TOL)
    assert not np.any(src.load("blocks/0/attn/qkv/bias"))


def test_clip_vision_import_matches_transformers(tmp_path):
    m = randomize(transformers.CLIPVisionModelWithProjection(clip_cfg(projection_dim=8)), seed=2)
    m.save_pretrained(tmp_path / "clip")
    x = images(seed=2)
    with torch.no_grad():
        out = m.vision_model(pixel_values=nchw(x))
        ref_pooled = out.pooler_output.numpy()
        ref_tokens = m.vision_model.post_layernorm(out.last_hidden_state).numpy()
    enc, src = hf.load_encoder(str(tmp_path / "clip"))
    kw = src.encoder_kwargs
    assert (src.layout.name, kw["act"], kw["norm_eps"], kw["pre_norm"]) == ("clip_vision", "quick_gelu", 1e-5, True)
    assert src.hf_prefix == "vision_model." and "visual_projection.weight" in src.unused
    np.testing.assert_allclose(np.asarray(enc(jnp.asarray(x))), ref_pooled, **TOL)
    tok, _ = hf.load_encoder(str(tmp_path / "clip"), pool=None)
    np.testing.assert_allclose(np.asarray(tok(jnp.asarray(x))), ref_tokens, **TOL)


def test_gpt2_import_matches_transformers(tmp_path):
    m = randomize(transformers.GPT2LMHeadModel(gpt2_cfg()), seed=3)
    m.save_pretrained(tmp_path / "gpt2")
    ids = np.random.default_rng(3).integers(0, 50, size=(2, 12))
    with torch.no_grad():
        ref = m.transformer(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    enc, src = hf.load_encoder(str(tmp_path / "gpt2"))
    assert src.encoder_name == "byte_transformer" and src.hf_prefix == "transformer."
    np.testing.assert_allclose(np.asarray(enc(jnp.asarray(ids))), ref, **TOL)
    np.testing.assert_allclose(np.asarray(enc(jnp.asarray(ids[:, :7]))), ref[:, :7], **TOL)  # causal: a prefix


def _mtl_model(make, seed):
    """An mtl module with every parameter drawn at random."""
    import jax

    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda s: jnp.asarray((rng.normal(size=s.shape) * 0.2).astype(s.dtype)), state)
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("layout", ["vit", "clip_vision"])
def test_vit_export_loads_in_transformers(tmp_path, layout):
    clip = layout == "clip_vision"
    kw = dict(patch=4, dim=32, depth=2, num_heads=4, mlp_ratio=1.5, pool=None,
              act="quick_gelu" if clip else "gelu", norm_eps=1e-5 if clip else 1e-12, pre_norm=clip)
    model = _mtl_model(lambda: ViT((16, 16, 3), rngs=nnx.Rngs(0), **kw), seed=4)
    params = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    if clip:  # CLIP has no patch bias
        with pytest.raises(ValueError, match="'embed/bias' is not zero, but CLIP's patch embedding has no bias"):
            hf.export(params, layout, kw, (16, 16, 3), str(tmp_path / "bad"))
        assert not os.path.exists(tmp_path / "bad")
        params["embed/bias"] = np.zeros_like(params["embed/bias"])
        model.embed.bias[...] = jnp.zeros_like(model.embed.bias[...])
    out = hf.export(params, layout, kw, (16, 16, 3), str(tmp_path / layout))
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] in ("vit", "clip_vision_model")
    x = images(seed=4)
    with torch.no_grad():
        if clip:
            m = transformers.CLIPVisionModel.from_pretrained(out).eval()
            o = m(pixel_values=nchw(x))
            ref = getattr(m, "vision_model", m).post_layernorm(o.last_hidden_state).numpy()
        else:
            m = transformers.ViTModel.from_pretrained(out, add_pooling_layer=False).eval()
            ref = m(pixel_values=nchw(x)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), ref, **TOL)
    back = hf.HFSource(out)  # export then import: the same parameters bit for bit
    assert all(back.load(p).tobytes() == np.asarray(params[p]).tobytes() for p in params)


def test_gpt2_export_round_trip(tmp_path):
    m = randomize(transformers.GPT2Model(gpt2_cfg()), seed=5)
    m.save_pretrained(tmp_path / "src")
    src = hf.HFSource(str(tmp_path / "src"), prefix="encoder/")
    assert src.paths()[0].startswith("encoder/")
    out = hf.export(src, "gpt2", src.encoder_kwargs, src.input_shape, str(tmp_path / "out"), prefix="encoder/")
    a, b = mio.load_safetensors(str(tmp_path / "src")), mio.load_safetensors(out)
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)  # tensors byte-identical
    m2 = transformers.GPT2Model.from_pretrained(out).eval()
    ids = torch.from_numpy(np.random.default_rng(5).integers(0, 50, size=(2, 9)))
    with torch.no_grad():
        np.testing.assert_allclose(m2(input_ids=ids).last_hidden_state.numpy(),
                                   m(input_ids=ids).last_hidden_state.numpy(), rtol=0, atol=0)


def test_merging_hf_files_commutes_with_the_name_mapping(tmp_path):
    """TA of CLIP fine-tunes in HF names (out of core) == TA of the mapped mtl parameters, bit for bit."""
    paths = []
    for i in range(3):
        m = randomize(transformers.CLIPVisionModel(clip_cfg()), seed=10 + i)
        m.save_pretrained(tmp_path / f"m{i}")
        paths.append(str(tmp_path / f"m{i}"))
    out = merge_files("task_arithmetic", paths[0], paths[1:], str(tmp_path / "merged"), lam=0.4)
    assert os.path.isfile(os.path.join(out, "config.json"))  # copied from the base: loads like the base
    merged = hf.HFSource(out)
    ref = merge_stream("task_arithmetic", hf.HFSource(paths[0]), [hf.HFSource(p) for p in paths[1:]], lam=0.4)
    for p in merged.paths():
        assert merged.load(p).tobytes() == np.asarray(ref[p]).tobytes(), p
    transformers.CLIPVisionModel.from_pretrained(out)  # and transformers reads the merged files


def test_differences_are_refused_with_the_reason(tmp_path):
    for kw, msg in ((dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
                    (dict(activation_function="relu"), "activation 'relu' has no mtl equivalent"),
                    (dict(scale_attn_weights=False), "scale_attn_weights")):
        with pytest.raises(ValueError, match=msg):
            hf.layout_from_config(gpt2_cfg(**kw).to_dict())
    with pytest.raises(ValueError, match=r"unknown Hugging Face layout \(model_type 'bert'.*supported layouts: vit, clip_vision, gpt2"):
        hf.layout_from_config({"model_type": "bert"})
    with pytest.raises(ValueError, match="not square"):
        hf.layout_from_config({**vit_cfg().to_dict(), "image_size": [16, 8]})
    with pytest.raises(ValueError, match="export it as 'clip_vision'"):
        hf.hf_config("vit", {"pre_norm": True}, (16, 16, 3))
    with pytest.raises(ValueError, match="pre_norm=False"):
        hf.hf_config("clip_vision", {}, (16, 16, 3))
    m = randomize(transformers.ViTModel(vit_cfg()))
    m.save_pretrained(tmp_path / "v")
    with pytest.raises(ValueError, match="not a clip_vision checkpoint"):
        hf.HFSource(str(tmp_path / "v"), layout="clip_vision")
    cfg = json.load(open(tmp_path / "v" / "config.json"))
    with pytest.raises(ValueError, match="does not fit 'blocks/0/mlp/up/kernel'"):
        hf.HFSource(str(tmp_path / "v"), config={**cfg, "intermediate_size": 64})
    os.remove(tmp_path / "v" / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.HFSource(str(tmp_path / "v"))


def test_encoder_defaults_unchanged():
    """The new options default to the old behaviour: tanh GELU, eps 1e-6, no pre-norm, same parameters."""
    with nnx.use_eager_sharding(False):
        v = ViT((8, 8, 3), patch=4, dim=8, depth=1, num_heads=2, rngs=nnx.Rngs(0))
    assert v.pre_norm is None and v.norm.epsilon == 1e-6 and v.blocks[0].mlp.act == "gelu_tanh"
    assert "pre_norm/scale" not in flatten(nnx.to_pure_dict(nnx.state(v, nnx.Param)))
    x = jnp.linspace(-3, 3, 7)
    from mtl.nn.layers import ACTIVATIONS
    np.testing.assert_allclose(ACTIVATIONS["gelu_tanh"](x),
                               0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))), rtol=1e-6)
    np.testing.assert_allclose(ACTIVATIONS["quick_gelu"](x), x / (1 + np.exp(-1.702 * x)), rtol=1e-6)


def test_full_clip_model_vision_part(tmp_path):
    """A full CLIPModel (model_type 'clip'): the vision tower under 'vision_model.', the text side left unused."""
    cfg = transformers.CLIPConfig(text_config=dict(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32,
                                                   max_position_embeddings=8),
                                  vision_config=clip_cfg().to_dict(), projection_dim=8)
    m = randomize(transformers.CLIPModel(cfg), seed=7)
    m.save_pretrained(tmp_path / "full")
    x = images(2, seed=7)
    with torch.no_grad():
        ref = m.vision_model(pixel_values=nchw(x)).pooler_output.numpy()
    enc, src = hf.load_encoder(str(tmp_path / "full"))
    assert src.hf_prefix == "vision_model." and any(n.startswith("text_model.") for n in src.unused)
    np.testing.assert_allclose(np.asarray(enc(jnp.asarray(x))), ref, **TOL)


def test_hf_files_merge_with_an_mtl_artifact(tmp_path):
    """--map-hf: HF CLIP checkpoints read in mtl names merge with an artifact of the same encoder, bit for bit."""
    from mtl import checkpoint as ckpt
    from mtl.cli import main

    paths = []
    for i in range(3):
        m = randomize(transformers.CLIPVisionModel(clip_cfg()), seed=20 + i)
        m.save_pretrained(tmp_path / f"m{i}")
        paths.append(str(tmp_path / f"m{i}"))
    ft2 = hf.HFSource(paths[2], prefix="encoder/")
    art = ckpt.export_artifact(str(tmp_path / "ft2.mtl"),
                               mio.artifacts._nest({p: ft2.load(p) for p in ft2.paths()}), {})
    out = str(tmp_path / "merged.safetensors")
    assert main(["merge-files", "--method", "ties", "--base", paths[0], "--models", paths[1], art,
                 "--out", out, "--map-hf", "encoder/", "--kw", "k=50"]) == 0
    ref = merge_stream("ties", hf.HFSource(paths[0], prefix="encoder/"),
                       [hf.HFSource(p, prefix="encoder/") for p in paths[1:]], k=50)
    got = mio.load_safetensors(out)
    assert sorted(got) == sorted(ref) and all(got[p].tobytes() == np.asarray(ref[p]).tobytes() for p in ref)


def test_bfloat16_checkpoint_loads_as_float32_encoder(tmp_path):
    m = randomize(transformers.GPT2Model(gpt2_cfg()), seed=8).to(torch.bfloat16)
    m.save_pretrained(tmp_path / "bf16")
    src = hf.HFSource(str(tmp_path / "bf16"))
    assert str(src.spec("tok/embedding").dtype) == "bfloat16"
    enc, _ = hf.load_encoder(str(tmp_path / "bf16"))
    got = np.asarray(enc.blocks[0].mlp.up.kernel[...])
    want = m.h[0].mlp.c_fc.weight.detach().float().numpy()  # Conv1D [in, out]: the kernel as stored
    assert got.dtype == np.float32 and np.array_equal(got, want)
