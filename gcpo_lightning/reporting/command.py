"""The command line: ``python -m gcpo_lightning report RUN_DIR [RUN_DIR ...] [--out DIR]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gcpo_lightning.reporting.csvfile import ReportError, read_rows
from gcpo_lightning.reporting.discovery import RunSource, default_out, discover
from gcpo_lightning.reporting.markdown import render
from gcpo_lightning.reporting.plots import write_plots
from gcpo_lightning.reporting.runs import Run, build_run
from gcpo_lightning.reporting.settings import components
from gcpo_lightning.reporting.summary import summarize

REPORT_FILE = "report.md"

DESCRIPTION = """\
Plots and a markdown summary of one or several training runs, read from the metrics.csv that Lightning's
CSVLogger wrote (the shipped configs log there): reward, held-out accuracy, KL (to the reference and causal),
causal weights, clip ratios and the time of each phase, each against the training step and against training
time, one line per run. report.md holds, per run, the held-out accuracy before training, final and best, the
final reward, the mean step time and its split by phase, the training time and the number of steps, and embeds
the plots. Metrics a run did not log (a GRPO run has no causal ones) are left out.

Training time: metrics.csv holds no timestamps, so the clock at step n is the sum of the logged timing/step
values of steps 1..n; validation, model loading and checkpointing are not in it."""

EPILOG = """\
examples:
  python -m gcpo_lightning report runs/gcpo                       every runs/gcpo/version_*: runs/gcpo/report/
  python -m gcpo_lightning report runs/gcpo runs/grpo --out cmp   GCPO against GRPO on the same axes"""


def parser() -> argparse.ArgumentParser:
    """The ``report`` arguments, with the help text ``--help`` prints."""
    p = argparse.ArgumentParser(
        prog="python -m gcpo_lightning report",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run_dirs",
        metavar="RUN_DIR",
        nargs="+",
        type=Path,
        help="a folder holding metrics.csv (runs/gcpo/version_0), a folder above such version_* folders "
        "(runs/gcpo: each one is a run), or a metrics.csv file",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=None,
        help="the folder to write report.md and the PNGs into (default: a 'report' folder in the RUN_DIR, or in "
        "the folder the RUN_DIRs share)",
    )
    return p


def load(source: RunSource) -> Run:
    """The run in ``source``'s metrics.csv (a :class:`ReportError` if it is empty or malformed)."""
    return build_run(source.label, source.metrics, read_rows(source.metrics), components(source.metrics))


def make_out(out: Path) -> None:
    """Create the output folder (a :class:`ReportError` naming it if that fails)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"--out {out}: cannot create the folder ({err.strerror or err})") from err


def report(run_dirs: Sequence[Path], out: Path | None = None) -> Path:
    """Write the report of the runs in ``run_dirs`` into ``out``; the path of ``report.md``."""
    runs = [load(source) for source in discover(list(run_dirs))]
    out = out if out is not None else default_out(run_dirs)
    make_out(out)
    target = out / REPORT_FILE
    try:
        plots = write_plots(runs, out)
        target.write_text(render([summarize(run) for run in runs], plots, out), encoding="utf-8")
    except OSError as err:
        raise ReportError(f"--out {out}: cannot write the report ({err.strerror or err}: {err.filename})") from err
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; a bad RUN_DIR, metrics.csv or --out prints one ``error:`` line and returns 1."""
    args = parser().parse_args(argv)
    try:
        target = report(args.run_dirs, args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"report written to {target}")
    return 0
