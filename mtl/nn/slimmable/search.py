"""Budget + preference -> width configuration (methods.md §4 "Search"), and its lookup table.

The rule, exactly (:func:`search`). Given a budget ``B`` (FLOPs per example) and a
preference ``p`` over the tasks (``p_t >= 0``, not all 0; unlisted tasks get 0):

1. **Decoders from the preference.** ``r_t = p_t / max_u p_u``. For a *decoder scale*
   ``s`` in the width set, task ``t``'s decoder width is the smallest trained width
   ``>= s * r_t`` (the narrowest one when ``r_t = 0``): the most preferred task gets ``s``,
   the others proportionally narrower, never wider.
2. **Candidates** are every (encoder width ``e``, decoder scale ``s``) pair of the width set.
3. **Choice.** Among the candidates whose FLOPs (XLA cost analysis of the compiled
   forward, per example) are ``<= B``, take the one with the highest *validation
   objective* ``J = Σ_t p_t q_t / Σ_t p_t``, where ``q_t = L_t(widest) / L_t(config)`` is
   task ``t``'s validation loss relative to the widest configuration (1 = as good as the
   full model; the loss is the one metric every task has, lower is better). Ties go to
   more FLOPs, then to the wider encoder.

A budget below the narrowest configuration's FLOPs is an error naming that minimum.

The **lookup table** (:class:`SlimTable`, ``slim_table.json`` next to a run's
``results.json``) stores, for every candidate configuration of a grid of preferences, its
FLOPs and validation losses, plus the chosen configuration for each (budget, preference)
of the grid. :func:`search` on the table needs no validation data; a preference outside
the grid uses the measured candidates only (each preference's candidate set is stored).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from typing import Mapping, Sequence

from mtl.nn.slimmable.widths import WidthConfig

TABLE_FILE = "slim_table.json"
TABLE_FORMAT = "mtl.slim_table/1"
_UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


# ---------------------------------------------------------------------------- parsing
def parse_budget(text) -> float:
    """``"12MFLOPs"``, ``"1.5G"``, ``"3e6"`` -> FLOPs per example."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKMGT]?)(?:FLOPs?|flops?)?\s*", str(text))
        if not m:
            raise ValueError(f"budget {text!r} is not a FLOP count; write e.g. 12MFLOPs, 1.5GFLOPs or 3e6")
        value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not value > 0:
        raise ValueError(f"the budget must be a positive FLOP count; got {text!r}")
    return value


def parse_preference(text, tasks: Sequence[str]) -> dict:
    """``"depth=2,seg=1"`` (or a mapping) -> ``{task: weight}`` over every task (unlisted: 0)."""
    tasks = list(tasks)
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            name, eq, val = part.partition("=")
            if not eq:
                raise ValueError(f"preference entry {part!r} is not TASK=WEIGHT; write e.g. depth=2,seg=1")
            try:
                items.append((name.strip(), float(val)))
            except ValueError:
                raise ValueError(f"preference weight {val!r} of task {name.strip()!r} is not a number") from None
    unknown = [k for k, _ in items if k not in tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in the preference; this model's tasks are {tasks}")
    pref = {t: 0.0 for t in tasks}
    for k, v in items:
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"preference weight of task {k!r} must be a finite number >= 0; got {v}")
        pref[k] = v
    if not any(v > 0 for v in pref.values()):
        raise ValueError(f"the preference is all zero ({text!r}); give at least one task a positive weight")
    return pref


# ---------------------------------------------------------------------------- the rule
def snap_up(x: float, widths: Sequence[float]) -> float:
    """The smallest width ``>= x`` (the narrowest for ``x <= widths[0]``)."""
    for w in widths:
        if w >= x - 1e-9:
            return float(w)
    return float(widths[-1])


def candidates(pref: Mapping[str, float], widths: Sequence[float]) -> list:
    """Every (encoder width, decoder scale) configuration of step 1-2 (distinct, in order)."""
    widths = sorted(float(w) for w in widths)
    top = max(pref.values())
    out = []
    for e in widths:
        for s in widths:
            cfg = WidthConfig(e, {t: snap_up(s * p / top, widths) for t, p in pref.items()})
            if cfg not in out:
                out.append(cfg)
    return out


def objective(pref: Mapping[str, float], losses: Mapping[str, float], widest: Mapping[str, float]) -> float:
    """``J = Σ_t p_t L_t(widest) / L_t(config) / Σ_t p_t`` (higher is better)."""
    total = sum(pref.values())
    return sum(p * (widest[t] / max(losses[t], 1e-12)) for t, p in pref.items() if p > 0) / total


def key_of(cfg: WidthConfig) -> str:
    return json.dumps(cfg.to_json(), sort_keys=True)


@dataclasses.dataclass
class Choice:
    widths: WidthConfig
    flops: float           # per example
    objective: float
    val_losses: dict       # {task: validation loss at this configuration}
    preference: dict
    budget: float


