"""Where prompt rows are read from: one split of a Hub dataset or of local JSON/JSONL/CSV/Parquet files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DataFiles = str | list[str] | dict[str, str | list[str]]
"""``data_files`` as ``datasets.load_dataset`` takes them: one file, a list, or ``{split: files}``."""

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
"""The ``datasets`` builder for a local file, by suffix."""


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

    def load(self) -> Any:
        """The ``datasets.Dataset`` of this split."""
        import datasets

        return datasets.load_dataset(self.path, self.config_name, data_files=self.data_files, split=self.split)
