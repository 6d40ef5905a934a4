"""A sandwich-trained slimmable run through the loop and the CLI: exact resume; mtl slim
(table built once, atomically, then read), its bad input (one line, nothing written),
mtl eval --widths, and an artifact loaded at a width."""
import json
import os

import numpy as np
import pytest

from mtl.checkpoint import CheckpointStore
from mtl.cli import main
from mtl.config import base_config
from mtl.train.loop import run
from tests.tiny_runs import read_metrics


def config():
    c = base_config()
    c.data.name = "multitab"
    c.data.kwargs = dict(num_tasks=2, n_train=300, n_test=100, dim=8, correlation=0.5, seed=0)
    c.model.arch = "slimmable"
    c.model.encoder = "mlp"
    c.model.encoder_kwargs = dict(hidden=(16,))
    c.model.arch_kwargs = dict(widths=(0.5, 1.0), decoder_hidden=(8,), sandwich=dict(n=3, pool_size=4))
    c.train.steps = 20
    c.train.batch_size = 32
    c.train.eval_batch_size = 64
    c.train.log_every = 5
    c.train.eval_every = 5
    c.train.checkpoint_every = 10
    c.optimizer.lr = 3e-2
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("slimrun")
    full, part = str(root / "full"), str(root / "part")
    rf = run(config(), full)
    run(config(), part, _stop_after=13)
    assert CheckpointStore(os.path.join(part, "checkpoints")).latest_step() == 10
    rp = run(config(), part)
    return full, part, rf, rp


@pytest.mark.slow
def test_sandwich_run_resumes_exactly(runs):
    full, part, rf, rp = runs
    assert rp["val"] == rf["val"] and rp["test"] == rf["test"]
    assert read_metrics(full) == read_metrics(part)  # incl. aux (distillation + CIKD) per log step


@pytest.mark.slow
def test_mtl_slim_cli(runs, capsys):
    full = runs[0]
    names = [t["name"] for t in runs[2]["tasks"]]
    table = os.path.join(full, "slim_table.json")
    before = sorted(os.listdir(full))
    for argv, msg in [
        (["--budget", "1FLOPs", "--preference", f"{names[0]}=1"], "minimum feasible budget is"),
        (["--budget", "1G", "--preference", "nope=1"], "unknown task"),
        (["--budget", "1G", "--preference", f"{names[0]}=-1"], ">= 0"),
        (["--budget", "1G", "--preference", f"{names[0]}=0"], "all zero"),
    ]:
        assert main(["slim", "--workdir", full] + argv) == 1
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
        assert sorted(os.listdir(full)) == before  # nothing written
    assert main(["slim", "--workdir", full, "--budget", "1G", "--preference", f"{names[0]}=2,{names[1]}=1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert os.path.exists(table)
    t = json.load(open(table))
    widest = max(e["flops"] for e in t["entries"].values())
    assert out["widths"] == {"encoder": 1.0, "decoders": {names[0]: 1.0, names[1]: 1.0}} or out["mflops"] * 1e6 <= widest
    assert out["mflops"] * 1e6 == pytest.approx(t["entries"][json.dumps(out["widths"], sort_keys=True)]["flops"])
    assert out["latency_ms"] > 0 and set(out["val"]) == set(names)
    # eval at a width: its val loss is the table's entry for that configuration
    assert main(["eval", "--workdir", full, "--split", "val", "--widths", "0.5"]) == 0
    ev = json.loads(capsys.readouterr().out)
    key = json.dumps({"encoder": 0.5, "decoders": {n: 0.5 for n in sorted(names)}}, sort_keys=True)
    for n in names:
        np.testing.assert_allclose(ev["metrics"][n]["loss"], t["entries"][key]["val"][n]["loss"], rtol=1e-5)
    assert main(["eval", "--workdir", full, "--widths", "0.75"]) == 1
    assert "not in the trained width set" in capsys.readouterr().err


@pytest.mark.slow
def test_non_slimmable_run_is_refused(tmp_path, capsys):
    from tests.tiny_runs import tiny_config

    wd = str(tmp_path / "plain")
    run(tiny_config(steps=5), wd)
    before = sorted(os.listdir(wd))
    assert main(["slim", "--workdir", wd, "--budget", "1M", "--preference", "a=1"]) == 1
    assert "is not a slimmable run" in capsys.readouterr().err
    assert sorted(os.listdir(wd)) == before


@pytest.mark.slow
def test_artifact_at_a_width(runs, tmp_path):
    import jax.numpy as jnp

    from mtl.artifact import export_run, load_model_at

    art = export_run(runs[0], str(tmp_path / "a.mtl"))
    view, meta = load_model_at(art, "encoder=0.5")
    x = jnp.ones((3, 8))
    out = view(x)
    ref = view.model(x, view.widths)
    for k in out:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]))
    assert view.widths.encoder == 0.5
    with pytest.raises(ValueError, match="not in the trained width set"):
        load_model_at(art, "0.25")


