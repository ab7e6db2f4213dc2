"""The loss maths as pure functions (paper Eq. 6, 7, 10; TRL's loss types and vLLM importance correction).

Shapes: ``N`` completions, ``T`` completion tokens. Objectives are maximised; losses are their negatives.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Aggregation = Callable[[Tensor, Tensor, int], Tensor]


def k3(log_u: Tensor) -> Tensor:
    """Schulman's k3 estimator ``u - log(u) - 1`` written in terms of ``log(u)`` (paper Eq. 7, 12).

    For the reference KL, ``log_u = log pi_ref - log pi_theta`` per token. Always ``>= 0``, zero iff ``u == 1``.
    """
    return torch.exp(log_u) - log_u - 1.0


def importance_ratio(logps: Tensor, old_logps: Tensor) -> Tensor:
    """``R = pi_theta / pi_old`` per token.  ``[N, T]``."""
    return torch.exp(logps - old_logps)


def clipped_surrogate(ratio: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float) -> Tensor:
    """PPO's clipped surrogate ``min(R*A, clip(R, 1-eps_low, 1+eps_high)*A)`` (paper Eq. 6, 10).

    Args:
        ratio: ``[N, T]`` importance ratios.
        advantages: ``[N]`` one advantage per completion, shared by its tokens.
        epsilon_low: lower clip range.
        epsilon_high: upper clip range (DAPO's clip-higher when larger than ``epsilon_low``).

    Returns:
        ``[N, T]`` the per-token surrogate objective.
    """
    adv = advantages.unsqueeze(1)  # [N, 1]
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)  # [N, T]
    return torch.minimum(ratio * adv, clipped * adv)


def clip_fractions(
    ratio: Tensor, advantages: Tensor, mask: Tensor, epsilon_low: float, epsilon_high: float
) -> dict[str, Tensor]:
    """Fractions of tokens whose gradient the clip removed, named as in TRL (``low``, ``high``, ``region``)."""
    adv = advantages.unsqueeze(1)  # [N, 1]
    low = (ratio < 1.0 - epsilon_low) & (adv < 0)  # [N, T]
    high = (ratio > 1.0 + epsilon_high) & (adv > 0)  # [N, T]
    denom = mask.sum().clamp(min=1)
    frac = lambda x: (x.float() * mask).sum() / denom  # noqa: E731
    return {"low": frac(low), "high": frac(high), "region": frac(low | high)}


def sequence_mean(per_token: Tensor, mask: Tensor, max_completion_length: int) -> Tensor:
    """GRPO / the paper: mean over each completion's tokens, then over completions (``mean_i mean_t``)."""
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [N]
    return per_seq.mean()


def token_mean(per_token: Tensor, mask: Tensor, max_completion_length: int) -> Tensor:
    """DAPO: mean over every completion token of the batch, so long completions weigh more."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def constant_normalizer(per_token: Tensor, mask: Tensor, max_completion_length: int) -> Tensor:
    """Dr. GRPO: sum over tokens divided by the constant ``N * max_completion_length`` (no length bias)."""
    return (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)


LOSS_TYPES: dict[str, Aggregation] = {"grpo": sequence_mean, "dapo": token_mean, "dr_grpo": constant_normalizer}
"""Aggregations by TRL's ``loss_type`` name."""


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    penalty: Tensor | None,
    epsilon_low: float,
    epsilon_high: float,
    aggregate: Aggregation,
    max_completion_length: int,
    sampler_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``-J``: the aggregated negative clipped surrogate plus the (already weighted) per-token penalty.

    ``J = agg[w * surr - penalty]`` with ``penalty = beta*KL_ref (+ kappa*KL_causal for GCPO)``, the paper's
    Eq. 10/12 with ``aggregate=sequence_mean`` (TRL's ``grpo``); ``LOSS_TYPES`` maps TRL's names to aggregations.
    ``w`` is 1 unless ``sampler_weights`` are given: the sampler/trainer mismatch correction ``pi_old / pi_sampler``
    (:func:`importance_weights`), which multiplies the surrogate term only, not the penalty, as TRL's
    ``vllm_importance_sampling_correction`` does.

    Args:
        sampler_weights: ``[N, T]`` per token or ``[N, 1]`` per sequence; ``None``: no correction.

    Returns:
        ``(loss, ratio)`` with ``ratio`` ``[N, T]`` for clip statistics.
    """
    ratio = importance_ratio(logps, old_logps)  # [N, T]
    per_token = -clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high)  # [N, T]
    if sampler_weights is not None:
        per_token = per_token * sampler_weights  # [N, T]: [N, 1] broadcasts over the tokens
    if penalty is not None:
        per_token = per_token + penalty
    return aggregate(per_token, mask, max_completion_length), ratio


IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
"""TRL's ``vllm_importance_sampling_mode`` values: per-token or per-sequence ratios, clipped or masked."""


def importance_weights(
    old_logps: Tensor,
    sampler_logps: Tensor,
    mask: Tensor,
    mode: str = "token_truncate",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> Tensor:
    """``pi_old / pi_sampler`` per token (``[N, T]``) or per sequence (``[N, 1]``), clipped or masked (TRL's modes).

    The correction of TRL's ``vllm_importance_sampling_correction`` for tokens sampled by another engine (vLLM)
    than the policy that scores them. ``*_truncate`` clamps the ratios into ``[clip_min, clip_max]``; ``*_mask``
    sets those outside to 0. A sequence ratio is ``exp(sum_t mask * (log pi_old - log pi_sampler))``. Padding
    tokens, and tokens whose sampler log-prob is NaN (not reported), have log-ratio 0, as in TRL.
    """
    if mode not in IS_MODES:
        raise ValueError(f"importance_weights: mode must be one of {IS_MODES}, got {mode!r}")
    diff = torch.nan_to_num((old_logps - sampler_logps) * mask, nan=0.0)  # [N, T]
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)  # [N, 1]
    ratio = diff.exp()
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def masked_mean(x: Tensor, mask: Tensor) -> float:
    """Mean of ``x`` over the tokens where ``mask`` is 1."""
    return ((x * mask).sum() / mask.sum().clamp(min=1)).item()