@dataclasses.dataclass
class SlimTable:
    """Measured candidates (``entries``: config key -> {widths, flops, val}) plus the grid."""

    tasks: list
    widths: list
    entries: dict
    grid: list = dataclasses.field(default_factory=list)   # [{budget, preference, choice key}]
    meta: dict = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------ measured values
    def flops(self, cfg: WidthConfig) -> float:
        return float(self.entries[key_of(cfg)]["flops"])

    def losses(self, cfg: WidthConfig) -> dict:
        return {t: float(d["loss"]) for t, d in self.entries[key_of(cfg)]["val"].items()}

    def has(self, cfg: WidthConfig) -> bool:
        return key_of(cfg) in self.entries

    @property
    def min_flops(self) -> float:
        narrow = WidthConfig.uniform(min(self.widths), self.tasks)
        return self.flops(narrow) if self.has(narrow) else min(float(e["flops"]) for e in self.entries.values())

    # ------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        return {"format": TABLE_FORMAT, "tasks": self.tasks, "widths": self.widths, "entries": self.entries,
                "grid": self.grid, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> "SlimTable":
        if d.get("format") != TABLE_FORMAT:
            raise ValueError(f"not a slimmable lookup table (format {d.get('format')!r}, expected {TABLE_FORMAT!r})")
        return cls(list(d["tasks"]), [float(w) for w in d["widths"]], dict(d["entries"]), list(d.get("grid", [])),
                   dict(d.get("meta", {})))

    def save(self, path: str) -> str:
        """Write atomically (a temporary file in the same folder, then ``os.replace``)."""
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".slim_table.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str) -> "SlimTable":
        with open(path) as f:
            return cls.from_json(json.load(f))


def search(table: SlimTable, budget, preference) -> Choice:
    """The rule of the module docstring on the table's measured candidates."""
    budget = parse_budget(budget)
    pref = parse_preference(preference, table.tasks)
    if budget < table.min_flops * (1 - 1e-9):
        raise ValueError(f"budget {budget / 1e6:.4g} MFLOPs is below the narrowest configuration: the minimum "
                         f"feasible budget is {table.min_flops / 1e6:.4g} MFLOPs per example")
    full = WidthConfig.uniform(max(table.widths), table.tasks)
    if not table.has(full):
        raise ValueError("the lookup table has no entry for the widest configuration (the objective's reference); "
                         "rebuild it with `mtl slim --workdir RUN --build-table`")
    widest = table.losses(full)
    best = None
    for cfg in candidates(pref, table.widths):
        if not table.has(cfg) or table.flops(cfg) > budget * (1 + 1e-9):
            continue
        j = objective(pref, table.losses(cfg), widest)
        rank = (j, table.flops(cfg), cfg.encoder)
        if best is None or rank > best[0]:
            best = (rank, cfg)
    if best is None:  # only unmeasured candidates fit: fall back to the narrowest configuration
        cfg = WidthConfig.uniform(min(table.widths), table.tasks)
        best = ((objective(pref, table.losses(cfg), widest), table.flops(cfg), cfg.encoder), cfg)
    (j, fl, _), cfg = best
    return Choice(cfg, fl, j, table.losses(cfg), pref, budget)


def default_preferences(tasks: Sequence[str]) -> list:
    """The table's preference grid: uniform, each task 2:1 over the rest, each task alone."""
    tasks = list(tasks)
    out = [{t: 1.0 for t in tasks}]
    for t in tasks:
        out.append({u: 2.0 if u == t else 1.0 for u in tasks})
    if len(tasks) > 1:
        for t in tasks:
            out.append({u: 1.0 if u == t else 0.0 for u in tasks})
    return out


def parse_widths(text, tasks: Sequence[str], allowed: Sequence[float]) -> WidthConfig:
    """``"0.5"`` (everywhere) or ``"encoder=0.5,seg=1,depth=0.25"`` (unlisted parts: 1.0),
    checked against the trained width set ``allowed``."""
    tasks = list(tasks)
    text = str(text).strip()
    try:
        return WidthConfig.uniform(float(text), tasks).validate(allowed, tasks)
    except ValueError as e:
        if "=" not in text:
            if "trained width set" in str(e):
                raise
            raise ValueError(f"widths {text!r}: give one width (e.g. 0.5) or encoder=W,TASK=W,...") from None
    enc, dec = 1.0, {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        name = name.strip()
        try:
            w = float(val)
        except ValueError:
            raise ValueError(f"widths entry {part!r} is not PART=WIDTH (e.g. encoder=0.5)") from None
        if name == "encoder":
            enc = w
        elif name in tasks:
            dec[name] = w
        else:
            raise ValueError(f"widths names {name!r}, which is neither 'encoder' nor a task of this model {tasks}")
    return WidthConfig(enc, dec).validate(allowed, tasks)
