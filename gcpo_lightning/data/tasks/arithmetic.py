"""The embedded default task: short chains of one-digit additions and subtractions.

A question is an expression such as ``"7+5+8-3"``. A completion is a running-total worked
solution followed by an answer line, always starting with one leading space (completions are
appended right after the prompt's final ``:``)::

    " 7+5=12,12+8=20,20-3=17. Answer: 17"

The teacher that writes demonstrations for pre-training can make a *systematic* mistake: in a step
that needs a carry (``a+b`` whose units digits sum to 10 or more) it forgets the carry and writes
``a+b-10``; in a step that needs a borrow (``a-b`` with ``a >= b >= 0`` and a smaller units digit
of ``a``) it forgets the borrow and writes ``a-b+10``. The wrong running total is carried forward.
This makes supervised pre-training plateau below perfect accuracy, so that reinforcement learning
has headroom that is a real improvement over the teacher.

This module has no torch dependency.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from gcpo_lightning.rewards.arithmetic import ANSWER_MARKER

_QUESTION_RE = re.compile(r"\d+(?:[+-]\d+)*")


def _split_question(question: str) -> tuple[list[int], list[str]]:
    """Split ``"7+5-3"`` into operands ``[7, 5, 3]`` and operators ``["+", "-"]``.

    Raises:
        ValueError: if the question is not a chain of non-negative integers joined by ``+``/``-``.
    """
    if not _QUESTION_RE.fullmatch(question):
        raise ValueError(f"not an arithmetic question: {question!r}")
    operands = [int(tok) for tok in re.findall(r"\d+", question)]
    operators = re.findall(r"[+-]", question)
    return operands, operators


def _apply(total: int, op: str, operand: int) -> int:
    """Return ``total op operand`` for ``op`` in ``"+-"``."""
    return total + operand if op == "+" else total - operand


def _needs_carry_or_borrow(total: int, op: str, operand: int) -> bool:
    """Whether the step ``total op operand`` needs a carry (``+``) or a borrow (``-``).

    Only steps on non-negative numbers (and, for ``-``, a non-negative result) count; steps that go
    through negative numbers are never applicable to the teacher's mistake.
    """
    if total < 0 or operand < 0:
        return False
    if op == "+":
        return total % 10 + operand % 10 >= 10
    return total >= operand and total % 10 < operand % 10


def _mistaken(total: int, op: str, operand: int) -> int:
    """The teacher's systematic mistake: the result with the carry or borrow forgotten."""
    return total + operand - 10 if op == "+" else total - operand + 10


def solve(question: str) -> int:
    """Evaluate an arithmetic question left to right.

    Args:
        question: e.g. ``"7+5+8-3"``.

    Returns:
        The integer value, e.g. ``17``.

    Raises:
        ValueError: if ``question`` is not a chain of integers joined by ``+``/``-``.
    """
    operands, operators = _split_question(question)
    total = operands[0]
    for op, operand in zip(operators, operands[1:]):
        total = _apply(total, op, operand)
    return total


@dataclass(frozen=True)
class ArithmeticTask:
    """Chains of small non-negative integers joined by ``+`` and ``-``, evaluated left to right.

    Args:
        min_operands: fewest operands in a question (at least 2).
        max_operands: most operands in a question (at least ``min_operands``).
        min_operand: smallest operand value (non-negative).
        max_operand: largest operand value (at least ``min_operand``).
        operators: the operator characters to draw from, a non-empty subset of ``"+-"``.
    """

    min_operands: int = 3
    max_operands: int = 5
    min_operand: int = 1
    max_operand: int = 9
    operators: str = "+-"

    def __post_init__(self) -> None:
        """Validate the fields.

        Raises:
            ValueError: on an out-of-range or inconsistent field.
        """
        if self.min_operands < 2:
            raise ValueError(f"min_operands must be >= 2, got {self.min_operands}")
        if self.max_operands < self.min_operands:
            raise ValueError(f"max_operands ({self.max_operands}) must be >= min_operands ({self.min_operands})")
        if self.min_operand < 0:
            raise ValueError(f"min_operand must be >= 0, got {self.min_operand}")
        if self.max_operand < self.min_operand:
            raise ValueError(f"max_operand ({self.max_operand}) must be >= min_operand ({self.min_operand})")
        if not self.operators or set(self.operators) - set("+-") or len(set(self.operators)) != len(self.operators):
            raise ValueError(f"operators must be a non-empty subset of '+-' without repeats, got {self.operators!r}")

    def sample_question(self, rng: random.Random) -> str:
        """Draw one question, e.g. ``"7+5+8-3"``.

        Args:
            rng: the random source (the only source of randomness used).

        Returns:
            The question text.
        """
        n = rng.randint(self.min_operands, self.max_operands)
        parts = [str(rng.randint(self.min_operand, self.max_operand))]
        for _ in range(n - 1):
            parts.append(rng.choice(self.operators))
            parts.append(str(rng.randint(self.min_operand, self.max_operand)))
        return "".join(parts)

    def heldout(self, n: int, seed: int = 1234) -> list[tuple[str, str]]:
        """A deterministic list of ``n`` distinct (question, answer) pairs for evaluation.

        The list for a smaller ``n`` is a prefix of the list for a larger one (same ``seed``).

        Args:
            n: how many pairs.
            seed: the seed of the private random source.

        Returns:
            ``[(question, str(solve(question))), ...]``.

        Raises:
            ValueError: if ``n`` is negative or larger than the number of distinct questions.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > self.num_questions():
            raise ValueError(f"n={n} exceeds the {self.num_questions()} distinct questions of this task")
        rng = random.Random(seed)
        seen: set[str] = set()
        pairs: list[tuple[str, str]] = []
        while len(pairs) < n:
            q = self.sample_question(rng)
            if q not in seen:
                seen.add(q)
                pairs.append((q, str(solve(q))))
        return pairs

    def num_questions(self) -> int:
        """The number of distinct questions this task can produce."""
        values = self.max_operand - self.min_operand + 1
        ops = len(self.operators)
        return sum(values**k * ops ** (k - 1) for k in range(self.min_operands, self.max_operands + 1))

    def worked_solution(self, question: str, error_rate: float = 0.0, rng: random.Random | None = None) -> str:
        """The teacher's completion for ``question``, e.g. ``" 7+5=12,12+8=20,20-3=17. Answer: 17"``.

        Args:
            question: the question text.
            error_rate: the probability, per step that needs a carry or borrow, that the teacher
                forgets it (the wrong running total is carried forward). ``0.0`` gives a correct solution.
            rng: the random source for the mistakes; required when ``error_rate > 0``.

        Returns:
            The completion text, with one leading space and no end-of-sequence marker.

        Raises:
            ValueError: if ``error_rate`` is outside ``[0, 1]`` or ``rng`` is missing when needed.
        """
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        if error_rate > 0.0 and rng is None:
            raise ValueError("an rng is required when error_rate > 0")
        operands, operators = _split_question(question)
        total = operands[0]
        steps = []
        for op, operand in zip(operators, operands[1:]):
            new = _apply(total, op, operand)
            if error_rate > 0.0 and _needs_carry_or_borrow(total, op, operand):
                if rng.random() < error_rate:  # type: ignore[union-attr]
                    new = _mistaken(total, op, operand)
            steps.append(f"{total}{op}{operand}={new}")
            total = new
        return f" {','.join(steps)}. {ANSWER_MARKER} {total}"
