"""The loss maths with hand-derived numbers (derivations in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from gcpo_lightning.functional.losses import (
    clip_fractions,
    clipped_surrogate,
    constant_normalizer,
    k3,
    policy_loss,
    sequence_mean,
    token_mean,
)


def test_clipped_surrogate_positive_and_negative_advantage():
    ratio = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    adv = torch.tensor([2.0, -1.0])
    # A = 2, eps = 0.2:  R=0.5: min(1.0, 0.8*2=1.6) = 1.0;  R=1: 2.0;  R=1.5: min(3.0, 1.2*2=2.4) = 2.4
    # A = -1:            R=0.5: min(-0.5, 0.8*-1=-0.8) = -0.8;  R=1: -1.0;  R=1.5: min(-1.5, -1.2) = -1.5
    expected = torch.tensor([[1.0, 2.0, 2.4], [-0.8, -1.0, -1.5]])
    torch.testing.assert_close(clipped_surrogate(ratio, adv, 0.2, 0.2), expected)


def test_clip_higher_uses_epsilon_high():
    ratio = torch.tensor([[1.25]])
    # eps_high = 0.28: clip(1.25) = 1.25, so min(1.25*1, 1.25*1) = 1.25 (with eps_high 0.2 it would be 1.2)
    assert clipped_surrogate(ratio, torch.tensor([1.0]), 0.2, 0.28).item() == pytest.approx(1.25)
    assert clipped_surrogate(ratio, torch.tensor([1.0]), 0.2, 0.2).item() == pytest.approx(1.2)


def test_k3_values():
    # k3(u) = u - log u - 1:  u = 2 -> 2 - 0.693147 - 1 = 0.306853;  u = 1 -> 0;  u = 0.5 -> 0.5 + 0.693147 - 1
    log_u = torch.tensor([math.log(2.0), 0.0, math.log(0.5)])
    torch.testing.assert_close(k3(log_u), torch.tensor([0.306853, 0.0, 0.193147]), atol=1e-6, rtol=0)


def test_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # grpo: sequence means (1+2)/2 = 1.5 and 4/1 = 4, then their mean 2.75
    assert sequence_mean(per_token, mask, 4).item() == pytest.approx(2.75)
    # dapo: all unmasked tokens (1+2+4)/3 = 7/3
    assert token_mean(per_token, mask, 4).item() == pytest.approx(7 / 3)
    # dr_grpo: sum 7 over N * max_len = 2 * 4 = 8
    assert constant_normalizer(per_token, mask, 4).item() == pytest.approx(0.875)


def test_policy_loss_with_penalty():
    # ratio = 1 everywhere (logps == old), so surrogate = A per token; A = [1, -2]
    # per-token loss = -A + penalty = [[-1+0.1, -1+0.3], [2+0.2, 2+0.0]] = [[-0.9, -0.7], [2.2, 2.0]]
    # mask drops the last token of row 2 -> grpo: mean(-0.8, 2.2) = 0.7
    logps = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    penalty = torch.tensor([[0.1, 0.3], [0.2, 0.0]])
    loss, ratio = policy_loss(logps, logps, adv, mask, penalty, 0.2, 0.2, sequence_mean, 2)
    assert loss.item() == pytest.approx(0.7)
    torch.testing.assert_close(ratio, torch.ones_like(ratio))


def test_clip_fractions_count_only_gradient_removing_clips():
    ratio = torch.tensor([[0.7, 1.3, 1.0, 1.3]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # A < 0: the low clip (0.7 < 0.8) removes the gradient; the high side (1.3) does not for A < 0.
    fr = clip_fractions(ratio, torch.tensor([-1.0]), mask, 0.2, 0.2)
    assert fr["low"].item() == pytest.approx(1 / 3)
    assert fr["high"].item() == 0.0
    # A > 0: only ratio 1.3 on an unmasked token counts as a high clip
    fr = clip_fractions(ratio, torch.tensor([1.0]), mask, 0.2, 0.2)
    assert fr["high"].item() == pytest.approx(1 / 3)
    assert fr["region"].item() == pytest.approx(1 / 3)


def test_policy_loss_gradient_direction():
    # With ratio 1 and A > 0, d(loss)/d(logp) = -A / T for each token (grpo), pushing log-probs up.
    logps = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_(True)
    loss, _ = policy_loss(
        logps, logps.detach(), torch.tensor([2.0]), torch.ones(1, 2), None, 0.2, 0.2, sequence_mean, 2
    )
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.0, -1.0]]))
