"""ParScale two-stage training (model.parscale.init_from / freeze_backbone): a P = 4 model
with the backbone of a trained P = 1 run starts from exactly that run's validation loss
(zero-init prefix gates), frozen parameters stay bit-identical through the trainer's step,
the gates open with training, and a bad base is refused before anything is written."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import sharding as shd
from mtl.checkpoint import path_str
from mtl.nn import heads
from mtl.nn.build import model_factory
from mtl.nn.parscale import TwoStage
from mtl.tasks import Task
from mtl.train.optimizer import freeze, make_optimizer
from mtl.train.step import Steps

TASKS = [Task("next_byte", heads.LanguageModel(256))]
TINY = ["--config.model.encoder_kwargs={'dim': 32, 'depth': 1, 'num_heads': 2, 'mlp_ratio': 4.0}",
        "--config.data.kwargs.seq_len=32", "--config.data.kwargs.max_train_bytes=20000",
        "--config.data.kwargs.max_eval_bytes=2000", "--config.train.steps=4", "--config.train.batch_size=8",
        "--config.train.eval_batch_size=16", "--config.train.eval_every=2", "--config.train.checkpoint_every=4",
        "--config.train.log_every=2", "--config.train.curves=False", "--config.optimizer.warmup_steps=0",
        "--config.model.parscale.prefix_len=4"]


def flat(params) -> dict:
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_frozen_parameters_stay_bit_identical_through_the_train_step():
    """Steps' own train step with ``freeze(tx, TwoStage.is_frozen)``: the backbone (with
    some ``-0.0`` entries, which ``p + 0.0`` would flip) never changes; prefixes, gates and
    aggregator train. Reference: the initial parameters themselves."""
    import ml_collections

    cfg = ml_collections.ConfigDict({"arch": "lm", "encoder": "byte_transformer",
                                     "encoder_kwargs": {"dim": 16, "depth": 1, "num_heads": 2},
                                     "parscale": {"P": 2, "prefix_len": 2, "prefix_gate": True}})
    two = TwoStage(init_from="unused", freeze_backbone=True)
    tx = freeze(make_optimizer("adamw", 1e-2, 10, schedule="constant", grad_clip=1.0), two.is_frozen)
    steps = Steps(model_factory(cfg, TASKS, (8,)), TASKS, tx, shd.make_mesh())
    state = steps.init()
    state = state.replace(params=jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.full_like(v, -0.0) if path_str(p) == "encoder/norm/bias" else v, state.params))
    before = flat(state.params)
    rng = np.random.default_rng(0)
    for _ in range(3):
        w = rng.integers(0, 256, (8, 9)).astype(np.int32)
        state, m = steps.step(state, steps.put_batch({"inputs": w[:, :-1], "labels": {"next_byte": w[:, 1:]}}))
        assert bool(m["ok"])
    after = flat(state.params)
    frozen = [p for p in before if two.is_frozen(p)]
    assert frozen and {p.split("/")[0] for p in frozen} == {"encoder", "heads"}
    for p in frozen:
        assert before[p].tobytes() == after[p].tobytes(), p  # bit for bit, signs of zeros included
    assert np.signbit(after["encoder/norm/bias"]).all()
    for p in set(before) - set(frozen):
        assert np.abs(after[p] - before[p]).max() > 0, p  # every prefix, gate and aggregator entry trains
    assert np.abs(after["prefix/gate"]).min() > 0


# ---------------------------------------------------------------------- through `mtl train` (slow)

def _train(wd, *extra):
    from mtl import cli

    return cli.main(["train", "--config", "configs/parscale.py", "--workdir", str(wd)] + TINY + list(extra))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained P = 1 run (workdir) and its artifact."""
    from mtl import cli

    root = tmp_path_factory.mktemp("two_stage")
    wd, art = root / "base", root / "base.mtl"
    assert _train(wd, "--config.model.parscale.P=1") == 0
    assert cli.main(["export", "--workdir", str(wd), "--out", str(art)]) == 0
    return root, wd, art


def _two_stage_steps(init_from, *extra):
    from mtl import config as config_lib
    from mtl.train.loop import build, load_data

    overrides = [a[len("--config."):] for a in TINY + ["--config.model.parscale.P=4",
                                                       f"--config.model.parscale.init_from={init_from}"] + list(extra)]
    cfg = config_lib.with_defaults(config_lib.apply_overrides(config_lib.load_config_file("configs/parscale.py"),
                                                              overrides))
    bundle, infos, _, val = load_data(cfg)
    return cfg, build(cfg, bundle, infos), val


