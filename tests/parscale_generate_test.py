"""ParScale generation: KV-cached decoding equals the uncached forward token by token;
the cache holds the prefixes; bad prompts are refused; `mtl generate` on a trained run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl.nn import heads
from mtl.nn.encoders import ByteTransformer
from mtl.nn.multitask import MultiTaskModel
from mtl.nn.parscale import ParScale, forward_cached, generate, init_cache
from mtl.tasks import Task

TASKS = [Task("lm", heads.LanguageModel(256))]


def model(P, seq_len=32, vocab=256, prefix_len=5, gated=False):
    with nnx.use_eager_sharding(False):
        enc = ByteTransformer((seq_len,), vocab_size=vocab, dim=32, depth=2, num_heads=2, rngs=nnx.Rngs(0))
        m = MultiTaskModel(enc, [Task("lm", heads.LanguageModel(vocab))], rngs=nnx.Rngs(1))
        ps = ParScale(m, P, prefix_len=prefix_len, prefix_gate=gated, rngs=nnx.Rngs(2))
    if gated:  # open gates (they start at 0, where the prefixes are not seen at all), prefixes away from 0
        ps.prefix.gate[...] = jnp.asarray([[0.9, -0.6], [0.4, 1.5]])
        for d in ps.prefix.down:
            d.kernel[...] *= 30.0
    return ps


@pytest.mark.parametrize("P,gated", [(1, False), (3, False), (3, True)])
def test_cached_greedy_decoding_equals_uncached_forward(P, gated):
    m = model(P, gated=gated)
    g = generate(m, "def ", 12, batch=2)
    seq = [ord(c) for c in "def "]
    # independent reference: the full (uncached) forward of the encoder's own attention, on the
    # sequence so far padded to one fixed length (causal: the padding cannot change position t)
    full = nnx.jit(lambda m, x: m(x)["lm"])
    for _ in range(12):
        x = jnp.asarray([seq + [0] * (32 - len(seq))], jnp.int32)
        seq.append(int(jnp.argmax(full(m, x)[0, len(seq) - 1])))
    np.testing.assert_array_equal(g.tokens[0], seq)
    np.testing.assert_array_equal(g.tokens[1], seq)
    assert g.text == bytes(seq).decode("utf-8", "replace")
    # the cache: 2 (k, v) x layers x batch·P rows x (prefix + max_len) slots x heads x head_dim x 4 bytes
    pre = m.prefix_len
    assert g.kv_cache_bytes == 2 * 2 * (2 * P) * (pre + 32) * 2 * 16 * 4
    assert g.prefix_cache_bytes == 2 * 2 * (2 * P) * pre * 2 * 16 * 4
    assert g.decode_s_per_token > 0 and g.prefill_s > 0


@pytest.mark.parametrize("gated", [False, True])
def test_cached_logits_match_and_prefixes_sit_in_the_cache(gated):
    m, x = model(2, gated=gated), jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 10)), jnp.int32)
    cache = init_cache(m, 2, 32)
    for (k, v), pre in zip(cache, m.prefixes(2)):
        np.testing.assert_array_equal(k[:, :m.prefix_len], pre[0])
        np.testing.assert_array_equal(v[:, :m.prefix_len], pre[1])
    logits, cache = forward_cached(m, x[:, :6], cache, 0, "lm")   # prefill 6, then 4 single steps
    steps = [logits]
    for t in range(6, 10):
        lg, cache = forward_cached(m, x[:, t:t + 1], cache, t, "lm")
        steps.append(lg)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), m(x)["lm"], rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_in_vocabulary():
    m = model(2)
    a = generate(m, "x = ", 10, temperature=1.0, batch=4, seed=1)
    b = generate(m, "x = ", 10, temperature=1.0, batch=4, seed=1)
    c = generate(m, "x = ", 10, temperature=1.0, batch=4, seed=2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    assert len({tuple(r) for r in a.tokens}) > 1  # batch rows are independent samples
    assert a.tokens.min() >= 0 and a.tokens.max() < 256


def test_bad_prompts_and_lengths():
    with pytest.raises(ValueError, match="outside the model's vocabulary 0..127"):
        generate(model(2, vocab=128), "caf\u00e9", 4)  # é is 2 bytes >= 128
    with pytest.raises(ValueError, match="maximum sequence length 32"):
        generate(model(1), "a" * 30, 5)
    with pytest.raises(ValueError, match="empty"):
        generate(model(1), "", 5)
    with pytest.raises(ValueError, match="temperature"):
        generate(model(1), "a", 5, temperature=-1.0)


@pytest.mark.slow
def test_cli_generate_on_a_trained_run(tmp_path, capsys):
    from mtl import cli

    wd = str(tmp_path / "run")
    args = ["train", "--config", "configs/parscale.py", "--workdir", wd, "--config.model.parscale.P=2",
            "--config.train.steps=4", "--config.train.eval_every=4", "--config.train.checkpoint_every=4",
            "--config.train.log_every=4", "--config.data.kwargs.max_train_bytes=20000",
            "--config.data.kwargs.max_eval_bytes=2000", "--config.model.parscale.prefix_len=4"]
    assert cli.main(args) == 0
    res = json.load(open(os.path.join(wd, "results.json")))
    assert "bits_per_byte" in res["test"]["next_byte"]
    np.testing.assert_allclose(res["test"]["next_byte"]["bits_per_byte"],
                               res["test"]["next_byte"]["loss"] / np.log(2), rtol=1e-5)
    capsys.readouterr()
    assert cli.main(["generate", "--workdir", wd, "--prompt", "def ", "--max-new", "8", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    rep = json.loads(rest)
    assert first.startswith("def ")
    assert [r["batch"] for r in rep["runs"]] == [1, 4] and all(r["P"] == 2 for r in rep["runs"])
    assert rep["runs"][1]["kv_cache_bytes"] == 4 * rep["runs"][0]["kv_cache_bytes"]
    assert cli.main(["generate", "--workdir", wd, "--prompt", "a" * 200]) == 1  # too long: clear error
