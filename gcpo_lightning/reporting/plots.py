"""The PNG figures: one per group of metrics, one panel per metric, one line per run, each figure drawn twice,
against the training step (``<key>_vs_step.png``) and against training time (``<key>_vs_time.png``).

Drawn with matplotlib's Agg canvas directly (no ``pyplot``, no global backend or figure state). A metric no run
logged gets no panel, a figure without panels no file, and a run without step times no line on the time axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from gcpo_lightning.reporting.clock import STEP_TIME, TIMING, phase_order
from gcpo_lightning.reporting.runs import Run, Series

COLUMNS = 3
PANEL_SIZE = (4.2, 3.0)  # inches
DPI = 100
TITLE_IN, LEGEND_IN = 0.6, 0.9  # inches above the panels (figure title) and below them (x label, legend)
MARKER_UP_TO = 25
"""Series with at most this many points get a marker on each (held-out accuracy is logged a few times)."""


@dataclass(frozen=True)
class FigureSpec:
    """A figure: its file stem, its title and its metrics (the names given, then every one under ``prefix``)."""

    key: str
    title: str
    names: tuple[str, ...] = ()
    prefix: str | None = None

    def metrics(self, runs: Sequence[Run]) -> list[str]:
        """The figure's metrics that at least one run logged, in panel order."""
        logged = {name for run in runs for name in run.series}
        named = [name for name in self.names if name in logged]
        prefixed = [n for n in logged if self.prefix and n.startswith(self.prefix) and n not in named]
        return named + sorted(prefixed, key=phase_order)


FIGURES = (
    FigureSpec("reward", "Reward (mean over the training batch)", ("reward",)),
    FigureSpec("accuracy", "Held-out accuracy", ("val/accuracy", "test/accuracy")),
    FigureSpec("kl", "KL penalties: to the reference, causal (projected reference)", ("kl", "causal_kl")),
    FigureSpec("causal_weights", "Causal weights", prefix="causal_weight/"),
    FigureSpec("clip_ratio", "Clip ratios", prefix="clip_ratio/"),
    FigureSpec("timing", "Seconds per step, by phase", (STEP_TIME,), prefix=TIMING),
)


@dataclass(frozen=True)
class Plot:
    """A written PNG: the figure it shows, the x axis (``"step"`` or ``"time"``) and its path."""

    spec: FigureSpec
    axis: str
    path: Path


def time_unit(runs: Sequence[Run]) -> tuple[str, float]:
    """The unit of the time axis for the longest run, and the seconds it holds."""
    longest = max((run.clock.total for run in runs), default=0.0)
    if longest >= 3 * 3600:
        return "h", 3600.0
    if longest >= 3 * 60:
        return "min", 60.0
    return "s", 1.0


def x_values(series: Series, axis: str, scale: float) -> Sequence[float] | None:
    """The series' x values on ``axis``, or ``None`` when the run has no clock for the time axis."""
    if axis == "step":
        return series.steps
    return None if series.seconds is None else [s / scale for s in series.seconds]


def new_figure(rows: int, cols: int) -> Figure:
    """An empty Agg figure for a ``rows`` x ``cols`` grid of panels, margins fixed in inches (the title above,
    the legend below). Fixed margins, not constrained layout: that measures every label again and doubles the
    drawing time."""
    width, height = PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows + TITLE_IN + LEGEND_IN
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=0.6 / width,
        right=1 - 0.2 / width,
        top=1 - TITLE_IN / height,
        bottom=LEGEND_IN / height,
        wspace=0.3,
        hspace=0.55,
    )
    return fig


def legend(fig: Figure, entries: Sequence[tuple[str, str]]) -> None:
    """One legend below the panels: a line of each colour and the run it stands for (runs drawn in the figure)."""
    handles = [Line2D([], [], color=colour) for colour, _ in entries]
    fig.legend(handles, [label for _, label in entries], loc="lower center", ncols=min(len(entries), 4))


def panel(ax: Axes, name: str, runs: Sequence[Run], axis: str, scale: float) -> set[int]:
    """Draw metric ``name`` of every run that has it on ``ax``; the indices of the runs drawn."""
    drawn: set[int] = set()
    for colour, run in enumerate(runs):
        series = run.get(name)
        xs = x_values(series, axis, scale) if series else None
        if series and xs is not None:
            marker = "o" if len(xs) <= MARKER_UP_TO else None
            ax.plot(xs, series.values, color=f"C{colour}", marker=marker, markersize=3)
            drawn.add(colour)
    ax.set_title(f"{name} (s)" if name.startswith(TIMING) else name, fontsize=10)
    ax.grid(alpha=0.3)
    if axis == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return drawn


def draw(spec: FigureSpec, metrics: Sequence[str], runs: Sequence[Run], axis: str) -> Figure:
    """The figure of ``metrics`` against ``axis``; a run keeps its colour (``C0``, ``C1``, ...) in every figure."""
    cols = min(COLUMNS, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = new_figure(rows, cols)
    unit, scale = time_unit(runs)
    xlabel = "training step" if axis == "step" else f"training time ({unit}, validation excluded)"
    drawn: set[int] = set()
    for index, name in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, index + 1)
        drawn |= panel(ax, name, runs, axis, scale)
        ax.set_xlabel(xlabel, fontsize=8)
    legend(fig, [(f"C{i}", runs[i].label) for i in sorted(drawn)])
    fig.suptitle(spec.title)
    return fig


def drawable(metrics: Sequence[str], runs: Sequence[Run], axis: str) -> bool:
    """Whether some run has one of ``metrics`` to draw on ``axis`` (on the time axis: a run with step times)."""
    return any((axis == "step" or run.clock) and any(m in run.series for m in metrics) for run in runs)


def write_plots(runs: Sequence[Run], out: Path) -> list[Plot]:
    """Write every figure the runs have data for into ``out``; the written plots, in :data:`FIGURES` order."""
    written = []
    for spec in FIGURES:
        metrics = spec.metrics(runs)
        for axis in (a for a in ("step", "time") if drawable(metrics, runs, a)):
            path = out / f"{spec.key}_vs_{axis}.png"
            draw(spec, metrics, runs, axis).savefig(path)
            written.append(Plot(spec, axis, path))
    return written