@pytest.mark.slow
@pytest.mark.parametrize("source", ["workdir", "artifact"])
def test_two_stage_starts_from_exactly_the_base_loss(base, source):
    from mtl.data.pipeline import eval_batches

    _, wd, art = base
    ref = json.load(open(wd / "results.json"))["val"]["next_byte"]["loss"]  # the P = 1 run's own evaluation
    cfg, steps, val = _two_stage_steps(wd if source == "workdir" else art)
    two = TwoStage.from_model_config(cfg.model)
    state = steps.init(two.load_backbone(steps.abstract_state.params))  # what `mtl train` starts from
    assert steps.model(state.params).prefix_gated  # on by default with init_from
    got = steps.evaluate(state, eval_batches(val, cfg.train.eval_batch_size, steps.batch_sharding))
    np.testing.assert_allclose(got["next_byte"]["loss"], ref, rtol=1e-6)
    # the prefixes and aggregator are really there and fresh (not zero): the gate alone makes it exact
    agg = flat(state.params["aggregator"])
    assert max(np.abs(v).max() for v in agg.values()) > 0.01


@pytest.mark.slow
def test_frozen_two_stage_run_keeps_the_backbone_and_opens_the_gates(base):
    from mtl import cli
    from mtl.artifact import restore_run

    root, wd, _ = base
    two_wd = root / "two_frozen"
    assert _train(two_wd, "--config.model.parscale.P=4", f"--config.model.parscale.init_from={wd}",
                  "--config.model.parscale.freeze_backbone=True") == 0
    _, base_params, _, _, _ = restore_run(str(wd), "best")
    _, params, _, _, _ = restore_run(str(two_wd), "last")
    b, p = flat(jax.device_get(nnx.to_pure_dict(base_params))), flat(jax.device_get(nnx.to_pure_dict(params)))
    assert set(b) == {k for k in p if k.split("/")[0] in ("encoder", "heads")}
    for k in b:
        assert b[k].tobytes() == p[k].tobytes(), k
    assert np.abs(p["prefix/gate"]).min() > 0  # zero at step 0; every layer and head has moved
    # generation with the KV cache works on the gated model
    assert cli.main(["generate", "--workdir", str(two_wd), "--prompt", "def ", "--max-new", "4"]) == 0


@pytest.mark.slow
def test_unfrozen_two_stage_run_trains_the_backbone_too(base):
    from mtl.artifact import restore_run

    root, _, art = base
    two_wd = root / "two_free"
    assert _train(two_wd, "--config.model.parscale.P=2", f"--config.model.parscale.init_from={art}") == 0
    _, params, _, _, _ = restore_run(str(two_wd), "last")
    p = flat(jax.device_get(nnx.to_pure_dict(params)))
    from mtl.artifact import load_model

    b = flat(nnx.to_pure_dict(nnx.state(load_model(str(art))[0], nnx.Param)))
    assert max(np.abs(p[k] - b[k]).max() for k in b) > 0
    assert np.abs(p["prefix/gate"]).min() > 0


def _refused(capsys, wd, *extra):
    capsys.readouterr()
    assert _train(wd, *extra) == 1
    err = capsys.readouterr().err.strip()
    assert not os.path.exists(wd), "a refused command must write nothing"
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.slow
def test_bad_bases_are_refused_before_anything_is_written(base, capsys, tmp_path):
    root, wd, art = base
    new = tmp_path / "new"
    err = _refused(capsys, new, "--config.model.parscale.P=4", f"--config.model.parscale.init_from={tmp_path / 'nope'}")
    assert "init_from" in err and "no such file or directory" in err
    (tmp_path / "empty").mkdir()
    err = _refused(capsys, new, "--config.model.parscale.P=4", f"--config.model.parscale.init_from={tmp_path / 'empty'}")
    assert "neither an mtl workdir" in err
    # another width: the first differing parameter, with both shapes
    wide = "--config.model.encoder_kwargs={'dim': 48, 'depth': 1, 'num_heads': 2, 'mlp_ratio': 4.0}"
    for src in (wd, art):
        err = _refused(capsys, new, "--config.model.parscale.P=4", f"--config.model.parscale.init_from={src}", wide)
        assert "encoder/" in err and "(32,)" in err and "(48,)" in err, err
    # another depth: a block the base does not have
    deep = "--config.model.encoder_kwargs={'dim': 32, 'depth': 2, 'num_heads': 2, 'mlp_ratio': 4.0}"
    err = _refused(capsys, new, "--config.model.parscale.P=4", f"--config.model.parscale.init_from={wd}", deep)
    assert "encoder/blocks/1/" in err and "missing" in err
    # a P > 1 base
    p2 = root / "p2"
    assert _train(p2, "--config.model.parscale.P=2", "--config.train.steps=2", "--config.train.eval_every=2") == 0
    err = _refused(capsys, new, "--config.model.parscale.P=4", f"--config.model.parscale.init_from={p2}")
    assert "is a P = 2 run" in err
    # freezing without a base
    err = _refused(capsys, new, "--config.model.parscale.P=4", "--config.model.parscale.freeze_backbone=True")
    assert "needs model.parscale.init_from" in err
