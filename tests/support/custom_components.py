"""Components defined outside the package, to prove that ``class_path`` reaches user code."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gcpo_lightning.functional.advantages import group_normalize
from gcpo_lightning.interfaces.containers import Advantages, CausalGraph, Rollout
from gcpo_lightning.interfaces.protocols import RewardAdjuster


class ScaledAdvantage(RewardAdjuster):
    """Group-normalised advantages times a constant.

    Args:
        scale: multiplies every advantage.
    """

    def __init__(self, scale: float = 2.0) -> None:
        self.scale = scale

    def adjust(
        self, rewards: Tensor, rollout: Rollout, graph: CausalGraph, batch_rewards: Tensor | None = None
    ) -> Advantages:
        """``scale * A``."""
        return Advantages(values=self.scale * group_normalize(rewards, rollout.group_size))


def length_reward(completions: list[str], **_: Any) -> list[float]:
    """Longer completions score higher (``len / 10``), ties broken by content (``+ (sum of code points mod 10) / 100``):
    a random model's completions often all reach the length limit, and the content term keeps its advantages
    non-zero then."""
    return [len(c) / 10.0 + (sum(map(ord, c)) % 10) / 100.0 for c in completions]


def raising_reward(completions: list[str], **_: Any) -> list[float]:
    """Always fails."""
    raise KeyError("no such column")


def short_reward(completions: list[str], **_: Any) -> list[float]:
    """Returns one value too few."""
    return [0.0] * (len(completions) - 1)
