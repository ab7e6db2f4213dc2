"""Which ``metrics.csv`` files a RUN_DIR names, and the label each run is drawn and listed under.

A RUN_DIR is a logger version folder holding ``metrics.csv`` (``runs/gcpo/version_0``), any folder above such
folders (``runs/gcpo``: every ``**/version_*/metrics.csv`` below it is one run), or a ``metrics.csv`` file itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gcpo_lightning.reporting.csvfile import ReportError

METRICS_FILE = "metrics.csv"
VERSION_GLOB = f"**/version_*/{METRICS_FILE}"


@dataclass(frozen=True)
class RunSource:
    """One run to report: its ``metrics.csv`` and the label that names it in plots and tables."""

    metrics: Path
    label: str


def find_metrics(run_dir: Path) -> list[Path]:
    """The ``metrics.csv`` files of ``run_dir``, sorted; raise :class:`ReportError` naming what was searched."""
    if not run_dir.exists():
        raise ReportError(f"{run_dir}: no such file or folder")
    if run_dir.is_file():
        return [run_dir]
    if (run_dir / METRICS_FILE).is_file():
        return [run_dir / METRICS_FILE]
    found = sorted(p for p in run_dir.glob(VERSION_GLOB) if p.is_file())
    if not found:
        raise ReportError(
            f"{run_dir}: no {METRICS_FILE} (searched {run_dir / METRICS_FILE} and {run_dir / VERSION_GLOB}); "
            "is it the logger's save_dir, or a folder that CSVLogger wrote?"
        )
    return found


def label_for(metrics: Path, run_dir: Path) -> str:
    """The run's folder as the user would name it: relative to ``run_dir``'s parent, never a bare ``version_N``.

    ``runs/gcpo`` with ``version_0/metrics.csv`` gives ``gcpo/version_0``; so does ``runs/gcpo/version_0``.
    """
    folder = metrics.parent.resolve()
    base = run_dir.resolve()
    base = base.parent if base.is_dir() else base.parent.parent
    try:
        label = folder.relative_to(base).as_posix()
    except ValueError:  # a symlink outside the folder
        label = folder.name
    if label.startswith("version_") and "/" not in label:
        label = f"{folder.parent.name}/{label}"
    return label


def discover(run_dirs: list[Path]) -> list[RunSource]:
    """Every run the RUN_DIRs hold, in the order given, each file once, labels made unique (``name (2)``)."""
    sources: list[RunSource] = []
    seen: set[Path] = set()
    for run_dir in run_dirs:
        for metrics in find_metrics(run_dir):
            if metrics.resolve() not in seen:
                seen.add(metrics.resolve())
                sources.append(RunSource(metrics, unique(label_for(metrics, run_dir), sources)))
    return sources


def unique(label: str, taken: list[RunSource]) -> str:
    """``label``, or ``label (n)`` with the smallest ``n`` that no earlier run uses."""
    labels = {source.label for source in taken}
    candidate, n = label, 1
    while candidate in labels:
        n += 1
        candidate = f"{label} ({n})"
    return candidate


def default_out(run_dirs: Sequence[Path]) -> Path:
    """``report/`` in the folder all RUN_DIRs lie in (the RUN_DIR itself when there is one folder)."""
    folders = [d if d.is_dir() else d.parent for d in run_dirs]
    return Path(os.path.commonpath([f.resolve() for f in folders])) / "report"
