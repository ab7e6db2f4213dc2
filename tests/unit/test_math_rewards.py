"""Tests for the math reward callables (gcpo_lightning.rewards.math)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from gcpo_lightning.rewards import math_answers
from gcpo_lightning.rewards.base import RewardError, call_reward, reward_name
from gcpo_lightning.rewards.math import MathAccuracy, TagFormat, tag_span
from gcpo_lightning.rewards.math_answers import GoldAnswerError

COMPLETIONS = [r"so \boxed{\frac{1}{2}}", "The answer is 0.5", "Answer: 0.33", "", r"\boxed{1,234}", "I give up"]
GOLDS = ["0.5", "1/2", "1/3", "7", "#### 1,234", "#### 1,234"]


def test_math_accuracy_scores_a_batch() -> None:
    reward = MathAccuracy()
    golds = ["0.5", "1/2", "1/3", "7", "1234", "1234"]
    assert reward(prompts=[""] * 6, completions=COMPLETIONS, answer=golds) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_math_accuracy_gsm8k_style_and_custom_column() -> None:
    reward = MathAccuracy(answer_column="solution", gold_style="gsm8k")
    completions = ["Answer: 1234", r"\boxed{1,243}"]
    assert reward(prompts=["", ""], completions=completions, solution=["#### 1,234"] * 2) == [1.0, 0.0]


def test_math_accuracy_boxed_style() -> None:
    reward = MathAccuracy(gold_style="boxed")
    out = reward(prompts=[""], completions=[r"\boxed{0.75}"], answer=[r"So $\boxed{\dfrac{3}{4}}$."])
    assert out == [1.0]


def test_math_accuracy_without_last_number_fallback() -> None:
    strict = MathAccuracy(fallback_to_last_number=False)
    assert strict(prompts=[""], completions=["it is 7"], answer=["7"]) == [0.0]
    assert MathAccuracy()(prompts=[""], completions=["it is 7"], answer=["7"]) == [1.0]


def test_math_accuracy_non_string_gold() -> None:
    assert MathAccuracy()(prompts=[""], completions=[r"\boxed{42}"], answer=[42]) == [1.0]


def test_unparseable_gold_names_index_and_text() -> None:
    reward = MathAccuracy()
    with pytest.raises(GoldAnswerError, match=r"batch index 2.*'\?\?\?'"):
        reward(prompts=[""] * 3, completions=["1", "2", "3"], answer=["1", "2", "???"])


def test_unparseable_gold_through_call_reward() -> None:
    with pytest.raises(RewardError, match=r"math_accuracy.*GoldAnswerError.*#### oops"):
        call_reward(MathAccuracy(gold_style="gsm8k"), [""], ["1"], {"answer": ["#### oops"]})


def test_missing_or_misaligned_column() -> None:
    reward = MathAccuracy()
    with pytest.raises(ValueError, match="needs the column 'answer'"):
        reward(prompts=[""], completions=["1"], solution=["1"])
    with pytest.raises(ValueError, match="2 values for 1 completions"):
        reward(prompts=[""], completions=["1"], answer=["1", "2"])


def test_check_gold() -> None:
    reward = MathAccuracy(gold_style="gsm8k")
    reward.check_gold([{"answer": "#### 1"}, {"answer": "#### 2,000"}])
    with pytest.raises(GoldAnswerError, match=r"row 1: .*'no hashes'"):
        reward.check_gold([{"answer": "#### 1"}, {"answer": "no hashes"}])
    with pytest.raises(KeyError, match="row 0 has no column 'answer'"):
        reward.check_gold([{"solution": "#### 1"}])


def test_bad_gold_style() -> None:
    with pytest.raises(ValueError, match="gold_style"):
        MathAccuracy(gold_style="latex")  # type: ignore[arg-type]


def test_reward_names() -> None:
    assert reward_name(MathAccuracy()) == "math_accuracy"
    assert reward_name(TagFormat()) == "tag_format"


def test_call_reward_accepts_both() -> None:
    columns = {"answer": ["2", "2"]}
    completions = [r"<think>1+1</think><answer>\boxed{2}</answer>", "2"]
    assert call_reward(MathAccuracy(), ["", ""], completions, columns) == [1.0, 1.0]
    assert call_reward(TagFormat(), ["", ""], completions, columns) == [1.0, 0.0]


def _in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` in a worker thread (not the main thread); return its result or re-raise its exception."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result(timeout=60)


def test_rewards_work_off_the_main_thread() -> None:
    golds = ["0.5", "1/2", "1/3", "7", "1234", "1234"]
    out = _in_thread(lambda: MathAccuracy()(prompts=[""] * 6, completions=COMPLETIONS, answer=golds))
    assert out == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    huge = _in_thread(lambda: MathAccuracy()(prompts=[""], completions=[r"\boxed{9^{9^{9}}}"], answer=["5"]))
    assert huge == [0.0]


def test_rewards_when_math_verify_cannot_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(math_answers, "_mv_parse", lambda text: ())  # the hand-written fallback decides
    golds = ["0.5", "1/2", "1/3", "7", "1234", "1234"]
    assert MathAccuracy()(prompts=[""] * 6, completions=COMPLETIONS, answer=golds) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


# ----- TagFormat -------------------------------------------------------------------------------------------------

GOOD = "<think>2+2 is 4</think>\n<answer>4</answer>"


@pytest.mark.parametrize(
    ("completion", "kwargs", "expected"),
    [
        (GOOD, {}, 1.0),
        (GOOD, {"strict": True}, 1.0),
        ("  " + GOOD + "\n", {"strict": True}, 1.0),
        ("Sure! " + GOOD, {}, 1.0),
        ("Sure! " + GOOD, {"strict": True}, 0.0),
        (GOOD + " Hope this helps.", {"strict": True}, 0.0),
        ("<think>a</think> between <answer>4</answer>", {"strict": True}, 0.0),
        ("<answer>4</answer><think>x</think>", {}, 0.0),
        ("<answer>4</answer><think>x</think>", {"require_order": False}, 1.0),
        ("<answer>4</answer> <think>x</think>", {"require_order": False, "strict": True}, 1.0),
        ("<think>x</think>", {}, 0.0),
        ("<think>x<answer>4</answer></think>", {}, 0.0),  # nested blocks
        ("<think>x<answer>4</answer></think>", {"require_order": False}, 0.0),
        ("<think>a</think><answer>1</answer><answer>2</answer>", {}, 0.0),  # a repeated tag
        ("</think>x<think><answer>4</answer>", {}, 0.0),  # closed before opened
        ("<think>x</think><answer>4", {}, 0.0),  # unclosed
        ("<THINK>x</THINK><ANSWER>4</ANSWER>", {}, 0.0),  # case-sensitive
        ("", {}, 0.0),
        ("<answer>4</answer>", {"tags": ["answer"], "strict": True}, 1.0),
        ("<reasoning>r</reasoning><answer>4</answer>", {"tags": ["reasoning", "answer"]}, 1.0),
        ("<think></think><answer></answer>", {"strict": True}, 1.0),  # empty blocks are well-formed
    ],
)
def test_tag_format(completion: str, kwargs: dict[str, object], expected: float) -> None:
    assert TagFormat(**kwargs)(prompts=[""], completions=[completion]) == [expected]  # type: ignore[arg-type]


@pytest.mark.parametrize("tags", [[], ["a", "a"], ["bad tag"], ["<x>"]])
def test_tag_format_rejects_bad_tags(tags: list[str]) -> None:
    with pytest.raises(ValueError, match="tag"):
        TagFormat(tags=tags)


def test_tag_span() -> None:
    assert tag_span("x<a>b</a>", "a") == (1, 9)
    assert tag_span("<a></a><a></a>", "a") is None
    assert tag_span("</a><a>", "a") is None


def test_tag_format_off_the_main_thread() -> None:
    assert _in_thread(lambda: TagFormat()(prompts=[""], completions=[GOOD])) == [1.0]
