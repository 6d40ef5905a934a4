"""Training curves from ``metrics.jsonl``: ``curves.png`` in a workdir, and overlays of runs.

One row per task; columns: loss (train solid, validation dashed), each validation metric,
and the task weight when the aggregator changes it (or diagnostics logged it). Several
workdirs share the axes, one colour per run (``mtl plot --workdir A B``).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict


def read_records(workdir: str) -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` (a line cut by an interruption ends the list)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} has no metrics.jsonl (is it an `mtl train` workdir?)")
    out = []
    with open(path) as f:
        for ln in f:
            if ln.strip():
                try:
                    out.append(json.loads(ln))
                except json.JSONDecodeError:
                    break
    return out


def curve_data(records) -> dict:
    """``{task: {panel: {series: ([steps], [values])}}}`` with panels ``loss``, each validation
    metric, and ``weight`` (only when some task weight is not constant)."""
    out: dict = defaultdict(lambda: defaultdict(dict))

    def add(task, panel, series, step, value):
        xs, ys = out[task][panel].setdefault(series, ([], []))
        xs.append(step)
        ys.append(float("nan") if value is None else float(value))

    weights: dict = defaultdict(dict)
    for r in records:
        split, step = r.get("split"), r.get("step")
        if split == "train":
            for t, v in r.get("losses", {}).items():
                add(t, "loss", "train", step, v)
        elif split == "val":
            for t, ms in r.get("metrics", {}).items():
                for k, v in ms.items():
                    add(t, "loss" if k == "loss" else k, "val", step, v)
        if split in ("train", "diagnostics"):
            for t, v in (r.get("weights") or {}).items():
                weights[t][step] = v
    if any(len({round(v, 12) for v in ws.values() if v is not None}) > 1 for ws in weights.values()):
        for t, ws in weights.items():
            for step in sorted(ws):
                add(t, "weight", "weight", step, ws[step])
    return {t: dict(p) for t, p in out.items()}


def plot_runs(workdirs, out: str, labels=None) -> str:
    """Overlay the curves of ``workdirs`` into the PNG ``out`` (written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(labels) if labels else [os.path.basename(os.path.normpath(w)) for w in workdirs]
    data = [curve_data(read_records(w)) for w in workdirs]
    tasks = list(dict.fromkeys(t for d in data for t in d))
    if not tasks:
        raise ValueError(f"nothing to plot yet: no train or validation records in {', '.join(workdirs)}")
    panels = list(dict.fromkeys(p for d in data for t in d.values() for p in t))
    panels.sort(key=lambda p: (p != "loss", p == "weight", p))
    fig = Figure(figsize=(3.6 * len(panels), 2.6 * len(tasks)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(tasks), len(panels), squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(data))]
    for i, task in enumerate(tasks):
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            for d, label, c in zip(data, labels, colors):
                for series, (xs, ys) in d.get(task, {}).get(panel, {}).items():
                    style = "--" if series == "val" and panel == "loss" else "-"
                    marker = "o" if series == "val" else None
                    name = label if len(data) > 1 else series
                    if len(data) > 1 and panel == "loss":
                        name = f"{label} ({series})"
                    ax.plot(xs, ys, style, color=c if len(data) > 1 else ("C0" if series == "train" else "C1"),
                            marker=marker, markersize=3, label=name)
            if panel == "loss":
                ax.set_yscale("log")
            ax.set_title(f"{task}: {panel}" if panel in ("loss", "weight") else f"{task}: val {panel}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            if ax.lines:
                ax.legend(fontsize=7)
    tmp = f"{out}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def write_curves(workdir: str) -> str:
    return plot_runs([workdir], os.path.join(workdir, "curves.png"))



class CurveWriter:
    """Re-renders ``workdir/curves.png`` in a background thread when asked (``request``), so
    training does not wait for matplotlib; requests made while it renders are coalesced
    into one more render. ``close`` waits for the last one. A failed render is said once."""

    def __init__(self, workdir: str, log=print):
        import threading

        self.workdir, self.log = workdir, log
        self._lock = threading.Lock()
        self._thread = None
        self._dirty = False
        self._warned = False
        try:
            import matplotlib  # noqa: F401
            self.enabled = True
        except ImportError:
            self.enabled = False
            log("[mtl] matplotlib is not installed: no curves.png (pip install 'mtl[plots]')")

    def _render_loop(self) -> None:
        while True:
            try:
                write_curves(self.workdir)
            except Exception as e:  # noqa: BLE001 - a plotting problem must not stop training
                if not self._warned:
                    self._warned = True
                    self.log(f"[mtl] curves.png not written: {type(e).__name__}: {e}")
            with self._lock:
                if not self._dirty:
                    self._thread = None
                    return
                self._dirty = False

    def request(self) -> None:
        import threading

        if not self.enabled:
            return
        with self._lock:
            if self._thread is not None:
                self._dirty = True
                return
            self._thread = threading.Thread(target=self._render_loop, name="mtl-curves", daemon=True)
            self._thread.start()

    def close(self) -> None:
        t = self._thread
        if t is not None:
            t.join()
