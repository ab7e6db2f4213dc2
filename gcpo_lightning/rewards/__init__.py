"""Reward functions ``fn(prompts, completions, **columns) -> list[float]`` and how they are combined."""

from gcpo_lightning.rewards.arithmetic import arithmetic_accuracy, arithmetic_format
from gcpo_lightning.rewards.base import RewardError, compute_rewards, reward_name
from gcpo_lightning.rewards.code import CodeExecution
from gcpo_lightning.rewards.math import MathAccuracy, TagFormat

__all__ = [
    "CodeExecution",
    "MathAccuracy",
    "RewardError",
    "TagFormat",
    "arithmetic_accuracy",
    "arithmetic_format",
    "compute_rewards",
    "reward_name",
]
