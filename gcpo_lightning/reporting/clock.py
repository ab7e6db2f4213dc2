"""Training time, reconstructed from the per-step timings: ``metrics.csv`` holds no timestamps.

Each training row carries ``timing/step``, the wall time of that training step (``GCPOModule.training_step``,
from sampling to the last optimizer update). The clock at step ``n`` is the sum of the step times of steps
``1..n``; a step that was not logged (``log_every_n_steps > 1``) is counted at the time of the next logged one.
A run logged without ``timing/step`` falls back to the sum of its top-level phases (:data:`NESTED_PHASES` are
excluded, being parts of another phase). What the clock leaves out: validation (and the pre-training baseline),
model loading, checkpoint saving and anything else outside the training steps. It is training time, not elapsed
time.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

TIMING = "timing/"
STEP_TIME = f"{TIMING}step"

NESTED_PHASES: Mapping[str, str] = {
    f"{TIMING}integration": f"{TIMING}graph",
    f"{TIMING}context_generation": f"{TIMING}graph",
    f"{TIMING}context_representation": f"{TIMING}graph",
}
"""Phases timed inside another (the collider graph's sub-phases, ``components/graphs/collider.py``), by parent."""

PHASE_ORDER = tuple(
    f"{TIMING}{name}"
    for name in (
        "step",
        "generation",
        "scoring",
        "rewards",
        "graph",
        "integration",
        "context_generation",
        "context_representation",
        "reference",
        "update",
    )
)
"""The phases in the order a training step runs them (``GCPOModule.training_step``); others sort after, by name."""


def phase_order(name: str) -> tuple[int, str]:
    """Sort key: a known phase by :data:`PHASE_ORDER`, any other metric after them by name."""
    return (PHASE_ORDER.index(name) if name in PHASE_ORDER else len(PHASE_ORDER), name)


def step_seconds(values: Mapping[str, float]) -> float | None:
    """The wall time of one training step: ``timing/step``, else the sum of the top-level phases, else ``None``."""
    if STEP_TIME in values:
        return values[STEP_TIME]
    phases = [v for k, v in values.items() if k.startswith(TIMING) and k not in NESTED_PHASES]
    return sum(phases) if phases else None


@dataclass(frozen=True)
class Clock:
    """Seconds of training time at the end of each logged training step (``steps`` ascending, from 1)."""

    steps: tuple[int, ...]
    seconds: tuple[float, ...]

    @classmethod
    def from_steps(cls, timed: Sequence[tuple[int, float]]) -> Clock:
        """The clock of ``(step, seconds of that step)`` pairs in log order (steps counted from 1)."""
        steps: list[int] = []
        seconds: list[float] = []
        for step, duration in sorted(timed):
            previous_step, previous = (steps[-1], seconds[-1]) if steps else (0, 0.0)
            if step > previous_step:  # a repeated step (a resumed run that logged it twice) is counted once
                steps.append(step)
                seconds.append(previous + duration * (step - previous_step))
        return cls(tuple(steps), tuple(seconds))

    def __bool__(self) -> bool:
        """Whether the run logged any step time."""
        return bool(self.steps)

    def at(self, step: int) -> float:
        """Training time when step ``step`` had ended: that of the last logged step ``<= step`` (0 before any)."""
        index = bisect.bisect_right(self.steps, step)
        return self.seconds[index - 1] if index else 0.0

    @property
    def total(self) -> float:
        """Training time of the whole run."""
        return self.seconds[-1] if self.seconds else 0.0
