"""A run as typed series: one :class:`Series` per metric, on a common step axis and on the training clock.

The step axis counts completed training steps. Lightning logs a training row at the batch index (from 0), so the
row's step ``s`` becomes ``s + 1``. Evaluation rows (``val/*``, ``test/*``) are logged at the index of the last
training batch, so they become ``s + 1`` as well, except those logged before any training row (the baseline that
``fit`` scores before training, and a plain ``validate``), which are step 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gcpo_lightning.reporting.clock import Clock, step_seconds
from gcpo_lightning.reporting.csvfile import Row

EVAL_PREFIXES = ("val/", "test/")


def is_eval(name: str) -> bool:
    """Whether the metric is a held-out evaluation (logged by validation or test, not by a training step)."""
    return name.startswith(EVAL_PREFIXES)


@dataclass(frozen=True)
class Series:
    """One metric of one run: its values at training steps (``steps``) and at seconds of training time."""

    name: str
    steps: tuple[int, ...]
    values: tuple[float, ...]
    seconds: tuple[float, ...] | None = None
    """``None`` when the run logged no step times."""


@dataclass(frozen=True)
class Run:
    """One training run: where it was read from, its label, its series and its training clock."""

    label: str
    source: Path
    series: dict[str, Series]
    clock: Clock
    steps: int
    """Training steps completed (0 for a run that only evaluated)."""
    components: dict[str, str] = field(default_factory=dict)
    """Slot to component class name, from the run's ``config.yaml`` where there is one."""

    def get(self, name: str) -> Series | None:
        """The metric's series, or ``None`` when the run did not log it."""
        return self.series.get(name)


def points(rows: Iterable[Row]) -> list[tuple[str, int, float]]:
    """``(metric, step, value)`` for every value of the rows, on the step axis of this module's docstring."""
    out: list[tuple[str, int, float]] = []
    trained = False
    for row in rows:
        is_training = any(not is_eval(name) for name in row.values)
        trained = trained or is_training
        eval_step = row.step + 1 if trained else 0
        out.extend((name, eval_step if is_eval(name) else row.step + 1, v) for name, v in row.values.items())
    return out


def training_clock(rows: Iterable[Row]) -> Clock:
    """The clock of the training rows' step times (:mod:`gcpo_lightning.reporting.clock`)."""
    timed = []
    for row in rows:
        seconds = step_seconds(row.values)
        if seconds is not None:
            timed.append((row.step + 1, seconds))
    return Clock.from_steps(timed)


def build_run(label: str, source: Path, rows: list[Row], components: dict[str, str] | None = None) -> Run:
    """The run read from ``source``'s rows: a series per metric, in the order the metrics first appear."""
    clock = training_clock(rows)
    grouped: dict[str, list[tuple[int, float]]] = {}
    for name, step, value in points(rows):
        grouped.setdefault(name, []).append((step, value))
    series = {name: make_series(name, pts, clock) for name, pts in grouped.items()}
    steps = max((s.steps[-1] for s in series.values() if not is_eval(s.name)), default=0)
    return Run(label, source, series, clock, steps, components or {})


def make_series(name: str, pts: list[tuple[int, float]], clock: Clock) -> Series:
    """The series of ``(step, value)`` points, in log order, with their clock times when the run has a clock."""
    steps = tuple(step for step, _ in pts)
    seconds = tuple(clock.at(step) for step in steps) if clock else None
    return Series(name, steps, tuple(value for _, value in pts), seconds)
