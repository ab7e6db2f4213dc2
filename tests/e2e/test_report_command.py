"""``python -m gcpo_lightning report``: two synthetic runs (GCPO, and GRPO without causal metrics) side by side.

The run folders are laid out as LightningCLI leaves them (``<save_dir>/<name>/version_0/`` with ``metrics.csv``
and ``config.yaml``); the report is made once for the module and every test reads it.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from gcpo_lightning.reporting.command import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEP_TIMES = {"gcpo": (4.0, 6.0, 5.0, 5.0), "grpo": (1.0, 1.5, 1.0, 0.5)}
REWARDS = {"gcpo": (0.2, 0.4, 0.3, 0.5), "grpo": (0.1, 0.2, 0.4, 0.3)}
ACCURACY = {"gcpo": (0.30, 0.45, 0.40), "grpo": (0.30, 0.35, 0.50)}  # before training, after step 2, after step 4
CAUSAL = {"causal_kl": 0.05, "causal_weight/mean": 1.2, "causal_weight/min": -0.1}


def train_row(method: str, index: int) -> dict[str, float]:
    """The metrics of training step ``index`` (0-based batch index, as Lightning logs it)."""
    step_time = STEP_TIMES[method][index]
    row = {"step": index, "epoch": 0, "reward": REWARDS[method][index], "kl": 0.01 * index}
    row.update({"clip_ratio/low_mean": 0.0, "timing/step": step_time, "timing/generation": 0.25 * step_time})
    row["timing/update"] = 0.5 * step_time
    if method == "gcpo":
        row.update({**CAUSAL, "timing/graph": 0.2 * step_time, "timing/integration": 0.1 * step_time})
    return row


def logged_rows(method: str) -> list[dict[str, float]]:
    """Baseline validation, two training steps, validation, two steps, validation: CSVLogger's order and steps."""
    acc = ACCURACY[method]
    return [
        {"step": 0, "val/accuracy": acc[0]},
        train_row(method, 0),
        train_row(method, 1),
        {"step": 1, "epoch": 0, "val/accuracy": acc[1]},
        train_row(method, 2),
        train_row(method, 3),
        {"step": 3, "epoch": 0, "val/accuracy": acc[2]},
    ]


def write_run(save_dir: Path, method: str) -> Path:
    """``save_dir/<method>/version_0/{metrics.csv,config.yaml}``; returns ``save_dir/<method>``."""
    version = save_dir / method / "version_0"
    version.mkdir(parents=True)
    rows = logged_rows(method)
    with (version / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for r in rows for k in r}), restval="")
        writer.writeheader()
        writer.writerows(rows)
    adjuster = "CausalAdvantage" if method == "gcpo" else "GroupNormalizedAdvantage"
    (version / "config.yaml").write_text(f"model:\n  adjuster:\n    class_path: gcpo_lightning.{adjuster}\n")
    return save_dir / method


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The report of the two runs: ``(output folder, report.md text, exit status)``."""
    save_dir = tmp_path_factory.mktemp("runs")
    out = save_dir / "report"
    status = main([str(write_run(save_dir, "gcpo")), str(write_run(save_dir, "grpo")), "--out", str(out)])
    return out, (out / "report.md").read_text(), status


def test_every_plot_is_a_png_against_step_and_time(made):
    out, _, status = made
    assert status == 0
    keys = ("reward", "accuracy", "kl", "causal_weights", "clip_ratio", "timing")
    expected = {f"{key}_vs_{axis}.png" for key in keys for axis in ("step", "time")}
    assert {p.name for p in out.glob("*.png")} == expected
    for name in expected:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name


def test_report_lists_both_runs_with_their_numbers(made):
    _, text, _ = made
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("|")}
    assert rows[""] == "|  | gcpo/version_0 | grpo/version_0 |"
    assert rows["components"] == "| components | CausalAdvantage | GroupNormalizedAdvantage |"
    assert rows["training steps"] == "| training steps | 4 | 4 |"
    assert rows["held-out accuracy, before training"].endswith("| 0.300 (step 0) | 0.300 (step 0) |")
    assert rows["held-out accuracy, final"].endswith("| 0.400 (step 4) | 0.500 (step 4) |")
    assert rows["held-out accuracy, best"].endswith("| 0.450 (step 2) | 0.500 (step 4) |")
    assert rows["reward, final step"].endswith("| 0.500 (step 4) | 0.300 (step 4) |")
    # mean step: gcpo (4 + 6 + 5 + 5) / 4 = 5.0 s, grpo (1 + 1.5 + 1 + 0.5) / 4 = 1.0 s; totals 20.0 s and 4.0 s
    assert rows["step time, mean"].endswith("| 5.00 s | 1.00 s |")
    assert rows["training time"].endswith("| 20.0 s | 4.0 s |")
    # phases as fractions of each step: generation 25%, update 50%, graph 20% (integration 10%) for GCPO only
    assert rows["`timing/generation`"].endswith("| 1.25 s (25.0%) | 0.25 s (25.0%) |")
    assert rows["&nbsp;&nbsp;↳ `timing/integration`"].endswith("| 0.50 s (10.0%) | n/a |")
    assert rows["other (not timed separately)"].endswith("| 0.25 s (5.0%) | 0.25 s (25.0%) |")


def test_report_embeds_every_plot_by_relative_path(made):
    out, text, _ = made
    for png in out.glob("*.png"):
        assert f"]({png.name})" in text


def test_the_package_command_dispatches_report_before_lightningcli(tmp_path, capsys):
    from gcpo_lightning.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", str(tmp_path / "missing")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'}: no such file or folder\n"


def test_bad_input_is_one_error_line_and_no_traceback(tmp_path):
    run = tmp_path / "run"
    (run / "version_0").mkdir(parents=True)
    (run / "version_0" / "metrics.csv").write_text("reward,step\n0.5,0\n0.5\n")
    done = subprocess.run(
        [sys.executable, "-m", "gcpo_lightning.reporting", str(run)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"error: {run / 'version_0' / 'metrics.csv'}, line 3: 1 fields where the header has 2\n"


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "{run}: no metrics.csv (searched {run}/metrics.csv and {run}/**/version_*/metrics.csv)"),
        ({"metrics.csv": ""}, "{run}/metrics.csv: empty file (no header line)"),
        ({"version_0/metrics.csv": "reward,step\nx,0\n"}, "{run}/version_0/metrics.csv, line 2: column 'reward'"),
    ],
    ids=["no-metrics", "empty", "malformed"],
)
def test_error_cases_exit_non_zero_naming_the_place(tmp_path, capsys, layout, message):
    run = tmp_path / "run"
    run.mkdir()
    for name, text in layout.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    assert main([str(run), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(run=run)) and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing written for a bad input


def test_a_run_without_step_times_gets_step_plots_only(tmp_path):
    run = tmp_path / "plain"
    run.mkdir()
    (run / "metrics.csv").write_text("reward,step\n0.25,0\n0.5,1\n")
    assert main([str(run)]) == 0
    assert sorted(p.name for p in (run / "report").iterdir()) == ["report.md", "reward_vs_step.png"]
    text = (run / "report" / "report.md").read_text()
    assert "| training time | n/a |" in text and "| reward, final step | 0.500 (step 2) |" in text
    assert "## Time per step" not in text
