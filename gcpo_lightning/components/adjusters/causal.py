"""GCPO's causal advantage weighting (paper Eq. 11): ``B_i = A_i * alpha * sim(z_i, Zbar_i - Zbar'_i + zbar)``."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from gcpo_lightning.functional.advantages import ScaleRewards, advantage_stats, group_normalize
from gcpo_lightning.functional.causal import SIMILARITIES, causal_target, causal_weights, weight_stats
from gcpo_lightning.interfaces.containers import Advantages, CausalGraph, Rollout
from gcpo_lightning.interfaces.protocols import RewardAdjuster

Similarity = Literal["cosine", "euclidean", "gaussian"]




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
