"""Rewards of the embedded arithmetic task: the answer after ``Answer:`` compared with the gold integer."""

from __future__ import annotations

import re
from typing import Any

ANSWER_MARKER = "Answer:"
"""The marker that introduces the final answer in a completion."""


_INT_RE = re.compile(r"-?\d+")


def extract_answer(completion: str) -> str | None:
    """Return the integer literal after the LAST ``"Answer:"`` in ``completion``, or ``None``.

    The answer is the text after the marker up to the end of the string or the first newline,
    stripped of surrounding whitespace. It must be an integer literal such as ``"17"`` or ``"-3"``;
    anything else (empty, ``"17."``, ``"3 apples"``, ``"+3"``) gives ``None``.

    Args:
        completion: generated text (special tokens already removed).

    Returns:
        The answer string, or ``None`` if there is no well-formed answer.
    """
    pos = completion.rfind(ANSWER_MARKER)
    if pos < 0:
        return None
    text = completion[pos + len(ANSWER_MARKER) :].split("\n", 1)[0].strip()
    return text if _INT_RE.fullmatch(text) else None


def is_correct(completion: str, answer: str) -> bool:
    """Whether the completion's extracted answer equals ``answer`` as an integer.

    Args:
        completion: generated text.
        answer: the reference answer, e.g. ``"17"`` (as returned by :meth:`ArithmeticTask.heldout`).

    Returns:
        ``True`` if a well-formed answer was found and equals ``int(answer)``.
    """
    got = extract_answer(completion)
    return got is not None and int(got) == int(answer)


def arithmetic_accuracy(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the completion's final ``Answer:`` equals the reference answer, else 0.0."""
    return [float(is_correct(c, a)) for c, a in zip(completions, answer)]


arithmetic_accuracy.answer_key = extract_answer  # type: ignore[attr-defined]  # majority@k votes on this


def arithmetic_format(completions: list[str], **_: Any) -> list[float]:
    """1.0 when the completion ends with a parseable ``Answer: <integer>``, else 0.0."""
    return [float(extract_answer(c) is not None) for c in completions]