@pytest.mark.slow
def test_artifact_carries_the_table_and_answers_without_data(runs, tmp_path, capsys, monkeypatch):
    from mtl.artifact import export_run
    from mtl.checkpoint import read_artifact_metadata

    full = runs[0]
    names = [t["name"] for t in runs[2]["tasks"]]
    pref = f"{names[0]}=2,{names[1]}=1"
    assert main(["slim", "--workdir", full, "--budget", "1G", "--preference", pref]) == 0
    from_run = json.loads(capsys.readouterr().out)
    art = export_run(full, str(tmp_path / "a.mtl"))
    stored = read_artifact_metadata(art)["slim_table"]
    assert stored["entries"] == json.load(open(os.path.join(full, "slim_table.json")))["entries"]

    import mtl.train.loop as loop

    def no_data(*a, **k):
        raise AssertionError("the artifact's search must not load data")
    monkeypatch.setattr(loop, "load_data", no_data)
    before = sorted(os.listdir(art))
    assert main(["slim", "--workdir", art, "--budget", "1G", "--preference", pref]) == 0
    from_art = json.loads(capsys.readouterr().out)
    for k in ("widths", "mflops", "objective", "val"):
        assert from_art[k] == from_run[k], k
    assert from_art["latency_ms"] > 0
    assert main(["slim", "--workdir", art, "--budget", "1FLOPs", "--preference", pref]) == 1
    err = capsys.readouterr().err.strip()
    assert "minimum feasible budget is" in err and len(err.splitlines()) == 1
    assert main(["slim", "--workdir", art, "--build-table"]) == 1
    assert "is an artifact" in capsys.readouterr().err
    assert sorted(os.listdir(art)) == before


@pytest.mark.slow
def test_train_builds_and_prints_the_table(tmp_path, capsys):
    from mtl.nn.slimmable.search import SlimTable, key_of
    from mtl.nn.slimmable.widths import WidthConfig
    from mtl.train.baselines import run_experiment

    c = config()
    c.train.steps = 6
    wd = str(tmp_path / "r")
    run_experiment(c, wd)
    table = SlimTable.load(os.path.join(wd, "slim_table.json"))
    err = capsys.readouterr()
    text = err.out + err.err
    assert "uniform widths on the validation split" in text
    for w in (1.0, 0.5):  # each uniform row prints the table's FLOPs
        cfg = WidthConfig.uniform(w, table.tasks)
        assert f"{table.flops(cfg) / 1e6:.3f}" in text, key_of(cfg)
    c.train.slim_table = False
    wd2 = str(tmp_path / "r2")
    run_experiment(c, wd2)
    assert not os.path.exists(os.path.join(wd2, "slim_table.json"))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts the process's memory maps (Linux)")
