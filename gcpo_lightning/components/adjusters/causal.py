"""GCPO's causal advantage weighting (paper Eq. 11): ``B_i = A_i * alpha * sim(z_i, Zbar_i - Zbar'_i + zbar)``."""

from __future__ import annotations

from torch import Tensor

from gcpo_lightning.components.adjusters.similarity import Cosine, Similarity
from gcpo_lightning.functional.advantages import ScaleRewards, advantage_stats, group_normalize
from gcpo_lightning.functional.causal import causal_target, causal_weights, weight_stats
from gcpo_lightning.interfaces.containers import Advantages, CausalGraph, Rollout
from gcpo_lightning.interfaces.protocols import RewardAdjuster


class CausalAdvantage(RewardAdjuster):
    """GCPO's advantage: the GRPO advantage re-weighted by closeness to the causally projected prediction.

    ``B_i = A_i * U_i`` with ``U_i = alpha * sim(z_i, Zbar_i - Zbar'_i + zbar)`` (paper Eq. 11). With a graph that
    has no collider (``IndependentResponses``) or with ``M = 1``, the target is ``zbar`` (``U_i = alpha cos(z_i,
    zbar)``): a cheap documented variant, not GCPO.

    Args:
        alpha: the weight scale (the paper uses 2).
        similarity: ``sim(z, target) -> [N]``: :class:`Cosine` (the paper's), :class:`Euclidean` or
            :class:`Gaussian` (the paper reports negligible differences; the formulas of the last two are our
            decision, see ``docs/algorithm.md``), or any callable of the same signature.
        scale_rewards: how ``A`` is normalised, as in :class:`GroupNormalizedAdvantage`.
        eps: added to the standard deviation of ``A``.
    """

    needs_context_samples = True  # reads Zbar_{i,l}, the mean representation of the context samples

    def __init__(
        self,
        alpha: float = 2.0,
        similarity: Similarity | None = None,
        scale_rewards: ScaleRewards = "group",
        eps: float = 1e-4,
    ) -> None:
        if similarity is not None and not callable(similarity):
            raise ValueError(f"CausalAdvantage: similarity must be callable (z, target) -> [N], got {similarity!r}")
        self.alpha = alpha
        self.similarity = Cosine() if similarity is None else similarity
        self.scale_rewards, self.eps = scale_rewards, eps

    def adjust(
        self, rewards: Tensor, rollout: Rollout, graph: CausalGraph, batch_rewards: Tensor | None = None
    ) -> Advantages:
        """``B = A * U`` per completion, with the weights' distribution in the metrics."""
        if graph.representations is None:
            raise ValueError("CausalAdvantage needs candidate representations; the sampler must score the rollout")
        adv = group_normalize(rewards, rollout.group_size, self.scale_rewards, self.eps, batch_rewards)  # [N]
        target = causal_target(graph.representations, graph.context_representations, rollout.group_size)  # [N, D]
        u = causal_weights(graph.representations, target, self.alpha, self.similarity)  # [N]
        values = adv * u.to(adv.device)  # [N]
        return Advantages(values=values, metrics={**advantage_stats(values), **weight_stats(u)})
