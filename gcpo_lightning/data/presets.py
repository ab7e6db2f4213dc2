"""Presets for common reasoning datasets: which column holds the question, how it is asked, where the answer is.

A preset is a :class:`Preset` (a dataclass): it fills the defaults of
:class:`gcpo_lightning.data.datamodules.HFPromptDataModule` (``prompt_column``, ``prompt_template``, ``columns``) and
its :meth:`Preset.derive` computes further columns from each row (e.g. the final answer of a GSM8K solution).
Explicit arguments of the data module override the preset's defaults.

The built-ins, also selected by name (``preset: gsm8k``):

- :data:`GSM8K` (``gsm8k``): reads ``question``, ``answer`` (a solution ending ``#### 1,234``); rows get
  ``solution`` (the full text) and ``answer`` (``1234``, the text after ``####``).
- :data:`MATH` (``math``): reads ``problem``, ``solution`` and, when present, ``answer`` (MATH-500); rows get
  ``solution`` and ``answer`` (the ``answer`` column, else the content of the last ``\\boxed{...}``, nested braces
  included).
- :data:`HUMANEVAL` (``humaneval``): reads ``prompt`` (signature + docstring), ``test``, ``entry_point``,
  ``task_id``; the row's ``prompt`` is an instruction around the code, ``code_prompt`` the raw code prompt; the
  others pass through.

Every row also has ``question``, the raw question.

A new format needs no change to the package: subclass :class:`Preset`, override :meth:`~Preset.derive`, and name
it in YAML::

    data:
      class_path: gcpo_lightning.HFPromptDataModule
      init_args:
        preset:
          class_path: my_presets.ShortAnswerPreset
          init_args: {prompt_column: query}

The answers are found by the reward side's parsers (:func:`gcpo_lightning.rewards.math_answers.gold_text`), so a
row's ``answer`` is read exactly as :class:`~gcpo_lightning.rewards.math.MathAccuracy` reads a reference solution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from jsonargparse import set_parsing_settings

from gcpo_lightning.data.templates import HUMANEVAL_TEMPLATE, MATH_TEMPLATE
from gcpo_lightning.rewards.math_answers import GoldAnswerError, gold_text, strip_thousands

Row = dict[str, Any]
PresetName = Literal["gsm8k", "math", "humaneval"]
"""The names of the built-in presets (keys of :data:`PRESETS`)."""


def _text(row: Row, column: str) -> str:
    """``row[column]`` when it is a non-empty string; else a ``ValueError`` naming the column."""
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"column {column!r} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class Preset:
    """Defaults for one dataset format; the base class reads plain ``question``/``answer`` rows as they are.

    Subclass it and override :meth:`derive` to compute columns; in YAML give the subclass by ``class_path`` (with
    ``init_args`` overriding its fields).

    Args:
        prompt_column: the dataset column with the question.
        prompt_template: how the question becomes the user message (``{question}`` placeholder).
        columns: columns every row must have, as ``{name_in_rows: name_in_dataset}``.
        optional_columns: columns copied when present, same mapping.
    """

    prompt_column: str = "question"
    prompt_template: str = "{question}"
    columns: dict[str, str] = field(default_factory=lambda: {"answer": "answer"})
    optional_columns: dict[str, str] = field(default_factory=dict)

    def derive(self, row: Row) -> Row:
        """Further row columns computed from the mapped row (here: none).

        Args:
            row: the mapped columns plus ``question``.

        Returns:
            The new columns; they are added to (and override) the row.

        Raises:
            ValueError: for a row without a usable answer (skipped with ``skip_bad_rows``).
        """
        return {}


# jsonargparse reads a dataclass as its fields only; this lets YAML name a subclass by class_path as well.
set_parsing_settings(subclasses_enabled=[Preset])


@dataclass(frozen=True)
class GSM8KPreset(Preset):
    """GSM8K: the ``answer`` column is a worked solution ending ``#### <answer>``."""

    prompt_template: str = MATH_TEMPLATE
    columns: dict[str, str] = field(default_factory=lambda: {"solution": "answer"})

    def derive(self, row: Row) -> Row:
        """``answer``: the text after the last ``####`` of ``solution``, stripped, thousands separators removed.

        ``"#### 1,234"`` gives ``"1234"``; anything else is kept as written (``"12 apples"``).

        Raises:
            ValueError: when there is no ``####`` or nothing after it.
        """
        solution = _text(row, "solution")
        try:
            answer = gold_text(solution, "gsm8k").strip()
        except GoldAnswerError as err:
            raise ValueError(f"the solution has no '#### <answer>' line: ...{solution[-80:]!r}") from err
        if not answer:
            raise ValueError(f"the solution's '####' line is empty: ...{solution[-80:]!r}")
        return {"answer": strip_thousands(answer)}


@dataclass(frozen=True)
class MathPreset(Preset):
    """MATH (and MATH-500, NuminaMath): ``problem`` and a LaTeX ``solution``; MATH-500 also has ``answer``."""

    prompt_column: str = "problem"
    prompt_template: str = MATH_TEMPLATE
    columns: dict[str, str] = field(default_factory=lambda: {"solution": "solution"})
    optional_columns: dict[str, str] = field(default_factory=lambda: {"answer": "answer"})

    def derive(self, row: Row) -> Row:
        """``answer``: the row's own ``answer`` when it has one, else the content of the last ``\\boxed{}``.

        The box is read by :func:`~gcpo_lightning.rewards.math_answers.boxed_contents`: the last top-level
        ``\\boxed{...}`` (or ``\\fbox{...}``, or unbraced ``\\boxed 5``), nested braces included.

        Raises:
            ValueError: when there is no ``answer`` and no complete, non-empty last box.
        """
        given = row.get("answer")
        if given is not None and str(given).strip():
            return {"answer": str(given).strip()}
        solution = _text(row, "solution")
        try:
            boxed = gold_text(solution, "boxed").strip()
        except GoldAnswerError:
            boxed = ""
        if not boxed:
            raise ValueError(
                "no answer: the row has no 'answer' value and its solution has no \\boxed{...}: "
                f"...{solution[-80:]!r}"
            )
        return {"answer": boxed}


@dataclass(frozen=True)
class HumanEvalPreset(Preset):
    """HumanEval: a code prompt (signature and docstring) with its ``test``, ``entry_point`` and ``task_id``."""

    prompt_column: str = "prompt"
    prompt_template: str = HUMANEVAL_TEMPLATE
    columns: dict[str, str] = field(
        default_factory=lambda: {"test": "test", "entry_point": "entry_point", "task_id": "task_id"}
    )

    def derive(self, row: Row) -> Row:
        """``code_prompt``: the raw code prompt (signature and docstring) that the completion continues."""
        return {"code_prompt": row["question"]}


PLAIN = Preset()
"""No preset: ``question`` and ``answer`` columns, the question used as is."""

GSM8K = GSM8KPreset()
MATH = MathPreset()
HUMANEVAL = HumanEvalPreset()

PRESETS: dict[str, Preset] = {"gsm8k": GSM8K, "math": MATH, "humaneval": HUMANEVAL}
"""The built-in presets by name (:data:`PresetName`), as chosen by ``HFPromptDataModule(preset="gsm8k")``."""


def get_preset(preset: Preset | str | None) -> Preset:
    """The preset itself, the built-in called ``preset``, or :data:`PLAIN` for ``None``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if preset is None:
        return PLAIN
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown dataset preset {preset!r}; known: {sorted(PRESETS)}")
    return PRESETS[preset]
