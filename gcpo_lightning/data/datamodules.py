"""Prompt data modules: the embedded arithmetic task, generated word problems, and prompts read with ``datasets``.

Every row is a dict with a ``prompt`` string (the question already put in its template) plus any other
columns the reward functions read (e.g. ``answer``). Rows are checked when the data is set up, before any
model is loaded, and a bad row is named by its source and index.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from gcpo_lightning.data.loader import ResumableLoader
from gcpo_lightning.data.presets import Preset, PresetName, get_preset
from gcpo_lightning.data.sources import DataError, DataFiles, Source
from gcpo_lightning.data.tasks.arithmetic import ArithmeticTask, solve
from gcpo_lightning.data.tasks.word_problems import WORD_PROBLEM_TEMPLATE, WordProblemTask
from gcpo_lightning.data.tasks.word_problems import rows as word_problem_rows
from gcpo_lightning.data.templates import PROMPT_TEMPLATE
from gcpo_lightning.policy.loading import load_tokenizer

Row = dict[str, Any]
log = logging.getLogger(__name__)


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
        self.test_rows: list[Row] = []

    def load_rows(self) -> tuple[list[Row], list[Row]]:
        """``(train_rows, val_rows)``; implemented by subclasses."""
        raise NotImplementedError

    def load_test_rows(self) -> list[Row]:
        """Rows of a separate test split; ``[]`` (the default) means the validation rows are used."""
        return []

    def setup(self, stage: str | None = None) -> None:
        """Load and validate the rows once (the test rows when testing)."""
        if not self.train_rows:
            self.train_rows, self.val_rows = self.load_rows()
        if stage in (None, "test") and not self.test_rows:
            self.test_rows = self.load_test_rows()

    def train_dataloader(self) -> DataLoader:
        """Shuffled prompts, ``batch_size`` per step and rank (each becomes a group of ``num_generations``).

        The order is fixed by ``(seed, epoch)`` and the position is saved in checkpoints (exact resume).
        """
        return ResumableLoader(
            self.train_rows, batch_size=self.batch_size, shuffle=True, seed=self.seed, collate_fn=collate_rows
        )

    def val_dataloader(self) -> DataLoader:
        """Held-out prompts in a fixed order."""
        return DataLoader(
            self.val_rows,  # type: ignore[arg-type]  # torch's stub wants a Dataset; a list works
            batch_size=self.val_batch_size,
            collate_fn=collate_rows,
        )

    def test_dataloader(self) -> DataLoader:
        """The test rows in a fixed order, or the held-out prompts again when there is no separate test split."""
        if not self.test_rows:
            return self.val_dataloader()
        return DataLoader(
            self.test_rows,  # type: ignore[arg-type]  # torch's stub wants a Dataset; a list works
            batch_size=self.val_batch_size,
            collate_fn=collate_rows,
        )


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


class WordProblemDataModule(RowsDataModule):
    """Generated GSM8K-style word problems (1-3 arithmetic steps, integer answers): no file, no download.

    Rows hold ``prompt``, ``question``, ``answer`` (the integer, as text) and ``solution`` (GSM8K format, ending
    with ``#### <answer>``). The held-out problems depend only on ``heldout_seed``, so runs with different
    ``seed`` share them; they never share a template and its numbers with a training problem
    (:mod:`gcpo_lightning.data.tasks.word_problems`).

    Args:
        num_train: distinct training problems generated.
        num_val: held-out problems used for validation (and test).
        min_steps: fewest arithmetic steps in a problem (1-3).
        max_steps: most arithmetic steps in a problem (1-3).
        prompt_template: how a question becomes the user message (``{question}`` placeholder).
        batch_size: prompts per training step.
        val_batch_size: prompts per validation batch.
        seed: seeds the training problems and shuffling.
        heldout_seed: seeds the held-out problems.
    """

    def __init__(
        self,
        num_train: int = 5000,
        num_val: int = 100,
        min_steps: int = 1,
        max_steps: int = 3,
        prompt_template: str = WORD_PROBLEM_TEMPLATE,
        batch_size: int = 16,
        val_batch_size: int = 100,
        seed: int = 0,
        heldout_seed: int = 1234,
    ) -> None:
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, seed=seed)
        if "{question}" not in prompt_template:
            raise ValueError(f"WordProblemDataModule: prompt_template must contain '{{question}}': {prompt_template!r}")
        self.task = WordProblemTask(min_steps=min_steps, max_steps=max_steps)
        self.num_train, self.num_val = num_train, num_val
        self.prompt_template = prompt_template
        self.heldout_seed = heldout_seed

    def load_rows(self) -> tuple[list[Row], list[Row]]:
        """Generate the training and held-out problems."""
        train = word_problem_rows(self.task.generate(self.num_train, self.seed, "train"), self.prompt_template)
        val = word_problem_rows(self.task.generate(self.num_val, self.heldout_seed, "heldout"), self.prompt_template)
        return validate_rows(train, "word problems train"), validate_rows(val, "word problems held-out")


class HFPromptDataModule(RowsDataModule):
    """Prompts and reference answers read with ``datasets.load_dataset``: a Hub name, or local JSON/JSONL/CSV/Parquet.

    Each row holds ``prompt`` (the user message: the question in ``prompt_template``; the model applies its chat
    template and system prompt), ``question`` (the raw question) and the mapped and derived columns the rewards
    read. A ``preset`` (a :class:`~gcpo_lightning.data.presets.Preset`, or a built-in's name: ``gsm8k``, ``math``,
    ``humaneval``; see :mod:`gcpo_lightning.data.presets`) sets the defaults of ``prompt_column``, ``prompt_template``
    and ``columns`` and derives the answer; explicit arguments override it.

    Validation rows come from ``val_data_files``, else from ``val_path``/``val_split``, else ``val_size`` rows
    are split off the training rows. Test rows come from ``test_data_files`` or ``test_path``/``test_split``,
    else the validation rows are used. A split given by files or split name alone reuses ``path`` (and its
    ``config_name``).

    Args:
        path: a Hub dataset name, a builder name (``json``, ``parquet``, ``csv``) used with ``data_files``, or one
            local ``.json``/``.jsonl``/``.parquet``/``.csv`` file.
        data_files: local files for the training split (a path, a list, or ``{split: files}``).
        val_data_files: local files for the validation split.
        train_split: split name for training when ``path`` is a Hub dataset (or ``data_files`` a mapping).
        prompt_column: the column holding the question text (default: the preset's, else ``question``).
        prompt_template: how the question becomes the user message (``{question}`` placeholder; write literal
            braces as ``{{}}``); default: the preset's, else the question as is.
        columns: columns passed to the reward functions, as ``{name_in_rows: name_in_dataset}``; merged over the
            preset's mapping. Without a preset the default is ``{answer: answer}``.
        val_size: rows split off the training rows when there is no validation source.
        batch_size: prompts per training step.
        val_batch_size: prompts per validation (and test) batch.
        seed: seeds the shuffling of training and validation rows (and the training dataloader).
        preset: dataset format: a built-in's name (``gsm8k``, ``math``, ``humaneval``) or a
            :class:`~gcpo_lightning.data.presets.Preset` (in YAML: ``class_path``/``init_args``, e.g. a subclass
            that overrides ``derive``); ``None`` reads plain question/answer rows.
        config_name: the dataset configuration (e.g. ``main`` for ``openai/gsm8k``).
        val_path: dataset of the validation split (default: ``path``), e.g. ``HuggingFaceH4/MATH-500``.
        val_split: split of ``val_path`` used for validation.
        test_path: dataset of the test split (default: ``path``).
        test_split: split of ``test_path`` used by ``trainer.test``.
        test_data_files: local files for the test split.
        max_train_rows: keep at most this many training rows (after shuffling and filtering).
        max_val_rows: keep at most this many validation rows (after shuffling and filtering).
        max_prompt_chars: drop rows whose ``prompt`` has more characters (a tokenizer-free length filter).
        max_prompt_tokens: drop rows whose ``prompt`` has more tokens of ``tokenizer`` (counted before the chat
            template, which adds a fixed number of tokens).
        tokenizer: name or path of the tokenizer for ``max_prompt_tokens`` (as ``model_name_or_path``).
        shuffle: shuffle training and validation rows with ``seed`` before ``max_*_rows`` are taken.
        skip_bad_rows: drop rows without a usable answer (e.g. a GSM8K solution without ``####``, a MATH solution
            without ``\\boxed{}`` such as a proof) instead of raising; the count is logged. Missing columns are
            always an error.
    """

    def __init__(
        self,
        path: str = "json",
        data_files: DataFiles | None = None,
        val_data_files: DataFiles | None = None,
        train_split: str = "train",
        prompt_column: str | None = None,
        prompt_template: str | None = None,
        columns: dict[str, str] | None = None,
        val_size: int = 100,
        batch_size: int = 16,
        val_batch_size: int = 100,
        seed: int = 0,
        preset: Preset | PresetName | None = None,
        config_name: str | None = None,
        val_path: str | None = None,
        val_split: str | None = None,
        test_path: str | None = None,
        test_split: str | None = None,
        test_data_files: DataFiles | None = None,
        max_train_rows: int | None = None,
        max_val_rows: int | None = None,
        max_prompt_chars: int | None = None,
        max_prompt_tokens: int | None = None,
        tokenizer: str | None = None,
        shuffle: bool = True,
        skip_bad_rows: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, seed=seed)
        fmt = get_preset(preset)
        self.preset = preset
        self.prompt_column = prompt_column or fmt.prompt_column
        self.prompt_template = self._template(prompt_template, preset, fmt.prompt_template)
        self.columns = {**fmt.columns, **(columns or {})} if preset is not None else dict(columns or fmt.columns)
        self.optional_columns = {k: v for k, v in fmt.optional_columns.items() if k not in self.columns}
        self.derive = fmt.derive
        self.train_source = Source.make(path, data_files, train_split, config_name)
        self.val_source = self._split_source(path, data_files, config_name, val_path, val_data_files, val_split)
        self.test_source = self._split_source(path, data_files, config_name, test_path, test_data_files, test_split)
        self.val_size, self.max_train_rows, self.max_val_rows = val_size, max_train_rows, max_val_rows
        self.max_prompt_chars, self.max_prompt_tokens, self.tokenizer = max_prompt_chars, max_prompt_tokens, tokenizer
        self.shuffle, self.skip_bad_rows = shuffle, skip_bad_rows
        self.dropped: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self._tokenizer: Any = None
        self._check_settings()

    @staticmethod
    def _template(given: str | None, preset: Preset | str | None, preset_template: str) -> str:
        """``given``, else the preset's template.

        With a preset, the embedded task's template counts as not given: the CLI's default data module is
        :class:`ArithmeticDataModule`, and jsonargparse keeps its ``prompt_template`` when ``--data`` names this class.
        """
        if given is None or (preset is not None and given == PROMPT_TEMPLATE):
            return preset_template
        return given

    @staticmethod
    def _split_source(
        path: str,
        data_files: DataFiles | None,
        config_name: str | None,
        split_path: str | None,
        split_files: DataFiles | None,
        split: str | None,
    ) -> Source | None:
        """The source of a validation or test split, or ``None`` when none is given."""
        if split_files is not None:
            return Source.make(split_path or Source.make(path, data_files, "train").path, split_files, split or "train")
        if split_path is not None:
            return Source.make(split_path, None, split or "train")
        if split is not None:
            return Source.make(path, data_files, split, config_name)
        return None

    def _check_settings(self) -> None:
        """Raise a ``ValueError`` naming every bad setting (before anything is read)."""
        errors = []
        if "{question}" not in self.prompt_template:
            errors.append(f"prompt_template must contain '{{question}}': {self.prompt_template!r}")
        for name in ("max_train_rows", "max_val_rows", "max_prompt_chars", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"{name} must be >= 1 or null, got {value}")
        if self.val_size < 0:
            errors.append(f"val_size must be >= 0, got {self.val_size}")
        if self.val_source == self.train_source:
            errors.append(
                f"the validation split is the training split ({self.train_source.label}); give val_path, "
                "val_data_files, a val_split of a dataset that has it, or nothing (val_size rows split off)"
            )
        if self.max_prompt_tokens is not None and self.tokenizer is None:
            errors.append("max_prompt_tokens needs a tokenizer (name or path, like model_name_or_path)")
        if errors:
            raise ValueError("HFPromptDataModule: " + "; ".join(errors))

    # ----- one row -----------------------------------------------------------------------------------------------

    def _row(self, raw: Row, source: str, index: int) -> Row | None:
        """Map one dataset row to a prompt row; a missing column or an unusable row is a :class:`DataError`.

        Returns ``None`` for a row without a usable answer when ``skip_bad_rows`` is set.
        """
        missing = [c for c in [self.prompt_column, *self.columns.values()] if raw.get(c) is None]
        if missing:
            raise DataError(
                f"{source} row {index}: no value in column(s) {missing}; the row has "
                f"{sorted(k for k, v in raw.items() if v is not None)}"
            )
        question = raw[self.prompt_column]
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{source} row {index}: column {self.prompt_column!r} is empty or not text: {question!r}")
        row = {name: raw[col] for name, col in self.columns.items()}
        row.update({name: raw[col] for name, col in self.optional_columns.items() if raw.get(col) is not None})
        row.setdefault("question", question)
        try:
            row.update(self.derive(row))
        except ValueError as err:
            if self.skip_bad_rows:
                return None
            raise DataError(f"{source} row {index}: {err}") from err
        row["prompt"] = self.prompt_template.format(question=question)
        return row

    def _too_long(self, row: Row) -> bool:
        """Whether the row's prompt is over ``max_prompt_chars`` or ``max_prompt_tokens``."""
        prompt = row["prompt"]
        if self.max_prompt_chars is not None and len(prompt) > self.max_prompt_chars:
            return True
        if self.max_prompt_tokens is None:
            return False
        if self._tokenizer is None:
            if self.tokenizer is None:  # _check_settings refuses this; set after construction
                raise ValueError(
                    "HFPromptDataModule: max_prompt_tokens needs a tokenizer (name or path, like model_name_or_path)"
                )
            self._tokenizer = load_tokenizer(self.tokenizer, setting="tokenizer")
        return len(self._tokenizer(prompt, add_special_tokens=False)["input_ids"]) > self.max_prompt_tokens

    # ----- one split ---------------------------------------------------------------------------------------------

    def _read(self, source: Source, limit: int | None, shuffle: bool) -> list[Row]:
        """Rows of ``source`` in seeded random (or file) order, too-long prompts dropped, at most ``limit``.

        Rows are mapped lazily: with a ``limit``, rows after the last one kept are not read.
        """
        ds = source.load()
        order = list(range(len(ds)))
        if shuffle:
            random.Random(self.seed).shuffle(order)
        rows: list[Row] = []
        skipped = dropped = 0
        for index in order:
            if limit is not None and len(rows) >= limit:
                break
            row = self._row(ds[index], source.label, index)
            if row is None:
                skipped += 1
            elif self._too_long(row):
                dropped += 1
            else:
                rows.append(row)
        self._report(source.label, len(rows) + skipped + dropped, skipped, dropped)
        return rows

    def _report(self, label: str, read: int, skipped: int, dropped: int) -> None:
        """Count and log the rows left out of one split."""
        self.skipped[label] = self.skipped.get(label, 0) + skipped
        self.dropped[label] = self.dropped.get(label, 0) + dropped
        if skipped:
            log.warning("%s: skipped %d of %d rows read that have no usable answer", label, skipped, read)
        if dropped:
            log.warning(
                "%s: dropped %d of %d rows read whose prompt is longer than max_prompt_chars=%s / max_prompt_tokens=%s",
                label,
                dropped,
                read,
                self.max_prompt_chars,
                self.max_prompt_tokens,
            )

    def load_rows(self) -> tuple[list[Row], list[Row]]:
        """Training and validation rows: mapped, validated, filtered, shuffled and capped."""
        source = self.train_source
        if self.val_source is not None:
            train = self._read(source, self.max_train_rows, self.shuffle)
            val = self._read(self.val_source, self.max_val_rows, self.shuffle)
            val_label = self.val_source.label
        else:
            limit = None if self.max_train_rows is None else self.max_train_rows + self.val_size
            train = self._read(source, limit, shuffle=True)  # always shuffled: the held-out rows are a random sample
            val, train = train[: self.val_size], train[self.val_size :]
            val, val_label = val[: self.max_val_rows], f"{source.label} (validation)"
        return validate_rows(train, source.label), validate_rows(val, val_label)

    def load_test_rows(self) -> list[Row]:
        """The test split in file order, when one is given (else ``[]``: the validation rows are used)."""
        if self.test_source is None:
            return []
        return validate_rows(self._read(self.test_source, None, shuffle=False), self.test_source.label)
