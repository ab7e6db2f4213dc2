"""GCPO's causal advantage weighting (paper Eq. 11): ``B_i = A_i * alpha * sim(z_i, Zbar_i - Zbar'_i + zbar)``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from gcpo_lightning.advantages import ScaleRewards, advantage_stats, group_normalize
from gcpo_lightning.containers import Advantages, CausalGraph, Rollout
from gcpo_lightning.protocols import RewardAdjuster

Similarity = Literal["cosine", "euclidean", "gaussian"]


def cosine(z: Tensor, target: Tensor, sigma: float) -> Tensor:
    """``cos(z, target)`` per row, in ``[-1, 1]`` (the paper's choice).  ``[N, D], [N, D] -> [N]``."""
    return F.cosine_similarity(z, target, dim=-1)


def euclidean(z: Tensor, target: Tensor, sigma: float) -> Tensor:
    """``1 / (1 + ||z - target|| / sqrt(D))``, in ``(0, 1]``. **[decision]** the paper names no formula."""
    return 1.0 / (1.0 + (z - target).norm(dim=-1) / math.sqrt(z.shape[-1]))


def gaussian(z: Tensor, target: Tensor, sigma: float) -> Tensor:
    """``exp(-||z - target||^2 / (2 sigma^2 D))``, in ``(0, 1]``. **[decision]** the paper names no formula."""
    return torch.exp(-(z - target).pow(2).sum(-1) / (2 * sigma**2 * z.shape[-1]))


SIMILARITIES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "cosine": cosine,
    "euclidean": euclidean,
    "gaussian": gaussian,
}


def group_mean(x: Tensor, group_size: int) -> Tensor:
    """Each group's mean, repeated for its members.  ``[N, D] -> [N, D]``."""
    means = x.view(-1, group_size, x.shape[-1]).mean(1)  # [B, D]
    return means.repeat_interleave(group_size, dim=0)  # [N, D]


def causal_target(z: Tensor, context_reps: Tensor | None, group_size: int) -> Tensor:
    """The causally projected prediction ``Zbar_i - Zbar'_i + zbar`` (paper Eq. 11).

    Args:
        z: ``[N, D]`` candidate representations ``z_i = rep(y_i)``.
        context_reps: ``[N, M, D]`` ``Zbar_{i,l}`` (mean rep of the K samples of context ``x_{i,l}``), or ``None``
            when the graph has no collider, in which case the target is ``zbar`` (the ``M = 1`` collapse).
        group_size: ``G``.

    Returns:
        ``[N, D]``.
    """
    zbar = group_mean(z, group_size)  # [N, D]: pi*(q)
    if context_reps is None:
        return zbar
    zbar_x = context_reps[:, 0]  # [N, D]: pi*(x_i) = Zbar_{i,0}
    zbar_phi = context_reps.mean(1)  # [N, D]: Phi pi*(x) = mean_l Zbar_{i,l}
    return zbar_x - zbar_phi + zbar


def causal_weights(z: Tensor, target: Tensor, alpha: float, similarity: str = "cosine", sigma: float = 1.0) -> Tensor:
    """``U_i = alpha * sim(z_i, target_i)``.  ``[N, D], [N, D] -> [N]``."""
    return alpha * SIMILARITIES[similarity](z.float(), target.float(), sigma)


def weight_stats(u: Tensor) -> dict[str, float]:
    """Distribution of the causal weights (the paper does not clip them, so watch them)."""
    return {
        "causal_weight/mean": u.mean().item(),
        "causal_weight/min": u.min().item(),
        "causal_weight/max": u.max().item(),
        "causal_weight/frac_negative": (u < 0).float().mean().item(),
    }


class CausalAdvantage(RewardAdjuster):
    """GCPO's advantage: the GRPO advantage re-weighted by closeness to the causally projected prediction.

    ``B_i = A_i * U_i`` with ``U_i = alpha * sim(z_i, Zbar_i - Zbar'_i + zbar)`` (paper Eq. 11). With a graph that
    has no collider (``IndependentResponses``) or with ``M = 1``, the target is ``zbar`` (``U_i = alpha cos(z_i,
    zbar)``): a cheap documented variant, not GCPO.

    Args:
        alpha: the weight scale (the paper uses 2).
        similarity: ``cosine`` (the paper's), ``euclidean`` or ``gaussian`` (the paper reports negligible
            differences; the formulas of the last two are our decision, see ``docs/algorithm.md``).
        sigma: bandwidth of the Gaussian similarity (on distances divided by ``sqrt(D)``).
        scale_rewards: how ``A`` is normalised, as in :class:`GroupNormalizedAdvantage`.
        eps: added to the standard deviation of ``A``.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        similarity: Similarity = "cosine",
        sigma: float = 1.0,
        scale_rewards: ScaleRewards = "group",
        eps: float = 1e-4,
    ) -> None:
        if similarity not in SIMILARITIES:
            raise ValueError(f"CausalAdvantage: similarity must be one of {sorted(SIMILARITIES)}, got {similarity!r}")
        if sigma <= 0:
            raise ValueError(f"CausalAdvantage: sigma must be > 0, got {sigma}")
        self.alpha, self.similarity, self.sigma = alpha, similarity, sigma
        self.scale_rewards, self.eps = scale_rewards, eps

    def adjust(
        self, rewards: Tensor, rollout: Rollout, graph: CausalGraph, batch_rewards: Tensor | None = None
    ) -> Advantages:
        """``B = A * U`` per completion, with the weights' distribution in the metrics."""
        if graph.representations is None:
            raise ValueError("CausalAdvantage needs candidate representations; the sampler must score the rollout")
        adv = group_normalize(rewards, rollout.group_size, self.scale_rewards, self.eps, batch_rewards)  # [N]
        target = causal_target(graph.representations, graph.context_representations, rollout.group_size)  # [N, D]
        u = causal_weights(graph.representations, target, self.alpha, self.similarity, self.sigma)  # [N]
        values = adv * u.to(adv.device)  # [N]
        return Advantages(values=values, metrics={**advantage_stats(values), **weight_stats(u)})
