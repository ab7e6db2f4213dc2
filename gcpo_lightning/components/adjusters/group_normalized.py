"""GRPO's group-relative advantages (paper Eq. 8)."""

from __future__ import annotations

from torch import Tensor

from gcpo_lightning.functional.advantages import ScaleRewards, advantage_stats, group_normalize
from gcpo_lightning.interfaces.containers import Advantages, CausalGraph, Rollout
from gcpo_lightning.interfaces.protocols import RewardAdjuster


class GroupNormalizedAdvantage(RewardAdjuster):
    """GRPO: rewards normalised within each group; every completion is treated as independent.

    Args:
        scale_rewards: ``"group"`` (GRPO, paper Eq. 8), ``"batch"`` or ``"none"`` (Dr. GRPO), as in TRL.
        eps: added to the standard deviation (TRL uses 1e-4).
    """

    needs_representations = False  # reads rewards only

    def __init__(self, scale_rewards: ScaleRewards = "group", eps: float = 1e-4) -> None:
        if scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"GroupNormalizedAdvantage: scale_rewards must be group/batch/none, got {scale_rewards!r}")
        self.scale_rewards = scale_rewards
        self.eps = eps

    def adjust(
        self, rewards: Tensor, rollout: Rollout, graph: CausalGraph, batch_rewards: Tensor | None = None
    ) -> Advantages:
        """Group-normalised advantages ``A``; the causal graph is not used."""
        values = group_normalize(rewards, rollout.group_size, self.scale_rewards, self.eps, batch_rewards)
        return Advantages(values=values, metrics=advantage_stats(values))
