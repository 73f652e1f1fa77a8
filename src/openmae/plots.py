"""Training curves of runs, as one PNG: `mae plot RUN_DIR [RUN_DIR...]`, and `curves.png` in every run.

Read from each run's `metrics.jsonl`: the loss and the lr of the logged steps, and the per-epoch
records (the epoch's mean training loss and what the monitors measured: held-out masked MSE with its
baseline, k-NN and validation top-1). The x axis is epochs, so runs with other batch sizes line up.
Several runs are overlaid, one colour each, named in the legend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from openmae.errors import UsageError

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"

# The per-epoch panels: (title, [(metric key, label suffix, line style)]); a panel shows when a run has one.
EPOCH_PANELS = (
    ("held-out masked-patch MSE", (("masked_mse", "", "-"), ("baseline_mse", " baseline", ":"))),
    ("k-NN top-1 (%)", (("knn_top1", "", "-"),)),
    ("validation top-1 (%)", (("val_top1", "", "-"),)),
)


@dataclass
class RunCurves:
    """One run's logged values: per logged step and per epoch, each a list of records in step order."""

    name: str
    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)


def read_curves(run_dir: str | Path, name: str | None = None) -> RunCurves:
    """The records of `run_dir/metrics.jsonl`. A run resumed from an earlier checkpoint logs some steps
    again: the last record of a step wins, as that is the history the final weights have."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir} holds no {METRICS_FILE}: not a run folder")
    steps: dict[int, dict] = {}
    epochs: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        if "loss" in record:
            steps[record["step"]] = record
        elif "train_loss" in record:
            epochs[record["step"]] = record
    return RunCurves(
        name or Path(run_dir).name,
        [steps[k] for k in sorted(steps)],
        [epochs[k] for k in sorted(epochs)],
    )


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write the curves of `run_dirs` (overlaid) as a PNG at `out`; returns its path."""
    runs = [read_curves(d, name) for d, name in zip(run_dirs, legend_names(run_dirs), strict=True)]
    panels = [title for title, keys in EPOCH_PANELS if any(r.get(k) is not None for run in runs
              for r in run.epochs for k, _, _ in keys)]  # fmt: skip
    count = 2 + len(panels)
    columns = 2 if count > 1 else 1
    rows = (count + columns - 1) // columns
    figure = Figure(figsize=(6.0 * columns, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    loss_axis, lr_axis = axes[0], axes[1]
    for run, colour in zip(runs, colours, strict=True):
        _plot(loss_axis, run.steps, "loss", colour, run.name, linewidth=1.2)
        # The epoch means as dots: named in the legend only for a run too short to log a step.
        label = "_epoch means" if run.steps else f"{run.name} (epoch means)"
        _plot(loss_axis, run.epochs, "train_loss", colour, label, marker="o", linestyle="none", markersize=4)
        _plot(lr_axis, run.steps, "lr", colour, run.name, linewidth=1.2)
    _label(loss_axis, "training loss")
    _label(lr_axis, "learning rate")
    lrs = [r["lr"] for run in runs for r in run.steps if r.get("lr", 0) > 0]
    if lrs and max(lrs) > 100 * min(lrs):  # runs whose lrs differ by orders of magnitude
        lr_axis.set_yscale("log")
    for axis, title in zip(axes[2:], panels, strict=False):
        keys = dict(EPOCH_PANELS)[title]
        for run, colour in zip(runs, colours, strict=True):
            for key, suffix, style in keys:
                _plot(axis, run.epochs, key, colour, run.name + suffix, linestyle=style, marker=".")
        _label(axis, title)
    for axis in axes[count:]:
        axis.set_visible(False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out


def legend_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a name."""
    names = [Path(d).name for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs, strict=True)]


def _plot(axis, records: list[dict], key: str, colour: str, label: str, **style) -> None:
    points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    if points:
        x, y = zip(*points, strict=True)
        axis.plot(x, y, color=colour, label=label, **style)


def _label(axis, title: str) -> None:
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("epoch")
    axis.grid(True, alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)


__all__ = ["CURVES_FILE", "plot_runs", "read_curves"]
