"""A user's own reward functions, kept outside the package and plugged in by import path.

Run GRPO with them (``PYTHONPATH=examples`` makes this file importable as ``my_rewards``)::

    PYTHONPATH=examples python -m gcpo_lightning fit --config configs/grpo.yaml --config examples/custom_reward.yaml

A reward function is any callable ``fn(prompts=[...], completions=[...], **columns) -> list[float | None]``
with one value per completion; ``columns`` are the data row's other fields (here ``answer`` and ``question``),
each repeated once per completion. Accept ``**kwargs`` so that columns you do not use are ignored.

- a plain function is named in YAML by its import path: ``my_rewards.brevity_reward``;
- a callable class with settings is named by ``class_path`` with ``init_args``: ``my_rewards.AnswerInRange``.

The metrics ``rewards/<name>/mean`` and ``rewards/<name>/std`` are logged for each function, where ``<name>``
is the function's ``__name__`` or the class name.
"""

from __future__ import annotations

from typing import Any

from gcpo_lightning.rewards.arithmetic import extract_answer


def brevity_reward(completions: list[str], max_chars: int = 64, **_: Any) -> list[float]:
    """``1 - len / max_chars`` (floored at 0): shorter completions score higher, an empty one scores 1.

    Args:
        completions: the ``N`` decoded completions.
        max_chars: length (in characters, surrounding whitespace ignored) that scores 0.
    """
    return [max(0.0, 1.0 - len(c.strip()) / max_chars) for c in completions]


class AnswerInRange:
    """``bonus`` when the completion's final ``Answer: <integer>`` lies in ``[low, high]``, else 0.

    A plausibility reward: it cannot tell right from wrong, but it rewards a well-formed answer of the size the
    task produces. Completions without a parseable answer score 0.

    Args:
        low: smallest accepted answer.
        high: largest accepted answer.
        bonus: the reward of an answer in range.
    """

    def __init__(self, low: int = -100, high: int = 100, bonus: float = 1.0) -> None:
        if low > high:
            raise ValueError(f"AnswerInRange: low ({low}) must be <= high ({high})")
        self.low, self.high, self.bonus = low, high, bonus

    def __call__(self, completions: list[str], **_: Any) -> list[float]:
        """One reward per completion."""
        return [self.score(c) for c in completions]

    def score(self, completion: str) -> float:
        """``bonus`` for an in-range answer, 0 otherwise."""
        answer = extract_answer(completion)
        return self.bonus if answer is not None and self.low <= int(answer) <= self.high else 0.0
