"""Tests for math answer extraction and equivalence (gcpo_lightning.rewards.math_answers).

The table below is the specification: each case is ``(completion, gold, gold_style, expected)``. Cases marked
``fallback=True`` must also hold when math-verify cannot parse the answers (the hand-written fallback decides).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from gcpo_lightning.rewards import math_answers
from gcpo_lightning.rewards.math_answers import (
    GoldAnswerError,
    answers_match,
    boxed_contents,
    extract_gold,
    extract_prediction,
    is_equivalent,
    normalize_answer,
)


def math_verify_cannot_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every math-verify parse come back empty, so the hand-written fallback decides every comparison."""
    monkeypatch.setattr(math_answers, "_mv_parse", lambda text: ())


@dataclass(frozen=True)
class Case:
    """One equivalence case: does ``completion`` answer ``gold`` correctly?"""

    id: str
    completion: str
    gold: str
    expected: bool
    style: str = "plain"
    fallback: bool = True  # the fallback gives the same verdict


CASES = [
    # fractions, decimals, \dfrac
    Case("frac-vs-decimal", r"So \boxed{\frac{1}{2}}.", "0.5", True),
    Case("decimal-vs-frac", r"\boxed{0.5}", r"\frac{1}{2}", True),
    Case("slash-vs-frac", "The answer is 1/2", r"\frac{1}{2}", True),
    Case("dfrac", r"\boxed{\dfrac{1}{2}}", "1/2", True),
    Case("frac-shorthand", r"\boxed{\frac12}", "0.5", True),
    Case("unreduced-frac", r"\boxed{\frac{2}{4}}", "1/2", True),
    Case("decimal-trailing-zeros", r"\boxed{3.0}", "3", True),
    Case("money-decimals", r"\boxed{1000.00}", "1,000", True),
    Case("improper-frac-vs-decimal", r"\boxed{\frac{3}{2}}", "1.5", True),
    # thousands separators (a comma followed by groups of exactly 3 digits, when the whole answer is one number)
    Case("thousands-pred", "Answer: 1,000", "1000", True),
    Case("thousands-gold", "Answer: 1000", "1,000", True),
    Case("thousands-millions", "They have 1,234,567 apples in total.", "1234567", True),
    Case("thousands-latex-brace", r"\boxed{1{,}000}", "1000", True),
    Case("thousands-not-a-list", r"\boxed{1,2}", "12", False),
    # math-verify reads "1,2" as the set {1, 2}: order does not matter; the fallback compares text
    Case("set-like-comma", r"\boxed{1,2}", "1,2", True),
    Case("set-like-comma-reordered", r"\boxed{2,1}", "1,2", True, fallback=False),
    # roots and powers
    Case("sqrt-braces-vs-bare", r"\boxed{\sqrt2}", r"\sqrt{2}", True),
    Case("sqrt-vs-power", r"\boxed{2^{1/2}}", r"\sqrt{2}", True),
    Case("sqrt-fraction", r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),
    Case("sqrt-wrong", r"\boxed{\sqrt{3}}", r"\sqrt{2}", False),
    Case("power-tower-small", r"\boxed{2^{2^2}}", "16", True),
    # boxes
    Case("nested-boxed", r"\boxed{\boxed{\frac{3}{4}}}", "3/4", True),
    Case("boxed-in-math-mode", r"Thus $\boxed{\frac{3}{4}}$.", "0.75", True),
    Case("last-boxed-wins", r"First \boxed{1}, then \boxed{2}.", "2", True),
    Case("earlier-boxed-ignored", r"First \boxed{1}, then \boxed{2}.", "1", False),
    Case("fbox", r"\fbox{7}", "7", True),
    # units, currency, percent, degrees, trailing text
    Case("unit-words", "Answer: 5 dollars", "5", True),
    Case("unit-text", r"\boxed{5\text{ cm}}", "5", True),
    Case("unit-square-feet", "The answer is 18 square feet.", "18", True),
    Case("currency-dollar", "Answer: $5", "5", True),
    Case("currency-escaped", r"\boxed{\$18.50}", "18.5", True),
    Case("percent-vs-number", r"\boxed{5\%}", "5", True),
    Case("percent-vs-fraction", r"\boxed{5\%}", "0.05", True),
    Case("fraction-vs-percent-number", "Answer: 0.05", "5", False),
    Case("degrees", r"\boxed{30^\circ}", "30", True),
    Case("trailing-period", "The final answer is 42.", "42", True),
    Case("markdown-bold", "**Answer:** 42", "42", True),
    Case("answer-on-next-line", "The final answer is\n\n$$\\frac12$$", "0.5", True),
    Case("answer-in-math-mode", r"The answer is $\frac{3}{4}$.", "0.75", True),
    # negative numbers, pi, variables
    Case("negative", r"\boxed{-3}", "-3", True),
    Case("negative-last-number", "so x = -3", "-3", True),
    Case("negative-sign-matters", r"\boxed{3}", "-3", False),
    Case("minus-is-not-a-sign", "3-2", "-2", False),
    Case("pi", r"\boxed{\pi}", r"\pi", True),
    Case("multiple-of-pi", r"\boxed{2\pi}", r"2\pi", True),
    Case("pi-vs-approximation", r"\boxed{3.14}", r"\pi", False),
    Case("assignment", r"\boxed{x=5}", "5", True),
    Case("polynomial-expanded", r"\boxed{x^2+2x+1}", "(x+1)^2", True, fallback=False),
    # intervals and tuples (math-verify semantics)
    Case("interval", r"\boxed{[0,1)}", "[0,1)", True),
    Case("interval-open-vs-half-open", r"\boxed{(0,1)}", "[0,1)", False),
    Case("tuple-order-matters", r"\boxed{(3, \frac{\pi}{2})}", r"(\frac{\pi}{2}, 3)", False),
    # words
    Case("text-answer", r"\boxed{\text{Sunday}}", "Sunday", True),
    Case("text-answer-wrong", "Answer: Monday", "Sunday", False),
    Case("anagram-is-not-a-product", r"\boxed{nabana}", "banana", False),
    # golds in GSM8K and MATH formats
    Case("gsm8k-gold-thousands", "Answer: 1234", "She pays 1,234 in total.\n#### 1,234", True, "gsm8k"),
    Case("gsm8k-gold-wrong", r"\boxed{1243}", "#### 1,234", False, "gsm8k"),
    Case("gsm8k-gold-negative", "The answer is -7.", "#### -7", True, "gsm8k"),
    Case("math-gold-boxed", r"\boxed{0.75}", r"Hence the answer is $\boxed{\frac{3}{4}}$.", True, "boxed"),
    Case("math-gold-last-box", r"\boxed{4}", r"We get \boxed{2} twice, so \boxed{4}.", True, "boxed"),
    # near misses that must NOT match
    Case("rounded-third", "Answer: 0.33", "1/3", False),
    Case("rounded-third-4dp", r"\boxed{0.3333}", r"\frac{1}{3}", False),
    Case("decimal-shift", r"\boxed{12}", "1.2", False),
    Case("extra-zero", r"\boxed{2}", "20", False),
    Case("digit-order", r"\boxed{21}", "12", False),
    Case("hedged-answer", "Answer: 2 or 3", "2", False),
    # no answer at all
    Case("empty-completion", "", "5", False),
    Case("no-answer", "I don't know.", "5", False),
    Case("empty-box", r"\boxed{}", "5", False),
    Case("marker-without-answer", "Answer:", "5", False),
    Case("unclosed-box", r"\boxed{5", "5", True),  # no complete box: the last number is used
    Case("infinity-is-not-a-number", r"\boxed{\infty}", "5", False),
    Case("huge-power-is-not-evaluated", r"\boxed{10^{10^{10}}}", "5", False),
    Case("huge-factorial-is-not-evaluated", r"\boxed{(10^{10})!}", "5", False),
]


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 50
    assert len({case.id for case in CASES}) == len(CASES)
    assert sum(case.expected for case in CASES) >= 20 and sum(not case.expected for case in CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_equivalence(case: Case) -> None:
    assert is_equivalent(case.completion, case.gold, case.style) is case.expected


FALLBACK_CASES = [case for case in CASES if case.fallback]


@pytest.mark.parametrize("case", FALLBACK_CASES, ids=[case.id for case in FALLBACK_CASES])
def test_equivalence_when_math_verify_cannot_parse(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    math_verify_cannot_parse(monkeypatch)
    assert is_equivalent(case.completion, case.gold, case.style) is case.expected


def test_fallback_is_used_when_math_verify_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(math_answers.math_verify, "parse", broken)
    assert is_equivalent(r"\boxed{\frac{1}{2}}", "0.5")
    assert not is_equivalent(r"\boxed{0.33}", "1/3")


@pytest.mark.parametrize(
    ("gold", "style"),
    [
        ("", "plain"),
        ("   ", "plain"),
        ("???", "plain"),
        ("no hashes 42", "gsm8k"),
        ("#### ", "gsm8k"),
        ("#### oops", "gsm8k"),
        ("a proof without a box", "boxed"),
        (r"\boxed{}", "boxed"),
    ],
)
@pytest.mark.parametrize("math_verify_parses", [True, False])
def test_unparseable_gold_raises(
    gold: str, style: str, math_verify_parses: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not math_verify_parses:
        math_verify_cannot_parse(monkeypatch)
    with pytest.raises(GoldAnswerError) as info:
        extract_gold(gold, style)
    assert repr(gold) in str(info.value)


@pytest.mark.parametrize("gold", [None, float("nan")])
def test_missing_gold_raises(gold: object) -> None:
    with pytest.raises(GoldAnswerError, match="missing"):
        extract_gold(gold)


def test_unknown_gold_style() -> None:
    with pytest.raises(ValueError, match="unknown gold style"):
        extract_gold("5", "latex")  # type: ignore[arg-type]


def test_gold_error_is_a_value_error() -> None:
    assert issubclass(GoldAnswerError, ValueError)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"\boxed{1} and \boxed{2}", "2"),  # the last box
        (r"Answer: 3. Check: \boxed{4}", "4"),  # a box beats a marker
        ("Answer: 3. Then 5 more.", "3"),  # a marker beats the last number
        ("7 apples and 9 pears", "9"),  # the last number
        ("x = 1.5 and y = -2", "-2"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces inside a box
    ],
)
def test_extraction_rules(completion: str, expected: str) -> None:
    prediction = extract_prediction(completion)
    assert prediction is not None and prediction.text == expected


def test_last_number_fallback_can_be_disabled() -> None:
    assert extract_prediction("7 apples", fallback_to_last_number=False) is None
    boxed = extract_prediction(r"\boxed{7}", fallback_to_last_number=False)  # a box is not the fallback
    assert boxed is not None and boxed.text == "7"


def test_overlong_prediction_is_not_parsed() -> None:
    long_box = r"\boxed{" + "1+" * math_answers.MAX_ANSWER_CHARS + "1}"
    assert extract_prediction(long_box) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (r"$\boxed{1,000}$", "1000"),
        ("**42**.", "42"),
        (r"\(5\)", "5"),
        ("5 dollars", "5"),
        ("3 pi", "3 pi"),
        ("1,2", "1,2"),
        ("(1,234)", "(1,234)"),
        ("Sunday", r"\text{Sunday}"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_boxed_contents_nesting() -> None:
    assert boxed_contents(r"a \boxed{\frac{1}{2}} b \boxed{x^{2}}") == [r"\frac{1}{2}", "x^{2}"]
    assert boxed_contents(r"\boxed{1} \boxed{2") == ["1"]
    assert boxed_contents(r"\boxed{\boxed{3}}") == [r"\boxed{3}"]  # top-level boxes only
    assert boxed_contents(r"\boxed{a\\}b}") == ["a\\\\"]  # ``\\`` is an escaped backslash: the next } closes


def test_boxed_contents_reads_unbraced_boxes() -> None:
    # MATH solutions sometimes write ``\boxed 5``: the content runs to the next space or ``$``
    assert boxed_contents(r"so $\boxed 5$.") == ["5"]
    assert boxed_contents(r"\boxed{1}, then \boxed \frac12 and \fbox{3}") == ["1", r"\frac12", "3"]
    assert boxed_contents(r"\boxedx{3} \boxed$") == []
    assert extract_gold(r"so $\boxed 5$.", "boxed").text == "5"
    assert is_equivalent(r"Hence \boxed 7.", "7") and not is_equivalent(r"\boxed 7 (not 8)", "8")
    assert normalize_answer(r"\boxed 5") == "5"


def test_prediction_none_never_matches() -> None:
    assert not answers_match(None, extract_gold("5"))


def _run_in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` in a worker thread (not the main thread); return its result or re-raise its exception."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result(timeout=60)


def test_works_off_the_main_thread() -> None:
    assert math_answers.timeout_seconds() == math_answers.MATH_VERIFY_TIMEOUT_S
    assert _run_in_thread(math_answers.timeout_seconds) is None
    verdicts = _run_in_thread(
        lambda: [is_equivalent(r"\boxed{\frac{1}{2}}", "0.5"), is_equivalent("Answer: 0.33", "1/3")]
    )
    assert verdicts == [True, False]
