"""GCPO's causal maths as pure tensor functions.

The causally projected target and the weights ``U_i`` (paper Eq. 11), the similarities they may use, and the
causally projected reference probability (Eq. 13). Shapes: ``N`` completions, ``M`` contexts, ``D`` hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine(z: Tensor, target: Tensor) -> Tensor:
    """``cos(z, target)`` per row, in ``[-1, 1]`` (the paper's choice).  ``[N, D], [N, D] -> [N]``."""
    return F.cosine_similarity(z, target, dim=-1)


def euclidean(z: Tensor, target: Tensor) -> Tensor:
    """``1 / (1 + ||z - target|| / sqrt(D))``, in ``(0, 1]``. **[decision]** the paper names no formula."""
    return 1.0 / (1.0 + (z - target).norm(dim=-1) / math.sqrt(z.shape[-1]))


def gaussian(z: Tensor, target: Tensor, sigma: float = 1.0) -> Tensor:
    """``exp(-||z - target||^2 / (2 sigma^2 D))``, in ``(0, 1]``. **[decision]** the paper names no formula."""
    return torch.exp(-(z - target).pow(2).sum(-1) / (2 * sigma**2 * z.shape[-1]))


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


def causal_weights(
    z: Tensor, target: Tensor, alpha: float, similarity: Callable[[Tensor, Tensor], Tensor] = cosine
) -> Tensor:
    """``U_i = alpha * sim(z_i, target_i)``, computed in fp32.  ``[N, D], [N, D] -> [N]``."""
    return alpha * similarity(z.float(), target.float())


def weight_stats(u: Tensor) -> dict[str, float]:
    """Distribution of the causal weights (the paper does not clip them, so watch them)."""
    return {
        "causal_weight/mean": u.mean().item(),
        "causal_weight/min": u.min().item(),
        "causal_weight/max": u.max().item(),
        "causal_weight/frac_negative": (u < 0).float().mean().item(),
    }


def projected_reference_probs(p_x: Tensor, p_phi: Tensor, p_q: Tensor, min_prob: float = 1e-6) -> tuple[Tensor, Tensor]:
    """The causally projected reference probability ``p'_ref`` (paper Eq. 13) and which tokens were clamped.

    Args:
        p_x: ``[N, T]`` ``p(y_t | x_{i,0}, y_<t)``.
        p_phi: ``[N, T]`` ``mean_l p(y_t | x_{i,l}, y_<t)`` (the paper omits the ``1/M``; a sum can go negative).
        p_q: ``[N, T]`` ``p(y_t | q, y_<t)``, the rollout policy's own probability.
        min_prob: lower clamp, so that the log and the ratio stay finite.

    Returns:
        ``(p_ref, clamped)``, both ``[N, T]``; computed in fp32.
    """
    raw = p_x.float() - p_phi.float() + p_q.float()  # [N, T]
    clamped = (raw < min_prob) | (raw > 1.0)
    return raw.clamp(min=min_prob, max=1.0), clamped
