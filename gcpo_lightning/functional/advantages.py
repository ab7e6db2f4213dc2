"""GRPO's group-relative advantages as pure tensor maths (paper Eq. 8)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]


def group_normalize(
    rewards: Tensor,
    group_size: int,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
    batch_rewards: Tensor | None = None,
) -> Tensor:
    """``A_i = (r_i - mean_group(r)) / (std + eps)``, with TRL's ``scale_rewards`` choices.

    ``std`` is the unbiased standard deviation of the group (``"group"``), of the whole batch (``"batch"``,
    Dr. GRPO / "Understanding R1-Zero"; the batch is ``batch_rewards`` when given, i.e. every rank's rewards), or
    not divided at all (``"none"``).  ``[N] -> [N]``.
    """
    grouped = rewards.view(-1, group_size)  # [B, G]
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # [N]
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)  # [N]
    elif scale_rewards == "batch":
        std = (rewards if batch_rewards is None else batch_rewards).std().expand_as(rewards)  # [N]
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return centred / (std + eps)


def frac_zero_std(rewards: Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (they carry no learning signal)."""
    grouped = rewards.view(-1, group_size)  # [B, G]
    return (grouped.std(dim=1) < 1e-8).float().mean().item()


def advantage_stats(values: Tensor) -> dict[str, float]:
    """Mean, std, min and max of advantages for logging."""
    return {
        "advantages/mean": values.mean().item(),
        "advantages/std": values.std().item() if values.numel() > 1 else 0.0,
        "advantages/min": values.min().item(),
        "advantages/max": values.max().item(),
    }
