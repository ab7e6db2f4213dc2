"""GRPO's group normalisation with hand-derived numbers."""

from __future__ import annotations

import math

import pytest
import torch

from gcpo_lightning.components.adjusters.group_normalized import GroupNormalizedAdvantage
from gcpo_lightning.functional.advantages import frac_zero_std, group_normalize
from gcpo_lightning.interfaces.containers import CausalGraph


def test_group_scaling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    adv = group_normalize(rewards, 4, "group", eps=0.0)
    # group 1: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    # group 2: mean 0.75, deviations (.25, .25, .25, -.75), var = (3 * .0625 + .5625) / 3 = .25, std .5
    expected = torch.tensor([0.866025, -0.866025, -0.866025, 0.866025, 0.5, 0.5, 0.5, -1.5])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_batch_scaling_and_none():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    # batch mean 0.625; squared deviations 5 * .375^2 + 3 * .625^2 = 1.875; unbiased var 1.875 / 7; std 0.517549
    # completion 0: (1 - 0.5) / 0.517549 = 0.966092 (centred on its group mean, scaled by the batch std)
    adv = group_normalize(rewards, 4, "batch", eps=0.0)
    assert adv[0].item() == pytest.approx(0.5 / math.sqrt(1.875 / 7), rel=1e-5)
    none = group_normalize(rewards, 4, "none")
    torch.testing.assert_close(none, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]))


def test_equal_rewards_give_zero_advantage_and_count_as_zero_std():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])
    adv = group_normalize(rewards, 2, "group")
    assert adv[:2].abs().max().item() == 0.0
    assert frac_zero_std(rewards, 2) == 0.5


def test_adjuster_rejects_unknown_scale():
    with pytest.raises(ValueError, match="scale_rewards"):
        GroupNormalizedAdvantage(scale_rewards="groups")  # type: ignore[arg-type]


def test_adjuster_logs_stats():
    from types import SimpleNamespace

    out = GroupNormalizedAdvantage().adjust(torch.tensor([0.0, 1.0]), SimpleNamespace(group_size=2), CausalGraph(2))
    assert out.metrics["advantages/max"] == pytest.approx(1 / (math.sqrt(0.5) + 1e-4) * 0.5, rel=1e-4)
