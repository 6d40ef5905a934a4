"""Budget/preference search on a hand-built lookup table (worked by hand below), its bad
input, and the table's atomic JSON round trip."""
import itertools
import json
import os

import pytest

from mtl.nn.slimmable.search import (SlimTable, candidates, key_of, parse_budget, parse_preference, parse_widths,
                                     search)
from mtl.nn.slimmable.widths import WidthConfig

TASKS = ["a", "b"]
WIDTHS = [0.5, 1.0]


def hand_table():
    """FLOPs = (100 e + 10 d_a + 10 d_b) M; loss_t = 1 + (1 - e) + (1 - d_t): wider is better."""
    entries = {}
    for e, da, db in itertools.product(WIDTHS, repeat=3):
        cfg = WidthConfig(e, {"a": da, "b": db})
        entries[key_of(cfg)] = {"widths": cfg.to_json(), "flops": (100 * e + 10 * da + 10 * db) * 1e6,
                                "val": {"a": {"loss": 1 + (1 - e) + (1 - da)}, "b": {"loss": 1 + (1 - e) + (1 - db)}}}
    return SlimTable(TASKS, WIDTHS, entries)


def test_candidates_give_the_preferred_task_the_wider_decoder():
    # a=2, b=1: r = (1, 0.5); scale 0.5 -> (0.5, snap(0.25)=0.5); scale 1 -> (1, 0.5)
    got = candidates({"a": 2.0, "b": 1.0}, WIDTHS)
    assert got == [WidthConfig(0.5, {"a": 0.5, "b": 0.5}), WidthConfig(0.5, {"a": 1.0, "b": 0.5}),
                   WidthConfig(1.0, {"a": 0.5, "b": 0.5}), WidthConfig(1.0, {"a": 1.0, "b": 0.5})]


@pytest.mark.parametrize("budget,expected,objective", [
    # candidates (MFLOPs): (0.5,.5,.5) 60, (0.5,1,.5) 65, (1,.5,.5) 110, (1,1,.5) 115
    ("120MFLOPs", WidthConfig(1.0, {"a": 1.0, "b": 0.5}), (2 / 1.0 + 1 / 1.5) / 3),
    ("112M", WidthConfig(1.0, {"a": 0.5, "b": 0.5}), (2 / 1.5 + 1 / 1.5) / 3),
    ("6.2e7", WidthConfig(0.5, {"a": 0.5, "b": 0.5}), (2 / 2 + 1 / 2) / 3),
    ("100M", WidthConfig(0.5, {"a": 1.0, "b": 0.5}), (2 / 1.5 + 1 / 2) / 3),
])
def test_search_returns_the_widest_feasible_configuration(budget, expected, objective):
    c = search(hand_table(), budget, "a=2,b=1")
    assert c.widths == expected
    assert c.objective == pytest.approx(objective)
    # independent check: here losses fall with every width, so the best is the candidate
    # with the most FLOPs under the budget
    t = hand_table()
    feasible = [x for x in candidates({"a": 2, "b": 1}, WIDTHS) if t.flops(x) <= parse_budget(budget)]
    assert c.widths == max(feasible, key=t.flops)


def test_budget_below_the_narrowest_names_the_minimum():
    with pytest.raises(ValueError, match=r"minimum feasible budget is 60 MFLOPs"):
        search(hand_table(), "59MFLOPs", "a=1")


@pytest.mark.parametrize("pref,msg", [
    ("a=1,c=2", r"unknown task\(s\) \['c'\].*tasks are \['a', 'b'\]"),
    ("a=-1,b=1", r"'a' must be a finite number >= 0"),
    ("a=0,b=0", r"all zero"),
    ("a", r"not TASK=WEIGHT"),
])
def test_bad_preferences(pref, msg):
    with pytest.raises(ValueError, match=msg):
        parse_preference(pref, TASKS)


def test_parse_budget_and_widths():
    assert parse_budget("12MFLOPs") == 12e6 and parse_budget("1.5G") == 1.5e9 and parse_budget("3e6") == 3e6
    with pytest.raises(ValueError, match="not a FLOP count"):
        parse_budget("twelve")
    assert parse_widths("0.5", TASKS, WIDTHS) == WidthConfig(0.5, {"a": 0.5, "b": 0.5})
    assert parse_widths("encoder=0.5,b=0.5", TASKS, WIDTHS) == WidthConfig(0.5, {"b": 0.5})
    with pytest.raises(ValueError, match=r"0.75 is not in the trained width set \(0.5, 1.0\)"):
        parse_widths("encoder=0.75", TASKS, WIDTHS)
    with pytest.raises(ValueError, match=r"not in the trained width set"):
        parse_widths("0.3", TASKS, WIDTHS)
    with pytest.raises(ValueError, match=r"neither 'encoder' nor a task"):
        parse_widths("c=0.5", TASKS, WIDTHS)


def test_table_round_trip_is_atomic(tmp_path):
    t = hand_table()
    path = str(tmp_path / "slim_table.json")
    t.save(path)
    assert os.listdir(tmp_path) == ["slim_table.json"]  # no temporary file left behind
    back = SlimTable.load(path)
    assert search(back, "112M", "a=2,b=1").widths == search(t, "112M", "a=2,b=1").widths
    with open(path, "w") as f:
        json.dump({"format": "other"}, f)
    with pytest.raises(ValueError, match="not a slimmable lookup table"):
        SlimTable.load(path)
