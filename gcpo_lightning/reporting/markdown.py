"""``report.md``: the runs side by side (one column per run), the phase split of a step, and the plots."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from gcpo_lightning.reporting.plots import Plot
from gcpo_lightning.reporting.summary import RECENT_STEPS, Point, RunSummary, phase_tree

MISSING = "n/a"
TIME_NOTE = (
    "Training time is reconstructed from `metrics.csv`, which holds no timestamps: the clock at step n is the sum "
    "of the `timing/step` values of steps 1..n (the wall time of each training step, sampling to the last "
    "optimizer update; without it, the sum of the top-level `timing/*` phases; a step that was not logged counts "
    "at the time of the next logged one). It leaves out "
    "validation, the pre-training baseline, model loading and checkpointing. Held-out accuracy is drawn at the "
    "training time of the step it was measured after."
)


def value(point: Point | None, digits: int = 3) -> str:
    """``0.550 (step 2)``, or :data:`MISSING`."""
    return MISSING if point is None else f"{point.value:.{digits}f} (step {point.step})"


def number(x: float | None, digits: int = 3) -> str:
    """The number with ``digits`` decimals, or :data:`MISSING`."""
    return MISSING if x is None else f"{x:.{digits}f}"


def duration(seconds: float | None) -> str:
    """``87.3 s``, ``14 min 05 s``, ``2 h 03 min``, or :data:`MISSING`."""
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table (``|`` in cells escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(r) for r in rows)]


OVERVIEW: tuple[tuple[str, Callable[[RunSummary], str]], ...] = (
    ("metrics file", lambda s: f"`{s.run.source}`"),
    ("components", lambda s: ", ".join(s.run.components.values()) or MISSING),
    ("training steps", lambda s: str(s.run.steps)),
    ("held-out accuracy metric", lambda s: f"`{s.accuracy_metric}`" if s.accuracy_metric else MISSING),
    ("held-out accuracy, before training", lambda s: value(s.baseline_accuracy)),
    ("held-out accuracy, final", lambda s: value(s.final_accuracy)),
    ("held-out accuracy, best", lambda s: value(s.best_accuracy)),
    ("reward, final step", lambda s: value(s.final_reward)),
    (f"reward, mean of the last {RECENT_STEPS} logged steps", lambda s: number(s.recent_reward)),
    ("step time, mean", lambda s: MISSING if s.mean_step_seconds is None else f"{s.mean_step_seconds:.2f} s"),
    ("training time", lambda s: duration(s.total_seconds)),
)
"""The rows of the overview table: a label and how a run's summary fills its cell."""


def overview(summaries: Sequence[RunSummary]) -> list[str]:
    """The runs side by side: one column per run, one row per number."""
    rows = [[label, *(cell(s) for s in summaries)] for label, cell in OVERVIEW]
    return table(["", *(s.run.label for s in summaries)], rows)


def phase_cell(seconds: float | None, step: float | None) -> str:
    """``1.23 s (45.6%)`` of the mean step, or :data:`MISSING`."""
    if seconds is None:
        return MISSING
    share = f" ({100 * seconds / step:.1f}%)" if step else ""
    return f"{seconds:.2f} s{share}"


def phase_split(summaries: Sequence[RunSummary]) -> list[str]:
    """Mean seconds per step of every phase any run timed, parts indented under their phase; ``[]`` if none."""
    by_run = [{p.name: p.seconds for p in s.phases} for s in summaries]
    tree = phase_tree(name for phases in by_run for name in phases)
    if not tree:
        return []
    rows = [
        [f"&nbsp;&nbsp;↳ `{name}`" if parent else f"`{name}`"]
        + [phase_cell(phases.get(name), s.mean_step_seconds) for phases, s in zip(by_run, summaries)]
        for name, parent in tree
    ]
    rows.append(
        ["other (not timed separately)"] + [phase_cell(s.other_seconds, s.mean_step_seconds) for s in summaries]
    )
    rows.append(["**whole step**"] + [phase_cell(s.mean_step_seconds, s.mean_step_seconds) for s in summaries])
    return table(["phase", *(s.run.label for s in summaries)], rows)


def plot_section(plots: Sequence[Plot], out: Path) -> list[str]:
    """One heading per figure, its step and time versions embedded by path relative to ``report.md``."""
    lines: list[str] = []
    for spec in dict.fromkeys(plot.spec for plot in plots):
        lines += ["", f"### {spec.title}", ""]
        for plot in (p for p in plots if p.spec == spec):
            against = "training step" if plot.axis == "step" else "training time"
            lines.append(f"![{spec.title}, against {against}]({plot.path.relative_to(out).as_posix()})")
    return lines


def render(summaries: Sequence[RunSummary], plots: Sequence[Plot], out: Path) -> str:
    """The whole ``report.md`` for the runs' summaries and the plots written in ``out``."""
    lines = ["# Training report", "", f"{len(summaries)} run(s), one column each.", "", "## Runs", ""]
    lines += overview(summaries)
    split = phase_split(summaries)
    if split:
        lines += ["", "## Time per step, by phase", "", "Mean seconds per training step (share of the step).", ""]
        lines += split
    lines += ["", "## How time is derived", "", TIME_NOTE]
    if plots:
        lines += ["", "## Plots"] + plot_section(plots, out)
    return "\n".join(lines) + "\n"
