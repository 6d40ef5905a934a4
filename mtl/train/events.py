"""TensorBoard event files of a run (``workdir/tensorboard/``), through ``tensorboardX``.

An optional dependency (``pip install 'mtl[tensorboard]'``); without it the run says so
in one line and goes on. A resumed run purges the events after the step it resumed from
(``purge_step`` = that step + 1), as it truncates metrics.jsonl, so the curves in
TensorBoard are those of one uninterrupted run.
"""
from __future__ import annotations

import os

import jax

MISSING_NOTE = ("[mtl] tensorboardX is not installed: no TensorBoard events "
                "(pip install 'mtl[tensorboard]'); curves.png is written anyway")


class EventWriter:
    """``scalars(step, {tag: value})``; a no-op when tensorboardX is missing or on other hosts."""

    def __init__(self, workdir: str, purge_step: int | None = None, log=print):
        self._w = None
        if jax.process_index() != 0:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            log(MISSING_NOTE)
            return
        self._w = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step or None)

    @property
    def enabled(self) -> bool:
        return self._w is not None

    def scalars(self, step: int, values: dict) -> None:
        if self._w is None:
            return
        for tag, v in values.items():
            if v is not None:
                self._w.add_scalar(tag, float(v), int(step))

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None
