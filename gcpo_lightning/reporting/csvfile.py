"""A Lightning ``CSVLogger`` ``metrics.csv`` read into checked rows.

The file has one header line naming every metric ever logged, then one line per ``log_metrics`` call: a
``step`` column and the values logged in that call, the other cells empty. Validation rows sit between the
training rows, in the order they were logged. Any deviation from that shape is a :class:`ReportError` naming the
file and the line.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

STEP = "step"
"""The column Lightning writes the logger step into (the training batch index, from 0)."""

BOOKKEEPING = frozenset({STEP, "epoch"})
"""Columns that are not metrics."""


class ReportError(ValueError):
    """Input the report cannot use; the message names what is wrong and where (file, line)."""


@dataclass(frozen=True)
class Row:
    """One line of ``metrics.csv``: its line number, the logger step and the metrics that have a value."""

    line: int
    step: int
    values: dict[str, float]


def read_rows(path: Path) -> list[Row]:
    """Every data row of ``path`` in file order; raise :class:`ReportError` for an empty or malformed file."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return parse_rows(handle, path)
    except UnicodeDecodeError as err:
        raise ReportError(f"{path}: not UTF-8 text (byte {err.start}), so not a CSVLogger metrics.csv") from err
    except csv.Error as err:
        raise ReportError(f"{path}: not a readable CSV file ({err})") from err
    except OSError as err:
        raise ReportError(f"{path}: cannot be read ({err.strerror or err})") from err


def parse_rows(lines: Iterable[str], path: Path) -> list[Row]:
    """The rows of the CSV text ``lines`` read from ``path`` (named in the errors)."""
    reader = csv.reader(lines)
    header = next(reader, None)
    if not header or not any(cell.strip() for cell in header):
        raise ReportError(f"{path}: empty file (no header line), so no metrics to report")
    if STEP not in header:
        raise ReportError(f"{path}, line 1: no {STEP!r} column in the header, so not a Lightning CSVLogger file")
    rows = []
    for cells in reader:
        try:
            if cells:  # a blank line carries nothing
                rows.append(parse_row(header, cells, reader.line_num))
        except ReportError as err:
            raise ReportError(f"{path}, line {reader.line_num}: {err}") from None
    if not rows:
        raise ReportError(f"{path}: a header but no rows, so the run logged no step")
    return rows


def parse_row(header: list[str], cells: list[str], line: int) -> Row:
    """One data line: as many cells as the header, numbers or empty, an integer ``step``."""
    if len(cells) != len(header):
        raise ReportError(f"{len(cells)} fields where the header has {len(header)}")
    cell = cells[header.index(STEP)]
    step = number(STEP, cell) if cell.strip() else math.nan
    if not math.isfinite(step) or step != int(step) or step < 0:
        raise ReportError(f"the {STEP!r} column holds {cell!r}, not a step number")
    values = {name: number(name, c) for name, c in zip(header, cells) if c.strip() and name not in BOOKKEEPING}
    return Row(line=line, step=int(step), values=values)


def number(name: str, cell: str) -> float:
    """The cell as a float (``nan`` and ``inf`` as Lightning writes them are numbers)."""
    try:
        return float(cell)
    except ValueError:
        raise ReportError(f"column {name!r} holds {cell[:40]!r}, not a number") from None
