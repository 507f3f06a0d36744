"""Plots of one or more runs from their ``metrics.jsonl``: loss, the ms/step breakdown and throughput.

One image with three panels: training and validation loss against step, tokens or wall time (several runs
overlaid, labelled by run directory name, the best validation loss starred); the per-phase ms/step stacked
(over the run for one run, as one bar per run for several); and tokens/s. Rendered with matplotlib's Agg
canvas (no display, no global pyplot state) and written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import InputError
from ..fsutil import atomic_write
from .metrics import read_metrics
from .rundir import RunDir
from .state import PHASES, RunState, Series

X_AXES = ("step", "tokens", "time")
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
MAX_POINTS = 600  # per curve, after bin-averaging (for the noisy per-step timings)


@dataclass
class LoadedRun:
    name: str
    state: RunState


def load_run(path: str | os.PathLike[str]) -> LoadedRun:
    """A run's metrics, aggregated; InputError for a missing directory, file or step records."""
    run = RunDir.existing(path)
    if not run.metrics.is_file():
        raise InputError(run.path, "has no metrics.jsonl (not a run directory, or the run has not started)")
    state = RunState()
    state.apply_all(read_metrics(run.metrics))
    if not len(state.train_loss):
        raise InputError(run.metrics, "holds no step records yet")
    return LoadedRun(run.name, state)


def time_scale(seconds: float) -> tuple[float, str]:
    """A divisor and unit so that a wall-time axis reads in s, min or h."""
    if seconds > 3 * 3600:
        return 3600.0, "h"
    if seconds > 180:
        return 60.0, "min"
    return 1.0, "s"


def x_values(series: Series, x: str, scale: float = 1.0) -> np.ndarray:
    arr = {"step": series.step, "tokens": series.tokens, "time": series.wall_s}[x]
    return np.asarray(arr, dtype=np.float64) / scale


def bin_mean(xs: np.ndarray, ys: np.ndarray, bins: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Average consecutive points into at most ``bins`` points."""
    if len(xs) <= bins:
        return xs, ys
    edges = np.linspace(0, len(xs), bins + 1).astype(np.int64)
    idx = edges[:-1]
    counts = np.diff(edges)
    return np.add.reduceat(xs, idx) / counts, np.add.reduceat(ys, idx) / counts


def plot_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    x: str = "step",
    size: tuple[int, int] = (1200, 800),
    dpi: int = 100,
) -> Path:
    """Draw the runs into ``out`` (.png, .svg or .pdf) of ``size`` pixels; returns the path written."""
    out_path = Path(out)
    fmt = FORMATS.get(out_path.suffix.lower())
    if fmt is None:
        raise InputError(out_path, f"unsupported image type (use {', '.join(FORMATS)})")
    if x not in X_AXES:
        raise InputError(str(x), f"unknown x axis (use {', '.join(X_AXES)})")
    runs = [load_run(p) for p in run_dirs]
    if not runs:
        raise InputError(".", "no run directories given")

    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 2))
    ax_loss = fig.add_subplot(grid[0, :])
    ax_phase = fig.add_subplot(grid[1, 0])
    ax_tps = fig.add_subplot(grid[1, 1])

    scale, unit = 1.0, ""
    if x == "time":
        scale, unit = time_scale(max(r.state.train_loss.wall_s[-1] for r in runs))
    x_label = {"step": "step", "tokens": "tokens trained", "time": f"wall time ({unit})"}[x]
    colors = [f"C{i % 10}" for i in range(len(runs))]

    _draw_loss(ax_loss, runs, colors, x, scale, x_label)
    _draw_throughput(ax_tps, runs, colors, x, scale, x_label)
    if len(runs) == 1:
        _draw_phases_over_run(ax_phase, runs[0], x, scale, x_label)
    else:
        _draw_phase_bars(ax_phase, runs)

    with atomic_write(out_path) as f:
        fig.savefig(f, format=fmt, dpi=dpi)
    return out_path


def _draw_loss(ax, runs: list[LoadedRun], colors: list[str], x: str, scale: float, x_label: str) -> None:
    for run, color in zip(runs, colors, strict=True):
        st = run.state
        xs, ys = bin_mean(x_values(st.train_loss, x, scale), np.asarray(st.train_loss.value))
        ax.plot(xs, ys, color=color, linewidth=1.2, label=f"{run.name} train")
        if len(st.val_loss):
            vx = x_values(st.val_loss, x, scale)
            vy = np.asarray(st.val_loss.value)
            best = int(np.argmin(vy))
            label = f"{run.name} val (best {vy[best]:.4f} at step {int(st.val_loss.step[best])})"
            ax.plot(vx, vy, color=color, linestyle="--", marker="o", markersize=3, label=label)
            ax.plot(vx[best], vy[best], marker="*", markersize=14, color=color, markeredgecolor="black")
    ax.set_title("loss")
    ax.set_xlabel(x_label)
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")


def _draw_throughput(
    ax, runs: list[LoadedRun], colors: list[str], x: str, scale: float, x_label: str
) -> None:
    for run, color in zip(runs, colors, strict=True):
        series = run.state.tokens_per_s
        if len(series):
            xs, ys = bin_mean(x_values(series, x, scale), np.asarray(series.value))
            ax.plot(xs, ys, color=color, linewidth=1.2, label=run.name)
    ax.set_title("throughput")
    ax.set_xlabel(x_label)
    ax.set_ylabel("tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize="small")


def _draw_phases_over_run(ax, run: LoadedRun, x: str, scale: float, x_label: str) -> None:
    """Stacked ms per phase along the run (steps where a phase is missing count it as 0)."""
    present = [p for p in PHASES if len(run.state.phase_ms[p])]
    if not present:
        ax.text(0.5, 0.5, "no phase timings recorded", ha="center", va="center", transform=ax.transAxes)
    else:
        base = run.state.ms if len(run.state.ms) else run.state.phase_ms[present[0]]
        xs = x_values(base, x, scale)
        steps = np.asarray(base.step)
        stacks = []
        for p in present:
            s = run.state.phase_ms[p]
            lookup = dict(zip(s.step, s.value, strict=True))
            stacks.append(np.array([lookup.get(k, 0.0) for k in steps]))
        bx = bin_mean(xs, xs)[0]
        ax.stackplot(bx, [bin_mean(xs, ys)[1] for ys in stacks], labels=present, alpha=0.85)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    ax.set_title(f"ms/step by phase ({run.name})")
    ax.set_xlabel(x_label)
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3)


def _draw_phase_bars(ax, runs: list[LoadedRun]) -> None:
    """One horizontal stacked bar per run: the median ms of each phase."""
    names = [r.name for r in runs]
    left = np.zeros(len(runs))
    for i, phase in enumerate(PHASES):
        widths = np.array([_median(r.state.phase_ms[phase]) for r in runs])
        if widths.any():
            ax.barh(names, widths, left=left, label=phase, color=f"C{i}")
            left += widths
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.1f} ms", va="center", fontsize="small")
    ax.set_title("median ms/step by phase")
    ax.set_xlabel("ms")
    ax.set_xlim(right=max(left.max(), 1e-9) * 1.2)
    ax.invert_yaxis()
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")


def _median(series: Series) -> float:
    return float(np.median(series.value)) if len(series) else 0.0
