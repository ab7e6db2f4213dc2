"""``gcpo_lightning.reporting``: which metrics.csv files a RUN_DIR holds, their labels, the run's components."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gcpo_lightning.reporting.csvfile import ReportError
from gcpo_lightning.reporting.discovery import default_out, discover, find_metrics
from gcpo_lightning.reporting.settings import components


def touch(path: Path, text: str = "step\n0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_logger_folder_holds_one_run_per_version(tmp_path):
    first, second = touch(tmp_path / "gcpo/version_0/metrics.csv"), touch(tmp_path / "gcpo/version_1/metrics.csv")
    assert find_metrics(tmp_path / "gcpo") == [first, second]
    assert find_metrics(tmp_path) == [first, second]  # **/version_*: any depth
    assert find_metrics(tmp_path / "gcpo/version_1") == [second]
    assert find_metrics(second) == [second]  # the file itself


def test_labels_name_the_folder_never_a_bare_version(tmp_path):
    touch(tmp_path / "runs/gcpo/version_0/metrics.csv")
    touch(tmp_path / "runs/grpo/version_0/metrics.csv")
    touch(tmp_path / "plain/metrics.csv")
    runs = tmp_path / "runs"
    labels = [s.label for s in discover([runs / "gcpo", runs / "grpo/version_0", tmp_path / "plain"])]
    assert labels == ["gcpo/version_0", "grpo/version_0", "plain"]
    assert [s.label for s in discover([runs])] == ["runs/gcpo/version_0", "runs/grpo/version_0"]


def test_a_file_named_twice_is_one_run_and_equal_labels_are_numbered(tmp_path):
    touch(tmp_path / "a/gcpo/version_0/metrics.csv")
    touch(tmp_path / "b/gcpo/version_0/metrics.csv")
    gcpo = tmp_path / "a/gcpo"
    assert len(discover([gcpo, gcpo / "version_0"])) == 1
    labels = [s.label for s in discover([gcpo / "version_0", tmp_path / "b/gcpo/version_0"])]
    assert labels == ["gcpo/version_0", "gcpo/version_0 (2)"]


def test_missing_folder_and_folder_without_metrics_say_what_was_searched(tmp_path):
    with pytest.raises(ReportError, match=f"^{re.escape(str(tmp_path / 'nope'))}: no such file or folder$"):
        find_metrics(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError) as err:
        find_metrics(tmp_path / "empty")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'empty'}: no metrics.csv (searched ")
    assert f"{tmp_path / 'empty' / 'metrics.csv'} and {tmp_path / 'empty' / '**/version_*/metrics.csv'}" in message


def test_the_report_goes_into_the_run_dir_or_the_folder_the_run_dirs_share(tmp_path):
    gcpo, grpo = touch(tmp_path / "runs/gcpo/version_0/metrics.csv"), touch(tmp_path / "runs/grpo/metrics.csv")
    runs = (tmp_path / "runs").resolve()
    assert default_out([runs / "gcpo"]) == runs / "gcpo/report"
    assert default_out([gcpo]) == runs / "gcpo/version_0/report"  # a metrics.csv named itself: its folder
    assert default_out([runs / "gcpo", grpo.parent]) == runs / "report"


def test_components_come_from_the_saved_config(tmp_path):
    metrics = touch(tmp_path / "metrics.csv")
    assert components(metrics) == {}  # no config.yaml: reported without
    (tmp_path / "config.yaml").write_text(
        "model:\n  graph_builder:\n    class_path: gcpo_lightning.ColliderGraphBuilder\n"
        "  adjuster:\n    class_path: gcpo_lightning.CausalAdvantage\n    init_args: {alpha: 2.0}\n"
        "  loss: SequenceMean\n"
    )
    assert components(metrics) == {
        "graph_builder": "ColliderGraphBuilder",
        "adjuster": "CausalAdvantage",
        "loss": "SequenceMean",
    }
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    assert components(metrics) == {}  # an unreadable config is optional information, not an error
