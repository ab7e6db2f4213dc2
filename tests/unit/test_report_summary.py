"""``gcpo_lightning.reporting``: the numbers of a run (final and best accuracy, reward, phase split) and their text."""

from __future__ import annotations

from pathlib import Path

import pytest

from gcpo_lightning.reporting.clock import Clock
from gcpo_lightning.reporting.markdown import duration, phase_split, table
from gcpo_lightning.reporting.runs import Run, Series
from gcpo_lightning.reporting.summary import Point, summarize

NAN = float("nan")


def make_run(series: dict[str, tuple[tuple[int, ...], tuple[float, ...]]], clock: Clock | None = None) -> Run:
    """A run of the given ``name: (steps, values)`` series."""
    made = {name: Series(name, steps, values) for name, (steps, values) in series.items()}
    return Run("r", Path("metrics.csv"), made, clock or Clock((), ()), max(max(s) for s, _ in series.values()))


def test_final_best_and_baseline_accuracy():
    run = make_run({"val/accuracy": ((0, 2, 4, 6), (0.4, 0.6, 0.6, 0.5)), "reward": ((1, 2), (0.1, 0.3))})
    s = summarize(run)
    assert s.baseline_accuracy == Point(0.4, 0) and s.final_accuracy == Point(0.5, 6)
    assert s.best_accuracy == Point(0.6, 2)  # a tie goes to the first step that reached it
    assert s.final_reward == Point(0.3, 2) and s.recent_reward == pytest.approx(0.2)


def test_nan_values_are_not_final_or_best():
    run = make_run({"val/accuracy": ((0, 2), (0.4, NAN)), "reward": ((1, 2, 3), (0.2, 0.6, NAN))})
    s = summarize(run)
    assert s.final_accuracy == Point(0.4, 0) == s.best_accuracy and s.final_reward == Point(0.6, 2)


def test_pass_at_1_stands_in_for_a_missing_accuracy_and_missing_metrics_are_none():
    s = summarize(make_run({"val/pass@1": ((0, 2), (0.1, 0.3))}))
    assert s.accuracy_metric == "val/pass@1" and s.final_accuracy == Point(0.3, 2)
    assert s.final_reward is None and s.recent_reward is None
    assert s.mean_step_seconds is None and s.total_seconds is None and s.phases == () and s.other_seconds is None


def test_phase_split_nests_the_graph_parts_and_leaves_the_untimed_rest():
    # steps of 2.0 and 4.0 s: mean 3.0; generation mean 0.5, graph mean 1.5 (integration 1.0 of it), update 0.75
    # -> other = 3.0 - (0.5 + 1.5 + 0.75) = 0.25; integration is not counted twice
    steps = (1, 2)
    run = make_run(
        {
            "timing/step": (steps, (2.0, 4.0)),
            "timing/update": (steps, (0.5, 1.0)),
            "timing/graph": (steps, (1.0, 2.0)),
            "timing/integration": (steps, (0.5, 1.5)),
            "timing/generation": (steps, (0.5, 0.5)),
        },
        Clock.from_steps([(1, 2.0), (2, 4.0)]),
    )
    s = summarize(run)
    assert [(p.name, p.parent) for p in s.phases] == [
        ("timing/generation", None),
        ("timing/graph", None),
        ("timing/integration", "timing/graph"),
        ("timing/update", None),
    ]
    assert [p.seconds for p in s.phases] == pytest.approx([0.5, 1.5, 1.0, 0.75])
    assert s.mean_step_seconds == pytest.approx(3.0) and s.total_seconds == pytest.approx(6.0)
    assert s.other_seconds == pytest.approx(0.25)
    text = "\n".join(phase_split([s]))
    assert "| `timing/graph` | 1.50 s (50.0%) |" in text and "↳ `timing/integration` | 1.00 s (33.3%)" in text
    assert "| other (not timed separately) | 0.25 s (8.3%) |" in text


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "n/a"), (8.04, "8.0 s"), (845.4, "14 min 05 s"), (7400, "2 h 03 min")]
)
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_table_escapes_pipes():
    assert table(["a", "b"], [["x|y", "1"]]) == ["| a | b |", "| --- | --- |", "| x\\|y | 1 |"]
