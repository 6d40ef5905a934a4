"""experiments/mtl_optim.py keeps each finished run's cell in a committed JSON-lines file, so
a table split over sessions (run directories are not kept) still reports every measured cell,
and marks methods that cannot run with a dataset's task count instead of stopping the sweep."""
import importlib.util
import json
import os

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("mtl_optim_sweep", os.path.join(HERE, "..", "experiments",
                                                                               "mtl_optim.py"))
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def _finished_run(root, d, seed, m, dm, conflicts):
    wd = os.path.join(root, d, f"seed{seed}", sweep.slug(m))
    os.makedirs(wd)
    json.dump({"delta_m_test": {"delta_m": dm}}, open(os.path.join(wd, "results.json"), "w"))
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
        for c in conflicts:
            f.write(json.dumps({"split": "diagnostics", "conflict_fraction": c}) + "\n")
            f.write(json.dumps({"split": "train", "loss": 1.0}) + "\n")


def test_cells_come_from_run_dirs_and_the_store_with_dirs_winning(tmp_path):
    root, store = str(tmp_path / "runs"), str(tmp_path / "res" / "x_runs.jsonl")
    _finished_run(root, "multitab0", 0, "GLS", -5.0, [0.2, 0.4])
    sweep.record(store, dataset="multitab0", seed=0, method="GLS", delta_m=99.0, conflict=0.9)  # stale
    sweep.record(store, dataset="multitab0", seed=1, method="GLS", delta_m=-7.0, conflict=0.5)
    sweep.record(store, dataset="multitab0", seed=2, method="GLS", delta_m=1.0, conflict=0.1)
    sweep.record(store, dataset="multitab0", seed=2, method="GLS", delta_m=-3.0, conflict=0.6)  # last wins
    out = sweep.collect(root, ["multitab0"], ["GLS"], [0, 1, 2], store=store)
    v = np.array(out["multitab0"]["GLS"])
    np.testing.assert_allclose(v, [[-5.0, 0.3], [-7.0, 0.5], [-3.0, 0.6]])
    with pytest.raises(FileNotFoundError, match="no record"):
        sweep.collect(root, ["multitab0"], ["GLS"], [0, 1, 2, 3], store=store)
    assert len(sweep.collect(root, ["multitab0"], ["GLS"], [0, 1, 2, 3], partial=True,
                             store=store)["multitab0"]["GLS"]) == 3


def test_methods_that_cannot_run_with_T_tasks_are_marked_not_failed(tmp_path):
    cfg = sweep.make_cfg("multifashion", 0)
    for k, v in sweep.ALL_METHODS["Krum"].items():
        cfg.optim[k] = v
    why = sweep.not_applicable(cfg, 2)
    assert why is not None and "3 tasks" in why
    assert sweep.not_applicable(cfg, 4) is None
    cfg.optim.aggregator = "ew"
    assert sweep.not_applicable(cfg, 2) is None
    cfg.optim.aggregator = "moco"  # its init needs the parameters' shapes at every T: the run decides
    assert sweep.not_applicable(cfg, 2) is None
    store = str(tmp_path / "runs.jsonl")
    sweep.record(store, dataset="multifashion", seed=0, method="Krum", not_applicable=why)
    out = sweep.collect(str(tmp_path / "none"), ["multifashion"], ["Krum"], [0], store=store)
    assert out["multifashion"]["Krum"] == "n/a: " + why
    sweep.write_outputs(out, ["multifashion"], ["Krum"], [0], str(tmp_path), "_t")
    md = open(tmp_path / "mtl_optim_t.md").read()
    assert "| Krum | n/a |" in md and why in md


def test_a_damaged_store_line_is_named(tmp_path):
    store = tmp_path / "runs.jsonl"
    store.write_text('{"dataset": "a", "seed": 0, "method": "m", "delta_m": 1, "conflict": 0}\n{"oops"\n')
    with pytest.raises(ValueError, match=r"runs.jsonl:2"):
        sweep.read_store(str(store))
