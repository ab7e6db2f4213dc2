"""How one rollout is cut into optimiser steps (mini-batches of whole groups) and forward passes (micro-batches)."""

from __future__ import annotations

import torch
from torch import Tensor


def mini_batches(n: int, group_size: int, size: int | None, device: torch.device | str = "cpu") -> list[Tensor]:
    """Completion indices of each optimiser step of one pass over ``n`` completions: whole groups, in a random
    group order when there are several steps (the rollout order when one step takes everything).

    Args:
        n: completions in the rollout (group-major, ``n = B * G``).
        group_size: ``G``.
        size: completions per optimiser step (a multiple of ``G``); ``None``: all ``n`` in one step.
        device: where the index tensors live.
    """
    size = size or n
    groups = torch.randperm(n // group_size) if size < n else torch.arange(n // group_size)  # [B]
    order = (groups.unsqueeze(1) * group_size + torch.arange(group_size)).view(-1)  # [N]
    return list(order.to(device).split(size))


def micro_batches(completion_mask: Tensor, size: int | None, token_weighted: bool) -> list[tuple[Tensor, float]]:
    """Chunks of ``size`` completions and the weight that makes their summed losses the mini-batch's loss.

    The weight is the chunk's share of completions (losses that average over completions: ``grpo``,
    ``dr_grpo``) or of completion tokens (``token_weighted``: ``dapo``'s token mean).

    Args:
        completion_mask: ``[n, T]`` of the mini-batch.
        size: completions per forward/backward pass; ``None``: the whole mini-batch at once.
        token_weighted: weigh chunks by their tokens instead of their completions.
    """
    n = completion_mask.shape[0]
    chunks = list(torch.arange(n, device=completion_mask.device).split(size or n))
    if token_weighted:
        tokens = completion_mask.sum(1).float()  # [n]
        return [(c, (tokens[c].sum() / tokens.sum().clamp(min=1)).item()) for c in chunks]
    return [(c, len(c) / n) for c in chunks]


def group_spans(rows: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive groups (``rows[g]`` rows each) cut into spans ``[start, end)`` of whole groups holding at most
    ``limit`` rows each; a group larger than ``limit`` gets a span of its own (generation calls of whole groups)."""
    spans, start = [], 0
    while start < len(rows):
        end, n = start, 0
        while end < len(rows) and (n == 0 or n + rows[end] <= limit):
            n, end = n + rows[end], end + 1
        spans.append((start, end))
        start = end
    return spans
