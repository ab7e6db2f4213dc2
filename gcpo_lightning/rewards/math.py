"""Reward callables for math datasets: answer accuracy and a tag-format check.

Name them in YAML by ``class_path``, e.g.::

    reward_funcs:
      - class_path: gcpo_lightning.rewards.math.MathAccuracy
        init_args: {answer_column: answer, gold_style: gsm8k}
      - class_path: gcpo_lightning.rewards.math.TagFormat
        init_args: {tags: [think, answer], strict: true}

Both follow the reward protocol ``fn(prompts=[...], completions=[...], **columns) -> list[float]`` (see
:data:`gcpo_lightning.interfaces.protocols.RewardFn`); columns are the data row's fields repeated once per completion.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

from gcpo_lightning.rewards.math_answers import (
    GOLD_STYLES,
    GoldAnswerError,
    GoldStyle,
    ParsedAnswer,
    answers_match,
    extract_gold,
    extract_prediction,
    normalize_answer,
    prediction_text,
)


class MathAccuracy:
    r"""1.0 when a completion's final answer equals the reference answer mathematically, else 0.0.

    The completion's answer is its last ``\boxed{}``, else the text after its last ``Answer:`` marker, else its last
    number; equality is decided by math-verify (rules in :mod:`gcpo_lightning.rewards.math_answers`). A reference
    answer that cannot be parsed raises :class:`~gcpo_lightning.rewards.math_answers.GoldAnswerError` instead of
    scoring.

    Args:
        answer_column: the data column holding the reference answer.
        gold_style: how to read the reference: ``"plain"`` (the column is the answer), ``"gsm8k"`` (the text after
            ``####``) or ``"boxed"`` (a MATH-style solution; its last ``\boxed{}``).
        fallback_to_last_number: whether a completion with no ``\boxed{}`` and no ``Answer:`` marker is graded on
            its last number (GSM8K-style). ``False`` gives such completions 0.0.
    """

    def __init__(
        self, answer_column: str = "answer", gold_style: GoldStyle = "plain", fallback_to_last_number: bool = True
    ) -> None:
        if gold_style not in GOLD_STYLES:
            raise ValueError(f"gold_style must be one of {GOLD_STYLES}, got {gold_style!r}")
        self.answer_column = answer_column
        self.gold_style = gold_style
        self.fallback_to_last_number = fallback_to_last_number
        self.__name__ = "math_accuracy"

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        """Score each completion against its row's reference answer.

        Args:
            prompts: the prompts, one per completion (unused).
            completions: the generated texts.
            **columns: the data columns, one value per completion; must include ``answer_column``.

        Returns:
            1.0 or 0.0 per completion.

        Raises:
            GoldAnswerError: naming the batch index and the gold text of an unparseable reference answer.
            ValueError: if the answer column is missing or has the wrong length.
        """
        golds = self._gold_column(columns, len(completions))
        parsed = self._parse_golds(golds)
        return [self._score(completion, gold) for completion, gold in zip(completions, parsed)]

    def answer_key(self, completion: str) -> str | None:
        """The completion's normalised final answer, the vote of ``majority@k`` (``None``: no answer found).

        Votes are grouped by normalised text, so equal values written differently (``1/2`` and ``0.5``) are
        separate votes.
        """
        text = prediction_text(completion, self.fallback_to_last_number)
        return None if text is None else normalize_answer(text)

    def check_gold(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Validate every reference answer of a dataset up front.

        Args:
            rows: the dataset's rows, each a mapping with ``answer_column``.

        Raises:
            GoldAnswerError: naming the first row whose reference answer cannot be parsed, and its text.
            KeyError: naming the first row without ``answer_column``.
        """
        for index, row in enumerate(rows):
            if self.answer_column not in row:
                raise KeyError(f"row {index} has no column {self.answer_column!r} (columns: {sorted(row)})")
            try:
                extract_gold(row[self.answer_column], self.gold_style)
            except GoldAnswerError as err:
                raise GoldAnswerError(f"row {index}: {err}") from err

    def _gold_column(self, columns: Mapping[str, Any], n: int) -> list[Any]:
        """The reference answers of the batch, checked for presence and length."""
        if self.answer_column not in columns:
            raise ValueError(f"{self.__name__} needs the column {self.answer_column!r}; got {sorted(columns)}")
        golds = list(columns[self.answer_column])
        if len(golds) != n:
            raise ValueError(f"column {self.answer_column!r} has {len(golds)} values for {n} completions")
        return golds

    def _parse_golds(self, golds: list[Any]) -> list[ParsedAnswer]:
        """Parse each distinct reference answer once (a group repeats its row's answer)."""
        cache: dict[str, ParsedAnswer] = {}
        for index, gold in enumerate(golds):
            key = str(gold)
            if key not in cache:
                try:
                    cache[key] = extract_gold(key, self.gold_style)
                except GoldAnswerError as err:
                    raise GoldAnswerError(f"gold answer at batch index {index}: {err}") from err
        return [cache[str(gold)] for gold in golds]

    def _score(self, completion: str, gold: ParsedAnswer) -> float:
        """1.0 if the completion's answer matches ``gold``, else 0.0."""
        return float(answers_match(extract_prediction(completion, self.fallback_to_last_number), gold))


_TAG_NAME_RE = re.compile(r"[A-Za-z_][\w\-]*")

Span = tuple[int, int]


def tag_span(text: str, tag: str) -> Span | None:
    """Where ``<tag>...</tag>`` is in ``text``: ``(start, end)`` when both markers occur exactly once, in order.

    Args:
        text: a completion.
        tag: the tag name, e.g. ``"answer"``.

    Returns:
        The span from the start of ``<tag>`` to the end of ``</tag>``, or ``None``.
    """
    opening, closing = f"<{tag}>", f"</{tag}>"
    if text.count(opening) != 1 or text.count(closing) != 1:
        return None
    start, close = text.index(opening), text.index(closing)
    return (start, close + len(closing)) if close >= start + len(opening) else None


class TagFormat:
    """1.0 when a completion wraps its parts in the given tags, e.g. ``<think>...</think><answer>...</answer>``.

    Each tag must open and close exactly once (a repeated tag is a format error), and no two blocks may overlap or
    nest. Only the completion is checked: a tag opened by the prompt's template does not count.

    Args:
        tags: the tag names, in their required order.
        require_order: whether the blocks must appear in the order of ``tags``.
        strict: whether only whitespace may appear outside the blocks.
    """

    def __init__(
        self, tags: Sequence[str] = ("think", "answer"), require_order: bool = True, strict: bool = False
    ) -> None:
        tags = list(tags)
        if not tags or len(set(tags)) != len(tags):
            raise ValueError(f"tags must be a non-empty list of distinct names, got {tags!r}")
        bad = [tag for tag in tags if not _TAG_NAME_RE.fullmatch(tag)]
        if bad:
            raise ValueError(f"invalid tag names {bad!r}; use letters, digits, '_' and '-'")
        self.tags = tags
        self.require_order = require_order
        self.strict = strict
        self.__name__ = "tag_format"

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        """Score the format of each completion.

        Args:
            prompts: the prompts (unused).
            completions: the generated texts.
            **columns: the data columns (unused).

        Returns:
            1.0 or 0.0 per completion.
        """
        return [self.score(completion) for completion in completions]

    def score(self, completion: str) -> float:
        """1.0 if ``completion`` has the tag blocks as configured, else 0.0.

        Args:
            completion: one generated text.
        """
        spans = [tag_span(completion, tag) for tag in self.tags]
        if any(span is None for span in spans):
            return 0.0
        found = cast(list[Span], spans)  # no None: checked just above
        blocks = found if self.require_order else sorted(found)
        if any(left[1] > right[0] for left, right in itertools.pairwise(blocks)):
            return 0.0
        return 0.0 if self.strict and not _only_whitespace_outside(completion, blocks) else 1.0


def _only_whitespace_outside(text: str, blocks: list[Span]) -> bool:
    """Whether everything in ``text`` outside the (ordered, disjoint) ``blocks`` is whitespace."""
    edges = [0, *(i for block in blocks for i in block), len(text)]
    return all(not text[start:end].strip() for start, end in zip(edges[::2], edges[1::2]))
