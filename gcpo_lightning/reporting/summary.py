"""The numbers of a run: held-out accuracy (before, final, best), reward, step time, its phases, training time."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gcpo_lightning.reporting.clock import NESTED_PHASES, STEP_TIME, TIMING, phase_order
from gcpo_lightning.reporting.runs import Run, Series

ACCURACY_METRICS = ("val/accuracy", "val/pass@1", "test/accuracy", "test/pass@1")
"""The held-out accuracy: the first of these the run logged."""
REWARD = "reward"
RECENT_STEPS = 10
"""The reward is also averaged over this many last logged steps (a single step's batch mean is noisy)."""


@dataclass(frozen=True)
class Point:
    """A value and the training step it was logged at."""

    value: float
    step: int


@dataclass(frozen=True)
class Phase:
    """The mean seconds per step of one ``timing/*`` phase; ``parent`` names the phase it is a part of."""

    name: str
    seconds: float
    parent: str | None = None


@dataclass(frozen=True)
class RunSummary:
    """What ``report.md`` says about one run; ``None`` where the run did not log the metric."""

    run: Run
    accuracy_metric: str | None
    baseline_accuracy: Point | None
    final_accuracy: Point | None
    best_accuracy: Point | None
    final_reward: Point | None
    recent_reward: float | None
    mean_step_seconds: float | None
    total_seconds: float | None
    phases: tuple[Phase, ...]
    other_seconds: float | None
    """Mean seconds per step outside every timed top-level phase (advantages, gathering, logging)."""


def finite(series: Series) -> list[Point]:
    """The series' points whose value is a number (``nan`` logged for a skipped step is left out)."""
    return [Point(v, s) for s, v in zip(series.steps, series.values) if math.isfinite(v)]


def last(points: Sequence[Point]) -> Point | None:
    """The last point, or ``None``."""
    return points[-1] if points else None


def best(points: Sequence[Point]) -> Point | None:
    """The highest value, at the first step it was reached, or ``None``."""
    return max(points, key=lambda p: (p.value, -p.step)) if points else None


def accuracy_metric(run: Run) -> str | None:
    """The name of the run's held-out accuracy metric (:data:`ACCURACY_METRICS`), or ``None``."""
    return next((name for name in ACCURACY_METRICS if run.get(name) is not None), None)


def mean(values: Sequence[float]) -> float | None:
    """The mean of the finite values, or ``None`` when there is none."""
    kept = [v for v in values if math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def phase_tree(names: Iterable[str]) -> list[tuple[str, str | None]]:
    """``(phase, parent)`` for the ``names``, in step order, each phase followed by its parts; a part whose parent
    is not among ``names`` stands alone (parent ``None``)."""
    found = set(names)
    parent = {name: NESTED_PHASES[name] if NESTED_PHASES.get(name) in found else None for name in found}
    ordered: list[tuple[str, str | None]] = []
    for name in sorted((n for n in found if parent[n] is None), key=phase_order):
        ordered.append((name, None))
        ordered.extend((n, name) for n in sorted(found, key=phase_order) if parent[n] == name)
    return ordered


def phases(run: Run) -> tuple[Phase, ...]:
    """Every ``timing/*`` phase but the whole step: its mean seconds per step, in :func:`phase_tree` order."""
    means = {
        name: m
        for name, s in run.series.items()
        if name.startswith(TIMING) and name != STEP_TIME and (m := mean(s.values)) is not None
    }
    return tuple(Phase(name, means[name], parent) for name, parent in phase_tree(means))


def summarize(run: Run) -> RunSummary:
    """The summary of ``run``."""
    metric = accuracy_metric(run)
    acc = finite(run.series[metric]) if metric else []
    reward = finite(run.series[REWARD]) if REWARD in run.series else []
    clock_steps = run.clock.steps[-1] if run.clock else 0
    mean_step = run.clock.total / clock_steps if clock_steps else None
    split = phases(run)
    return RunSummary(
        run=run,
        accuracy_metric=metric,
        baseline_accuracy=next((p for p in acc if p.step == 0), None),
        final_accuracy=last(acc),
        best_accuracy=best(acc),
        final_reward=last(reward),
        recent_reward=mean([p.value for p in reward[-RECENT_STEPS:]]),
        mean_step_seconds=mean_step,
        total_seconds=run.clock.total if run.clock else None,
        phases=split,
        other_seconds=untimed(run, mean_step, split),
    )


def untimed(run: Run, mean_step: float | None, split: Sequence[Phase]) -> float | None:
    """The step time no top-level phase accounts for; ``None`` unless the run logged ``timing/step`` itself."""
    if mean_step is None or STEP_TIME not in run.series or not split:
        return None
    return max(0.0, mean_step - sum(p.seconds for p in split if p.parent is None))
