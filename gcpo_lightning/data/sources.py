"""Where prompt rows are read from: one split of a Hub dataset or of local JSON/JSONL/CSV/Parquet files.

A local file that is missing or does not parse is a :class:`DataError` naming the file (and, for JSON, the
1-based line of the first bad line), raised before any model is loaded.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DataFiles = str | list[str] | dict[str, str | list[str]]
"""``data_files`` as ``datasets.load_dataset`` takes them: one file, a list, or ``{split: files}``."""

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
"""The ``datasets`` builder for a local file, by suffix."""

MAX_REASON = 300
"""Characters of a reader's own error message kept in a :class:`DataError`."""


class DataError(ValueError):
    """A data file or row is missing or malformed; the message names the source and the row (or line)."""


def one_line(text: object, limit: int = MAX_REASON) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def json_error(path: str | Path) -> str | None:
    """Where and why a local JSON or JSON Lines file does not parse (``"line N: ..."``), or ``None`` when it does.

    A ``.jsonl`` file, or one whose first non-blank line is a complete JSON value or whose first two non-blank
    lines both open an object, is read as JSON Lines (blank lines are allowed, as ``datasets`` allows them); any
    other file as one JSON document (an array of objects or a mapping). Lines are counted from 1, blank ones
    included.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_number = raw.count(b"\n", 0, err.start) + 1
        return f"line {line_number}: not UTF-8 text (byte {err.start})"
    lines = text.split("\n")  # physical lines, as editors count them (not str.splitlines)
    filled = [line.strip() for line in lines if line.strip()]
    if not filled:
        return "line 1: the file is empty"
    jsonl = Path(path).suffix.lower() == ".jsonl" or (len(filled) > 1 and all(x[0] == "{" for x in filled[:2]))
    if not jsonl:
        try:
            json.loads(filled[0])
            jsonl = True
        except json.JSONDecodeError:
            pass
    if not jsonl:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            return f"line {err.lineno}: not valid JSON: {err.msg} (column {err.colno})"
        if not isinstance(doc, list | dict):
            return f"line 1: expected an array of objects or a mapping, got a JSON {type(doc).__name__}"
        return None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number}: not valid JSON: {err.msg} (column {err.colno})"
        if not isinstance(value, dict):
            return f"line {number}: expected a JSON object, got {type(value).__name__}: {one_line(line, 80)}"
    return None


def _patterns(data_files: DataFiles | None) -> Iterator[str]:
    """Every file or pattern in ``data_files``, in order."""
    if data_files is None:
        return
    groups = data_files.values() if isinstance(data_files, dict) else [data_files]
    for group in groups:
        yield from [group] if isinstance(group, str) else group


def _is_remote(pattern: str) -> bool:
    return "://" in pattern


@dataclass(frozen=True)
class Source:
    """One split of one dataset, read with ``datasets.load_dataset(path, config_name, data_files=..., split=...)``.

    Args:
        path: a Hub dataset name or a builder name (``json``, ``parquet``, ``csv``).
        data_files: local files for the builder.
        split: the split to read.
        config_name: the dataset's configuration (e.g. ``main`` for ``openai/gsm8k``).
    """

    path: str
    data_files: DataFiles | None = None
    split: str = "train"
    config_name: str | None = None

    @classmethod
    def make(cls, path: str, data_files: DataFiles | None, split: str, config_name: str | None = None) -> Source:
        """A source where ``path`` may also be a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file.

        Files given as one path or a list land in ``datasets``' ``train`` split, so that split is read.
        """
        suffix = Path(path).suffix.lower()
        if data_files is None and suffix in FILE_BUILDERS:
            path, data_files = FILE_BUILDERS[suffix], path
        if isinstance(data_files, str | list):
            split = "train"
        return cls(path, data_files, split, config_name)

    @property
    def label(self) -> str:
        """How errors name this source: the files, or the dataset and split."""
        return f"{self.path}:{self.data_files or self.split}"

    @property
    def reads_local_files(self) -> bool:
        """Whether ``data_files`` are local paths read by a file builder (not files inside a Hub dataset)."""
        return self.data_files is not None and self.path in set(FILE_BUILDERS.values())

    def local_files(self) -> list[str]:
        """The local files of ``data_files`` (patterns expanded); a path that names nothing is a :class:`DataError`."""
        if not self.reads_local_files:
            return []
        files: list[str] = []
        for pattern in _patterns(self.data_files):
            if _is_remote(pattern):
                continue
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
                if not matches:
                    raise DataError(f"data file pattern {pattern!r}: matches no file")
                files.extend(matches)
            elif not Path(pattern).expanduser().is_file():
                what = "a folder, not a file" if Path(pattern).expanduser().is_dir() else "no such file"
                raise DataError(f"data file {pattern!r}: {what}")
            elif Path(pattern).expanduser().stat().st_size == 0:
                raise DataError(f"data file {pattern!r}: the file is empty")
            else:
                files.append(pattern)
        return files

    def load(self) -> Any:
        """The ``datasets.Dataset`` of this split; a local file that does not parse is a :class:`DataError`."""
        import datasets
        from datasets.exceptions import DatasetGenerationError

        files = self.local_files()
        try:
            return datasets.load_dataset(self.path, self.config_name, data_files=self.data_files, split=self.split)
        except DatasetGenerationError as err:
            raise DataError(self.explain(err, files)) from err

    def explain(self, err: BaseException, files: list[str]) -> str:
        """One line naming the file (and line) ``datasets`` could not read, from the files themselves when JSON."""
        if self.path == "json":
            for file in files:
                where = json_error(file)
                if where is not None:
                    return f"{file} {where}"
        cause = err if type(err).__name__ == "DatasetGenerationCastError" else (err.__cause__ or err)
        name = files[0] if len(files) == 1 else self.label
        return f"{name}: could not be read as {self.path}: {type(cause).__name__}: {one_line(cause)}"
