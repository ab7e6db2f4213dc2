"""Prompt data modules: the embedded arithmetic task, and prompts from files or the Hub via ``datasets``.

Every row is a dict with a ``prompt`` string (the question already put in its template) plus any other
columns the reward functions read (e.g. ``answer``). Rows are checked when the data is set up, before any
model is loaded, and a bad row is named by its source and index.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from gcpo_lightning.prompts import PROMPT_TEMPLATE
from gcpo_lightning.tasks.arithmetic import ArithmeticTask, solve

Row = dict[str, Any]


class DataError(ValueError):
    """A data row is missing or malformed; the message names the source and the row."""


def validate_rows(rows: list[Row], source: str, required: Iterable[str] = ("prompt",)) -> list[Row]:
    """Check that there are rows and that each has a non-empty string in every ``required`` column."""
    if not rows:
        raise DataError(f"{source}: no rows")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source} row {index}: expected a mapping, got {type(row).__name__}")
        for column in required:
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{source} row {index}: column {column!r} must be a non-empty string, got {value!r}")
    return rows


def collate_rows(rows: list[Row]) -> list[Row]:
    """Batches are plain lists of row dicts (strings are never moved to a device)."""
    return rows


class RowsDataModule(L.LightningDataModule):
    """Serves validated train and validation rows; subclasses only say where the rows come from."""

    def __init__(self, batch_size: int = 16, val_batch_size: int = 100, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, val_batch_size={val_batch_size}")
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.seed = seed
        self.train_rows: list[Row] = []
        self.val_rows: list[Row] = []

    def load_rows(self) -> tuple[list[Row], list[Row]]:
        """``(train_rows, val_rows)``; implemented by subclasses."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load and validate the rows once."""
        if not self.train_rows:
            self.train_rows, self.val_rows = self.load_rows()

    def train_dataloader(self) -> DataLoader:
        """Shuffled prompts, ``batch_size`` per step (each becomes a group of ``num_generations``)."""
        return DataLoader(self.train_rows, batch_size=self.batch_size, shuffle=True, collate_fn=collate_rows,
                          generator=torch.Generator().manual_seed(self.seed), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """Held-out prompts in a fixed order."""
        return DataLoader(self.val_rows, batch_size=self.val_batch_size, collate_fn=collate_rows)

    def test_dataloader(self) -> DataLoader:
        """The held-out prompts again (the embedded task has no separate test split)."""
        return self.val_dataloader()


class ArithmeticDataModule(RowsDataModule):
    """The embedded task: multi-step integer arithmetic generated on the fly, with a disjoint held-out set.

    Args:
        task: the arithmetic task (operand counts and operators).
        num_train: distinct training questions generated (held-out questions are excluded).
        num_val: held-out questions used for validation.
        prompt_template: how a question becomes a prompt (``{question}`` placeholder).
        batch_size: prompts per training step.
        val_batch_size: prompts per validation batch.
        seed: seeds question generation and shuffling.
    """

    def __init__(
        self,
        task: ArithmeticTask | None = None,
        num_train: int = 20000,
        num_val: int = 200,
        prompt_template: str = PROMPT_TEMPLATE,
        batch_size: int = 16,
        val_batch_size: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, seed=seed)
        if "{question}" not in prompt_template:
            raise ValueError(f"ArithmeticDataModule: prompt_template must contain '{{question}}': {prompt_template!r}")
        self.task = task or ArithmeticTask()
        self.num_train = num_train
        self.num_val = num_val
        self.prompt_template = prompt_template

    def _row(self, question: str, answer: str) -> Row:
        return {"prompt": self.prompt_template.format(question=question), "question": question, "answer": answer}

    def load_rows(self) -> tuple[list[Row], list[Row]]:
        """Generate the held-out set, then training questions that never appear in it."""
        heldout = self.task.heldout(self.num_val)
        val = [self._row(q, a) for q, a in heldout]
        seen = {q for q, _ in heldout}
        rng = random.Random(self.seed)
        train = []
        for _ in range(self.num_train):
            q = self.task.sample_question(rng)
            if q not in seen:
                train.append(self._row(q, str(solve(q))))
        return validate_rows(train, "arithmetic train"), validate_rows(val, "arithmetic val")


class HFPromptDataModule(RowsDataModule):
    """Prompts read with ``datasets.load_dataset`` from a Hub name or local JSON/JSONL/CSV/Parquet files.

    Args:
        path: a Hub dataset name, or a builder name (``json``, ``parquet``, ``csv``) used with ``data_files``.
        data_files: local files for the train split (and ``val_data_files`` for validation).
        val_data_files: local files for the validation split; if ``None``, ``val_size`` rows are split off.
        train_split: split name for training when ``path`` is a Hub dataset.
        prompt_column: the column holding the question text.
        prompt_template: how the question becomes a prompt (``{question}`` placeholder).
        columns: extra columns passed to reward functions, as ``{name_in_rows: name_in_dataset}``.
        val_size: rows held out when there is no validation file.
        batch_size: prompts per training step.
        val_batch_size: prompts per validation batch.
        seed: shuffling seed.
    """

    def __init__(
        self,
        path: str = "json",
        data_files: str | list[str] | None = None,
        val_data_files: str | list[str] | None = None,
        train_split: str = "train",
        prompt_column: str = "question",
        prompt_template: str = "{question}",
        columns: dict[str, str] | None = None,
        val_size: int = 100,
        batch_size: int = 16,
        val_batch_size: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, seed=seed)
        if "{question}" not in prompt_template:
            raise ValueError(f"HFPromptDataModule: prompt_template must contain '{{question}}': {prompt_template!r}")
        self.path, self.data_files, self.val_data_files = path, data_files, val_data_files
        self.train_split = train_split
        self.prompt_column = prompt_column
        self.prompt_template = prompt_template
        self.columns = columns or {"answer": "answer"}
        self.val_size = val_size

    def _load(self, files: str | list[str] | None, split: str) -> list[Row]:
        import datasets

        ds = datasets.load_dataset(self.path, data_files=files, split=split)
        return [self._row(raw, f"{self.path}:{files or split}", i) for i, raw in enumerate(ds)]

    def _row(self, raw: Row, source: str, index: int) -> Row:
        missing = [c for c in [self.prompt_column, *self.columns.values()] if raw.get(c) is None]
        if missing:
            raise DataError(f"{source} row {index}: no value in column(s) {missing}; the row has "
                            f"{sorted(k for k, v in raw.items() if v is not None)}")
        question = raw[self.prompt_column]
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{source} row {index}: column {self.prompt_column!r} is empty or not text: {question!r}")
        row = {name: raw[col] for name, col in self.columns.items()}
        row["prompt"] = self.prompt_template.format(question=question)
        row.setdefault("question", question)
        return row

    def load_rows(self) -> tuple[list[Row], list[Row]]:
        """Read, map columns, validate, and split off validation rows if needed."""
        train = self._load(self.data_files, self.train_split)
        source = f"{self.path}:{self.data_files or self.train_split}"
        if self.val_data_files is not None:
            val = self._load(self.val_data_files, "train")
        else:
            rng = random.Random(self.seed)
            rng.shuffle(train)
            val, train = train[: self.val_size], train[self.val_size :]
        return validate_rows(train, source), validate_rows(val, f"{source} (validation)")