def test_measuring_many_configurations_keeps_memory_maps_bounded(runs):
    """Each width configuration is its own compiled program and XLA:CPU maps memory for each;
    measure() releases them, so the maps do not grow with the number of configurations (a CNN
    table of hundreds of configurations had crashed at the kernel's vm.max_map_count)."""
    from mtl.nn.slimmable import runs as slim_runs
    from mtl.nn.slimmable.widths import WidthConfig
    from mtl.train.loop import load_data

    steps, model, cfg, bundle = slim_runs.load_run(runs[0])
    names = list(model.task_names)
    src = load_data(cfg)[3]
    configs = [WidthConfig(encoder=e, decoders={names[0]: a, names[1]: b})
               for e in (0.5, 1.0) for a in (0.5, 1.0) for b in (0.5, 1.0)]
    import gc

    import jax

    maps = lambda: sum(1 for _ in open("/proc/self/maps"))  # noqa: E731
    slim_runs.measure(steps, model, src, 64, bundle.input_shape, configs[:1])
    jax.clear_caches()
    gc.collect()
    before = maps()
    entries = slim_runs.measure(steps, model, src, 64, bundle.input_shape, configs[1:])
    gc.collect()
    assert len(entries) == 7
    assert maps() - before < 40, maps() - before   # measured: 0 with the release, 164 without


def test_tables_of_several_runs_compile_each_configuration_once(runs, tmp_path):
    """build_tables over two runs of one architecture (another seed and CIKD weight) gives each run the table that
    build_table gives it alone, compiling every configuration once for both runs; runs of
    another architecture are refused before anything is written."""
    import jax

    from mtl.nn.slimmable import runs as slim_runs
    from mtl.nn.slimmable.search import SlimTable

    c = config()
    c.seed = c.data.seed = 1
    c.model.arch_kwargs = dict(c.model.arch_kwargs, sandwich=dict(n=3, pool_size=4, cikd_weight=0.0))
    c.train.steps = 5
    other = str(tmp_path / "seed1")
    run(c, other)
    names = [t["name"] for t in runs[2]["tasks"]]
    prefs = [{names[0]: 1.0, names[1]: 1.0}, {names[0]: 2.0, names[1]: 1.0}]
    compiles = []

    def listen(event, *_, **__):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        alone = [slim_runs.build_table(wd, preferences=prefs, save=False) for wd in (runs[0], other)]
        n_alone = len(compiles)
        del compiles[:]
        together = slim_runs.build_tables([runs[0], other], preferences=prefs, save=False)
        n_together = len(compiles)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    for a, t in zip(alone, together):
        assert a.entries == t.entries and a.grid == t.grid
    assert alone[0].entries != alone[1].entries            # two different models were measured
    assert 0 < n_together <= n_alone / 2 + 2, (n_together, n_alone)

    # the CLI: several workdirs build together (default preferences); a query takes one workdir
    before = sorted(os.listdir(other))
    assert main(["slim", "--workdir", runs[0], other, "--budget", "1G", "--preference", f"{names[0]}=1"]) == 1
    assert sorted(os.listdir(other)) == before
    assert main(["slim", "--workdir", runs[0], other, "--build-table"]) == 0
    cli = [SlimTable.load(os.path.join(wd, "slim_table.json")) for wd in (runs[0], other)]
    api = slim_runs.build_tables([runs[0], other], save=False)
    for a, t in zip(api, cli):
        assert a.entries == t.entries and a.grid == t.grid

    wide = config()
    wide.model.encoder_kwargs = dict(hidden=(24,))
    wide.train.steps = 2
    wd = str(tmp_path / "wide")
    run(wide, wd)
    before = {d: sorted(os.listdir(d)) for d in (runs[0], wd)}
    with pytest.raises(ValueError, match="another architecture"):
        slim_runs.build_tables([runs[0], wd], preferences=prefs)
    assert {d: sorted(os.listdir(d)) for d in (runs[0], wd)} == before
