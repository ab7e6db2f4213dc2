"""Tests for the embedded arithmetic task (gcpo_lightning.data.tasks.arithmetic)."""

from __future__ import annotations

import random
import re

import pytest

from gcpo_lightning.data.tasks import ArithmeticTask, solve
from gcpo_lightning.rewards.arithmetic import extract_answer, is_correct

QUESTION_RE = re.compile(r"\d+(?:[+-]\d+)*")


def test_sample_question_ranges_and_determinism() -> None:
    task = ArithmeticTask()
    a = [task.sample_question(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(0)
    lengths, ops = set(), set()
    for _ in range(2000):
        q = task.sample_question(rng)
        assert QUESTION_RE.fullmatch(q)
        operands = [int(x) for x in re.findall(r"\d+", q)]
        assert all(task.min_operand <= x <= task.max_operand for x in operands)
        lengths.add(len(operands))
        ops.update(re.findall(r"[+-]", q))
    assert lengths == {3, 4, 5}
    assert ops == {"+", "-"}


def test_custom_task_ranges() -> None:
    task = ArithmeticTask(min_operands=2, max_operands=2, min_operand=10, max_operand=20, operators="+")
    rng = random.Random(1)
    for _ in range(200):
        q = task.sample_question(rng)
        left, right = q.split("+")
        assert 10 <= int(left) <= 20 and 10 <= int(right) <= 20
    assert task.num_questions() == 11 * 11


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_operands": 1},
        {"min_operands": 4, "max_operands": 3},
        {"min_operand": -1},
        {"min_operand": 5, "max_operand": 4},
        {"operators": ""},
        {"operators": "*"},
        {"operators": "++"},
    ],
)
def test_invalid_fields_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ArithmeticTask(**kwargs)


def test_heldout_deterministic_distinct_prefix() -> None:
    task = ArithmeticTask()
    big = task.heldout(300)
    assert big == task.heldout(300)
    assert task.heldout(50) == big[:50]
    assert len({q for q, _ in big}) == 300
    assert all(a == str(solve(q)) for q, a in big)
    assert task.heldout(50, seed=1) != big[:50]
    assert task.heldout(0) == []
    with pytest.raises(ValueError):
        ArithmeticTask(min_operands=2, max_operands=2, max_operand=2, operators="+").heldout(5)


@pytest.mark.parametrize(
    ("question", "value"),
    [("7+5+8-3", 17), ("1-9-9", -17), ("9+9+9+9+9", 45), ("3-3+0", 0), ("12+30", 42)],
)
def test_solve(question: str, value: int) -> None:
    assert solve(question) == value


@pytest.mark.parametrize("bad", ["", "7+", "+7", "7*3", "7 + 3", "a+b"])
def test_solve_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        solve(bad)


def test_worked_solution_format_and_correctness() -> None:
    task = ArithmeticTask()
    assert task.worked_solution("7+5+8-3") == " 7+5=12,12+8=20,20-3=17. Answer: 17"
    assert task.worked_solution("2-7+1") == " 2-7=-5,-5+1=-4. Answer: -4"
    rng = random.Random(0)
    for _ in range(500):
        q = task.sample_question(rng)
        text = task.worked_solution(q)
        assert text.startswith(" ") and not text.startswith("  ")
        assert is_correct(text, str(solve(q)))
        for step in text[1 : text.index(".")].split(","):
            lhs, rhs = step.split("=")
            assert solve(lhs.lstrip("-") if not lhs.startswith("-") else "0" + lhs) == int(rhs)


def test_worked_solution_systematic_errors() -> None:
    task = ArithmeticTask()
    rng = random.Random(0)
    # Forgotten carry (7+5 -> 2) and forgotten borrow (12-3 would need a borrow: 12-3 -> 19).
    assert task.worked_solution("7+5", 1.0, rng) == " 7+5=2. Answer: 2"
    assert task.worked_solution("9+3-5", 1.0, rng) == " 9+3=2,2-5=-3. Answer: -3"
    assert task.worked_solution("1+1+1", 1.0, rng) == " 1+1=2,2+1=3. Answer: 3"  # nothing to get wrong
    questions = [task.sample_question(rng) for _ in range(500)]
    wrong = sum(not is_correct(task.worked_solution(q, 1.0, rng), str(solve(q))) for q in questions)
    assert 0.3 < wrong / len(questions) < 0.7  # questions without a carry/borrow step stay correct
    some = sum(not is_correct(task.worked_solution(q, 0.3, rng), str(solve(q))) for q in questions)
    assert 0 < some < wrong
    for q in questions:  # always well formed, even when wrong
        assert extract_answer(task.worked_solution(q, 1.0, rng)) is not None


def test_worked_solution_argument_checks() -> None:
    task = ArithmeticTask()
    with pytest.raises(ValueError):
        task.worked_solution("1+2", 0.5)  # no rng
    with pytest.raises(ValueError):
        task.worked_solution("1+2", 1.5, random.Random(0))


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" 7+5=12. Answer: 12", "12"),
        (" 2-7=-5. Answer: -5", "-5"),
        ("Answer: 3\nmore text", "3"),
        ("Answer:   4   ", "4"),
        ("Answer:7", "7"),
        ("Answer: 1. Answer: 2", "2"),
        ("Answer: 2\nAnswer: x", None),
        ("no answer here", None),
        ("Answer:", None),
        ("Answer: 17.", None),
        ("Answer: 3 apples", None),
        ("Answer: +3", None),
        ("Answer: 1.5", None),
        ("Answer: --3", None),
        ("", None),
    ],
)
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


def test_is_correct() -> None:
    assert is_correct(" 1+2=3. Answer: 3", "3")
    assert is_correct("Answer: -3", "-3")
    assert is_correct("Answer: 007", "7")
    assert not is_correct("Answer: 4", "3")
    assert not is_correct("Answer: 3.", "3")
    assert not is_correct("3", "3")
    assert not is_correct("Answer: 3\nAnswer: 4", "3")
