"""``gcpo_lightning.reporting``: metrics.csv read into rows, the step axis, the training clock (hand-checked values).

The CSV below is laid out as Lightning's CSVLogger writes it: a sorted header of every metric, then one line per
log call in log order; the validation rows (the pre-training baseline first) sit between the training rows, at
the batch index of the last training step, with the other cells empty.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from gcpo_lightning.reporting.clock import Clock, step_seconds
from gcpo_lightning.reporting.csvfile import ReportError, read_rows
from gcpo_lightning.reporting.runs import build_run

# Four training steps of 2.0, 3.0, 1.5, 4.0 s; validation before training and after steps 2 and 4.
LOGGED = [
    {"step": 0, "val/accuracy": 0.4},
    {"step": 0, "epoch": 0, "reward": 0.1, "timing/step": 2.0, "timing/generation": 0.5},
    {"step": 1, "epoch": 0, "reward": 0.3, "timing/step": 3.0, "timing/generation": 1.0},
    {"step": 1, "epoch": 0, "val/accuracy": 0.6},
    {"step": 2, "epoch": 0, "reward": 0.2, "timing/step": 1.5, "timing/generation": 0.5},
    {"step": 3, "epoch": 0, "reward": 0.4, "timing/step": 4.0, "timing/generation": 1.0},
    {"step": 3, "epoch": 0, "val/accuracy": 0.5},
]


def write_metrics(path: Path, rows: list[dict]) -> Path:
    """``rows`` as CSVLogger writes them: sorted header of every key, empty cells for the missing ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for row in rows for k in row}), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def run(tmp_path):
    path = write_metrics(tmp_path / "metrics.csv", LOGGED)
    return build_run("r", path, read_rows(path))


def test_rows_keep_file_order_line_numbers_and_only_the_filled_cells(tmp_path):
    rows = read_rows(write_metrics(tmp_path / "metrics.csv", LOGGED))
    assert [r.line for r in rows] == [2, 3, 4, 5, 6, 7, 8]  # line 1 is the header
    assert [r.step for r in rows] == [0, 0, 1, 1, 2, 3, 3]
    assert rows[0].values == {"val/accuracy": 0.4}  # epoch and step are not metrics
    assert rows[1].values == {"reward": 0.1, "timing/step": 2.0, "timing/generation": 0.5}


def test_training_rows_count_completed_steps_and_validation_follows_the_step_before_it(run):
    assert run.series["reward"].steps == (1, 2, 3, 4)  # batch index 0..3 -> steps completed 1..4
    assert run.series["reward"].values == (0.1, 0.3, 0.2, 0.4)
    assert run.series["val/accuracy"].steps == (0, 2, 4)  # baseline, after step 2, after step 4
    assert run.series["val/accuracy"].values == (0.4, 0.6, 0.5)
    assert run.steps == 4


def test_the_clock_is_the_cumulative_sum_of_the_step_times(run):
    # 2.0, 2.0 + 3.0 = 5.0, 5.0 + 1.5 = 6.5, 6.5 + 4.0 = 10.5
    assert run.series["reward"].seconds == pytest.approx((2.0, 5.0, 6.5, 10.5))
    # the baseline is at 0 s; validation sits at the training time of the step it follows (its own time excluded)
    assert run.series["val/accuracy"].seconds == pytest.approx((0.0, 5.0, 10.5))
    assert run.clock.total == pytest.approx(10.5)


def test_unlogged_steps_count_at_the_time_of_the_next_logged_step():
    clock = Clock.from_steps([(5, 2.0), (10, 1.0)])  # log_every_n_steps=5: steps 1-5 at 2.0 s, 6-10 at 1.0 s
    assert clock.seconds == pytest.approx((10.0, 15.0))
    assert (clock.at(0), clock.at(4), clock.at(7), clock.at(12)) == pytest.approx((0.0, 0.0, 10.0, 15.0))


def test_without_timing_step_the_top_level_phases_are_summed_and_nested_ones_skipped():
    # timing/integration is a part of timing/graph (the collider measures it inside the graph block)
    values = {"timing/generation": 1.0, "timing/graph": 2.0, "timing/integration": 1.5, "reward": 0.3}
    assert step_seconds(values) == pytest.approx(3.0)
    assert step_seconds({**values, "timing/step": 3.25}) == 3.25
    assert step_seconds({"reward": 0.3}) is None


def test_a_run_without_step_times_has_no_clock(tmp_path):
    path = write_metrics(tmp_path / "metrics.csv", [{"step": 0, "reward": 0.5}, {"step": 1, "reward": 0.7}])
    run = build_run("r", path, read_rows(path))
    assert not run.clock and run.series["reward"].seconds is None


def test_nan_is_a_value_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("reward,step\nnan,0\n\n0.5,1\n")
    rows = read_rows(path)
    assert math.isnan(rows[0].values["reward"]) and rows[1].values == {"reward": 0.5} and rows[1].line == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", ": empty file (no header line)"),
        ("reward,step\n", ": a header but no rows"),
        ("reward,epoch\n0.5,0\n", ", line 1: no 'step' column"),
        ("reward,step\n0.5,0\n0.25,1,7\n", ", line 3: 3 fields where the header has 2"),
        ("reward,step\n0.5,0\nhigh,1\n", ", line 3: column 'reward' holds 'high', not a number"),
        ("reward,step\n0.5,\n", ", line 2: the 'step' column holds '', not a step number"),
        ("reward,step\n0.5,1.5\n", ", line 2: the 'step' column holds '1.5', not a step number"),
    ],
    ids=["empty", "header-only", "no-step", "extra-field", "not-a-number", "no-step-value", "fractional-step"],
)
def test_malformed_files_name_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "metrics.csv"
    path.write_text(text)
    with pytest.raises(ReportError) as err:
        read_rows(path)
    assert str(err.value).startswith(f"{path}{message}")


def test_a_binary_file_is_named_as_not_text(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ReportError, match="metrics.csv: not UTF-8 text"):
        read_rows(path)
