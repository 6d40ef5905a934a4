"""Δm% against a hand-worked example, and the results table."""
import math

import pytest

from mtl.train.results import DELTA_M_DEFINITION, delta_m, format_results_table

MTL = {"seg": {"acc": 0.9, "mse": 0.5}, "depth": {"mae": 0.3}}
STL = {"seg": {"acc": 0.8, "mse": 0.4}, "depth": {"mae": 0.6}}
HIB = {"seg": {"acc": True, "mse": False}, "depth": {"mae": False}}


def test_delta_m_hand_worked():
    # seg/acc (higher better):  (0.9 - 0.8) / 0.8 = +0.125
    # seg/mse (lower better):   -(0.5 - 0.4) / 0.4 = -0.25
    #   seg = (0.125 - 0.25) / 2 = -0.0625 -> -6.25 %
    # depth/mae (lower better): -(0.3 - 0.6) / 0.6 = +0.5 -> +50 %
    # Δm = (-6.25 + 50) / 2 = 21.875 %
    res = delta_m(MTL, STL, HIB)
    assert math.isclose(res["per_task"]["seg"], -6.25, rel_tol=1e-12)
    assert math.isclose(res["per_task"]["depth"], 50.0, rel_tol=1e-12)
    assert math.isclose(res["delta_m"], 21.875, rel_tol=1e-12)


def test_delta_m_counts_only_named_metrics_and_is_zero_when_equal():
    res = delta_m(MTL, MTL, HIB)
    assert res["delta_m"] == 0.0 and res["per_task"] == {"seg": 0.0, "depth": 0.0}
    # metrics not named in higher_is_better (e.g. the loss) are ignored
    mtl = {"a": {"acc": 0.5, "loss": 9.0}}
    stl = {"a": {"acc": 0.4, "loss": 1.0}}
    assert math.isclose(delta_m(mtl, stl, {"a": {"acc": True}})["delta_m"], 25.0)


def test_delta_m_zero_baseline_raises():
    with pytest.raises(ValueError, match="depth/mae"):
        delta_m(MTL, {"seg": STL["seg"], "depth": {"mae": 0.0}}, HIB)


def _results():
    tasks = [{"name": "seg", "metrics": ["acc", "mse"], "higher_is_better": HIB["seg"]},
             {"name": "depth", "metrics": ["mae"], "higher_is_better": HIB["depth"]}]
    return {"tasks": tasks, "test": MTL, "val": STL}


def test_results_table_with_baselines():
    baselines = {t: {"test": {t: STL[t]}} for t in STL}
    table = format_results_table(_results(), baselines)
    lines = table.splitlines()
    assert lines[0] == "| task | metric | multi-task | single-task | Δ% |"
    assert lines[2:] == [
        "| seg | acc | 0.9000 | 0.8000 | +12.50 |",
        "| seg | mse | 0.5000 | 0.4000 | -25.00 |",
        "| depth | mae | 0.3000 | 0.6000 | +50.00 |",
    ]


def test_results_table_without_baselines_and_split():
    lines = format_results_table(_results()).splitlines()
    assert lines[0] == "| task | metric | multi-task |"
    assert lines[2:] == ["| seg | acc | 0.9000 |", "| seg | mse | 0.5000 |", "| depth | mae | 0.3000 |"]
    assert format_results_table(_results(), split="val").splitlines()[2] == "| seg | acc | 0.8000 |"


def test_definition_states_sign_convention():
    assert "positive = better" in DELTA_M_DEFINITION
