"""Padding token lists and generated chunks into tensors (the samplers' shared helpers)."""

from __future__ import annotations

import torch
from torch import Tensor


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Token lists as left-padded ``[n, L]`` ids and mask (``L`` >= 1)."""
    L = max(1, max(len(s) for s in seqs))
    ids = torch.tensor([[pad_id] * (L - len(s)) + s for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return ids, mask


def pad_cat(chunks: list[Tensor], pad_id: int) -> Tensor:
    """Concatenate ``[n_i, T_i]`` tensors along rows, right-padding to the longest ``T_i``."""
    T = max(c.shape[1] for c in chunks)
    padded = [torch.nn.functional.pad(c, (0, T - c.shape[1]), value=pad_id) for c in chunks]
    return torch.cat(padded)
