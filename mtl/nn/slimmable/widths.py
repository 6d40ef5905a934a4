"""Width configurations: which fraction of its units each part of a slimmable model uses.

A width ``w`` in a fixed set (default ``WIDTHS = (0.25, 0.5, 0.75, 1.0)``) means "use
the first ``ceil(w * C)`` units/channels/heads" of a layer with ``C`` of them
(:func:`active`). A :class:`WidthConfig` holds one width for the shared encoder and one
per task decoder; it is frozen and hashable, so it is a *static* argument of a jitted
function: every configuration is its own compiled program (cached after its first call).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

WIDTHS: tuple = (0.25, 0.5, 0.75, 1.0)


def active(width: float, units: int) -> int:
    """``ceil(width * units)`` (at least 1): the number of leading units width ``width`` uses.

    A tiny tolerance keeps float round-off (``0.3 * 10 = 3.0000000000000004``) from adding a unit.
    """
    if not 0.0 < float(width) <= 1.0:
        raise ValueError(f"a width is a fraction in (0, 1]; got {width!r}")
    return max(1, math.ceil(float(width) * int(units) - 1e-9))


def check_widths(widths: Iterable[float]) -> tuple:
    """The sorted, de-duplicated width set; each in (0, 1] and 1.0 (the full model) included."""
    ws = tuple(sorted({float(w) for w in widths}))
    if not ws:
        raise ValueError("the width set is empty; give e.g. widths=(0.25, 0.5, 0.75, 1.0)")
    bad = [w for w in ws if not 0.0 < w <= 1.0]
    if bad:
        raise ValueError(f"widths must lie in (0, 1]; got {bad} in {ws}")
    if ws[-1] != 1.0:
        raise ValueError(f"the width set must contain 1.0 (the full model); got {ws}")
    return ws


@dataclasses.dataclass(frozen=True)
class WidthConfig:
    """Encoder width plus one width per task decoder (``decoders``: task -> width).

    Tasks left out of ``decoders`` run at full width (1.0). Stored as a sorted tuple of
    pairs so the config is hashable (a jit static argument) and equal configs compare equal.
    """

    encoder: float = 1.0
    decoders: tuple = ()

    def __post_init__(self):
        dec = self.decoders
        items = dec.items() if isinstance(dec, Mapping) else dec
        pairs = tuple(sorted((str(k), float(v)) for k, v in items))
        object.__setattr__(self, "decoders", pairs)
        object.__setattr__(self, "encoder", float(self.encoder))

    @classmethod
    def uniform(cls, width: float, tasks: Sequence[str]) -> "WidthConfig":
        """The same width for the encoder and every task decoder."""
        return cls(width, {t: width for t in tasks})

    def decoder(self, task: str) -> float:
        return dict(self.decoders).get(task, 1.0)

    def validate(self, allowed: Sequence[float], tasks: Sequence[str]) -> "WidthConfig":
        """Raise ValueError if a width is outside ``allowed`` or a decoder names no task."""
        allowed = tuple(float(w) for w in allowed)
        unknown = [t for t, _ in self.decoders if t not in tasks]
        if unknown:
            raise ValueError(f"WidthConfig names decoder(s) {unknown} but the model's tasks are {list(tasks)}")
        for part, w in (("encoder", self.encoder),) + tuple((f"decoder {t!r}", w) for t, w in self.decoders):
            if not any(abs(w - a) < 1e-9 for a in allowed):
                raise ValueError(f"{part} width {w} is not in the trained width set {allowed}; "
                                 "a slimmable model only runs at the widths it was trained for")
        return self

    def to_json(self) -> dict:
        return {"encoder": self.encoder, "decoders": dict(self.decoders)}


def all_configs(widths: Sequence[float], tasks: Sequence[str]) -> list:
    """Every configuration of the grid ``widths ** (1 + len(tasks))`` (encoder first)."""
    import itertools

    out = []
    for combo in itertools.product(widths, repeat=1 + len(tasks)):
        out.append(WidthConfig(combo[0], dict(zip(tasks, combo[1:]))))
    return out
