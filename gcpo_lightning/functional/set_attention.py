"""Attention over GCPO's contexts read as sets: one packed sequence per group (``context_layout: set``).

The paper defines ``x_i = {q, y_k : k != i, y_n}`` as a set. A group's candidates then appear once, in one block
``[P | L_0 | L_1 | ... | L_{G-1}]`` (``P`` the context's header with ``q``, ``L_k`` candidate ``k``'s line), in which
every line attends to ``P`` and to itself only: no candidate reads another, so the encoding of ``L_k`` is the same
in every context that contains it and is computed once per group. A *branch* (the rest of ``x_{i,l}``, then
whatever follows it) attends to ``P``, to every line but its own candidate's ``L_i``, and to itself. Positions are
those of the block, the branches continuing after the block's last token (a gap where ``L_i`` was).

Token codes (``[n, L]`` integer tensors, one entry per packed token):

- ``line``: ``SHARED`` (-1) on ``P``, ``k >= 0`` on candidate line ``k``, ``BRANCH`` (-3) on branch tokens,
  ``PAD`` (-2) on padding;
- ``hidden``: on branch tokens the line it must not see (its candidate ``i``); ignored elsewhere;
- ``branch``: on branch tokens the branch id (``>= 0``, distinct within a row); -1 elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

SHARED, PAD, BRANCH = -1, -2, -3


def set_attention_allowed(line: Tensor, hidden: Tensor, branch: Tensor) -> Tensor:
    """``[n, L, L]`` bool: may query token ``a`` attend to key token ``b`` (causal, the set rules above).

    Padding query rows attend to themselves only, so that no row of the softmax is empty.
    """
    L = line.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=line.device).tril()  # [L, L]
    q_line, k_line = line.unsqueeze(2), line.unsqueeze(1)  # [n, L, 1], [n, 1, L]
    q_branch, k_branch = branch.unsqueeze(2), branch.unsqueeze(1)
    k_is_line = k_line >= 0
    allowed = (
        (k_line == SHARED)  # the header: every token
        | (k_is_line & (q_line == k_line))  # a line: itself
        | (k_is_line & (q_line == BRANCH) & (hidden.unsqueeze(2) != k_line))  # the other lines: a branch
        | ((k_branch >= 0) & (q_branch == k_branch))  # a branch: itself
    )
    valid = line != PAD  # [n, L]
    allowed = allowed & causal & valid.unsqueeze(1) & valid.unsqueeze(2)  # [n, L, L]
    return allowed | torch.eye(L, dtype=torch.bool, device=line.device)


def set_attention_mask(line: Tensor, hidden: Tensor, branch: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive ``[n, 1, L, L]`` mask of :func:`set_attention_allowed` for a Hugging Face model (eager/sdpa)."""
    allowed = set_attention_allowed(line, hidden, branch)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=line.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def visible_lines(line: Tensor, own: Tensor) -> Tensor:
    """``[p, Lb]`` bool: the block tokens a context of candidate ``own`` (``[p]``) sees: ``P`` and the other lines."""
    return (line != PAD) & (line != own.unsqueeze(1))


def block_rows(group: Tensor) -> tuple[Tensor, Tensor]:
    """For rows ordered by group (``group`` ``[r]``, each group's rows consecutive): the first row of each run of
    one group ``[g]``, and each row's run ``[r]`` (0 .. g-1)."""
    local = torch.unique_consecutive(group, return_inverse=True)[1]  # [r]
    firsts = torch.cat([local.new_zeros(1), (local[1:] != local[:-1]).nonzero().squeeze(1) + 1])  # [g]
    return firsts, local


def visible_block_positions(line: Tensor, own: Tensor) -> tuple[Tensor, Tensor]:
    """Which block tokens a context of candidate ``own`` sees, gathered to the right in block order.

    Args:
        line: ``[p, Lb]`` block codes (``SHARED``, line indices, ``PAD``) of each context's group block.
        own: ``[p]`` the candidate whose line each context hides.

    Returns:
        ``(index [p, Lv], mask [p, Lv])``: block positions of the visible tokens, left-padded (``mask`` 0 where
        ``index`` is padding), ``Lv`` the most visible tokens of any context.
    """
    visible = visible_lines(line, own)  # [p, Lb]
    order = torch.sort(visible.int(), dim=1, stable=True).indices  # hidden/pad first, visible after, in order
    mask = visible.gather(1, order)  # [p, Lb]
    Lv = int(visible.sum(1).max())
    return order[:, -Lv:], mask[:, -Lv:].long()
