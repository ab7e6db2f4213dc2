"""Presets for common reasoning datasets: which column holds the question, how it is asked, where the answer is.

A preset fills the defaults of :class:`gcpo_lightning.data.datamodules.HFPromptDataModule` (``prompt_column``,
``prompt_template``, ``columns``) and derives columns from each row (e.g. the final answer of a GSM8K
solution). Explicit arguments of the data module override the preset's defaults.

- ``gsm8k``: reads ``question``, ``answer`` (a solution ending ``#### 1,234``); rows get ``solution`` (the full
  text) and ``answer`` (``1234``, the text after ``####``).
- ``math``: reads ``problem``, ``solution`` and, when present, ``answer`` (MATH-500); rows get ``solution`` and
  ``answer`` (the ``answer`` column, else the content of the last ``\\boxed{...}``, nested braces included).
- ``humaneval``: reads ``prompt`` (signature + docstring), ``test``, ``entry_point``, ``task_id``; the row's
  ``prompt`` is an instruction around the code, ``code_prompt`` the raw code prompt; the others pass through.

Every row also has ``question``, the raw question.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from gcpo_lightning.data.templates import HUMANEVAL_TEMPLATE, MATH_TEMPLATE

Row = dict[str, Any]
PresetName = Literal["gsm8k", "math", "humaneval"]


_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


def gsm8k_final_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after the last ``####``, stripped.

    Thousands separators are removed (``"1,234"`` -> ``"1234"``); anything else is kept as written.

    Args:
        solution: the worked solution, ending with a ``#### <answer>`` line.

    Raises:
        ValueError: when there is no ``####`` or nothing after it.
    """
    if "####" not in solution:
        raise ValueError(f"the solution has no '#### <answer>' line: ...{solution[-80:]!r}")
    answer = solution.rsplit("####", 1)[1].strip()
    if not answer:
        raise ValueError(f"the solution's '####' line is empty: ...{solution[-80:]!r}")
    return answer.replace(",", "") if _THOUSANDS.fullmatch(answer) else answer


def _braced(text: str, start: int) -> str | None:
    """The content of the brace group opening at ``text[start] == "{"``, nested braces included."""
    depth = 0
    for end in range(start, len(text)):
        if text[end] == "{" and text[end - 1 : end] != "\\":
            depth += 1
        elif text[end] == "}" and text[end - 1 : end] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : end]
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces included.

    ``\\boxed 5`` (no braces) gives ``"5"``. Unbalanced braces give ``None``.

    Args:
        text: a solution in LaTeX.

    Returns:
        The stripped content, or ``None`` when there is no complete boxed expression.
    """
    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)\b", text))):
        rest = text[match.end() :]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            content = _braced(text, match.end() + len(rest) - len(stripped))
        elif rest[:1] == " " and stripped:
            content = re.split(r"[\s$]", stripped, maxsplit=1)[0]
        else:
            content = None
        if content is not None and content.strip():
            return content.strip()
    return None


def _text(row: Row, column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"column {column!r} must be a non-empty string, got {value!r}")
    return value


def derive_gsm8k(row: Row) -> Row:
    """``answer``: the final answer after ``####`` in ``solution``."""
    return {"answer": gsm8k_final_answer(_text(row, "solution"))}


def derive_math(row: Row) -> Row:
    """``answer``: the row's own ``answer`` when it has one (MATH-500), else the last ``\\boxed{}`` of ``solution``."""
    given = row.get("answer")
    if given is not None and str(given).strip():
        return {"answer": str(given).strip()}
    boxed = last_boxed(_text(row, "solution"))
    if boxed is None:
        raise ValueError("no answer: the row has no 'answer' value and its solution has no \\boxed{...}: "
                         f"...{row['solution'][-80:]!r}")
    return {"answer": boxed}


def derive_humaneval(row: Row) -> Row:
    """``code_prompt``: the raw code prompt (signature and docstring) that the completion continues."""
    return {"code_prompt": row["question"]}


def derive_nothing(row: Row) -> Row:
    """No derived columns."""
    return {}


@dataclass(frozen=True)
class Preset:
    """Defaults for one dataset format.

    Args:
        prompt_column: the dataset column with the question.
        prompt_template: how the question becomes the user message (``{question}`` placeholder).
        columns: columns every row must have, as ``{name_in_rows: name_in_dataset}``.
        optional_columns: columns copied when present, same mapping.
        derive: computes further row columns from the mapped row; raises ``ValueError`` for a bad row.
    """

    prompt_column: str
    prompt_template: str
    columns: dict[str, str]
    optional_columns: dict[str, str] = field(default_factory=dict)
    derive: Callable[[Row], Row] = derive_nothing


PLAIN = Preset(prompt_column="question", prompt_template="{question}", columns={"answer": "answer"})
"""No preset: ``question`` and ``answer`` columns, the question used as is."""

PRESETS: dict[str, Preset] = {
    "gsm8k": Preset("question", MATH_TEMPLATE, {"solution": "answer"}, derive=derive_gsm8k),
    "math": Preset("problem", MATH_TEMPLATE, {"solution": "solution"}, {"answer": "answer"}, derive=derive_math),
    "humaneval": Preset("prompt", HUMANEVAL_TEMPLATE, {"test": "test", "entry_point": "entry_point",
                                                       "task_id": "task_id"}, derive=derive_humaneval),
}
"""The presets by name, as chosen by ``HFPromptDataModule(preset=...)``."""


def get_preset(name: str | None) -> Preset:
    """The preset called ``name`` (``None``: :data:`PLAIN`).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name is None:
        return PLAIN
    if name not in PRESETS:
        raise ValueError(f"unknown dataset preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
