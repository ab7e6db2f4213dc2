"""Decode GCPO's context samples with the contexts read as sets (``context_layout: set``).

Each group's block ``[P | L_0 .. L_{G-1}]`` is prefilled once, every line attending only to ``P`` and itself
(:mod:`gcpo_lightning.functional.set_attention`). A context of candidate ``i`` is then that block's KV cache without
``L_i``'s positions (gathered, not recomputed), its tail prefilled on top at positions after the block's end; the
decode goes on as in :func:`~gcpo_lightning.components.sampling.decoding.decode`. A group's ``G`` contexts cost one
block prefill instead of ``G`` prefills of ``q`` and ``G - 1`` candidates each.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gcpo_lightning.components.sampling.decoding import (
    Forced,
    preallocate_cache,
    score_forced_rows,
    score_then_decode,
)
from gcpo_lightning.components.sampling.set_cascade import SharedBlocks, cascade_attention, supports_cascade
from gcpo_lightning.components.scoring.set_scoring import gather_visible, prefill_blocks
from gcpo_lightning.functional.set_attention import PAD, visible_block_positions, visible_lines
from gcpo_lightning.interfaces.containers import PromptCache


def tail_positions(block_line: Tensor, context_group: Tensor, owner: Tensor, tail_mask: Tensor) -> Tensor:
    """``[n, Lt]`` positions of the rows' left-padded tails: after the whole block (a gap where the hidden line was)."""
    block_length = (block_line != PAD).sum(1)[context_group][owner]  # [n]
    return block_length.unsqueeze(1) + (tail_mask.cumsum(1) - 1).clamp(min=0)


def prefill_set(
    model: nn.Module,
    block_ids: Tensor,
    block_line: Tensor,
    context_group: Tensor,
    context_own: Tensor,
    tail_ids: Tensor,
    tail_mask: Tensor,
    owner: Tensor,
    room: int,
):
    """Prefill the blocks, gather each context's visible block positions, prefill the rows' tails on top.

    Args:
        block_ids: ``[b, Lb]`` right-padded group blocks.
        block_line: ``[b, Lb]`` their line codes (``PAD`` on padding).
        context_group: ``[p]`` the block of each context prefix (candidate).
        context_own: ``[p]`` the line each context prefix hides.
        tail_ids: ``[n, Lt]`` left-padded tails of the rows (at least one real token each).
        tail_mask: ``[n, Lt]``.
        owner: ``[n]`` the context prefix of each row.
        room: tokens to be decoded after the tails.

    Returns:
        ``(logits [n, V] predicting each row's first new token, the cache, the rows' attention mask [n, Lv+Lt],
        their last position [n, 1])``, as :func:`~gcpo_lightning.components.sampling.decoding.prefill_shared`.
    """
    cache = prefill_blocks(model, block_ids, block_line)
    index, prefix_mask = visible_block_positions(block_line[context_group], context_own)  # [p, Lv] twice
    gather_visible(cache, context_group, index)  # [b, h, Lb, d] -> [p, h, Lv, d]
    preallocate_cache(cache, tail_ids.shape[1] + room, rows=owner)
    mask = torch.cat([prefix_mask[owner], tail_mask], dim=1)  # [n, Lv+Lt]
    positions = tail_positions(block_line, context_group, owner, tail_mask)  # [n, Lt]
    out = model(
        input_ids=tail_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
    )
    return out.logits[:, -1], cache, mask, positions[:, -1:]


def prefill_set_cascade(
    model: nn.Module,
    block_ids: Tensor,
    block_line: Tensor,
    context_group: Tensor,
    context_own: Tensor,
    tail_ids: Tensor,
    tail_mask: Tensor,
    owner: Tensor,
    room: int,
):
    """As :func:`prefill_set`, the blocks' KV cache kept once (:class:`SharedBlocks`, read by cascade attention) and
    the rows' cache holding only their tails. Returns ``(logits, cache, mask [n, Lt], positions [n, 1], shared)``."""
    from transformers import DynamicCache

    blocks = prefill_blocks(model, block_ids, block_line)
    shared = SharedBlocks(
        keys=[layer.keys for layer in blocks.layers],
        values=[layer.values for layer in blocks.layers],
        group=context_group[owner],
        visible=visible_lines(block_line[context_group][owner], context_own[owner]),  # [n, Lb]
    )
    cache: Any = DynamicCache()
    positions = tail_positions(block_line, context_group, owner, tail_mask)  # [n, Lt]
    with cascade_attention(model, shared):
        out = model(
            input_ids=tail_ids,
            attention_mask=tail_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    preallocate_cache(cache, room)
    cache.shared_blocks = shared  # the decode loop's compaction keeps it in step with the rows
    return out.logits[:, -1], cache, tail_mask, positions[:, -1:], shared


@torch.no_grad()
def decode_set(
    model: nn.Module,
    block_ids: Tensor,
    block_line: Tensor,
    context_group: Tensor,
    context_own: Tensor,
    tail_ids: Tensor,
    tail_mask: Tensor,
    owner: Tensor,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    min_new_tokens: int = 0,
    forced: Forced | None = None,
    compact: float | None = 0.25,
    cascade: bool = True,
) -> tuple[Tensor, tuple[Tensor, PromptCache | None] | None]:
    """Samples after contexts read as sets (arguments as :func:`prefill_set`; ``forced``, ``compact`` and the
    return value as :func:`~gcpo_lightning.components.sampling.decoding.decode_shared_prefix`).

    ``cascade`` (on CPU, :func:`supports_cascade`) reads each group's block once per step by cascade attention
    (:mod:`~gcpo_lightning.components.sampling.set_cascade`) instead of from a copy in every row's KV cache: the
    same numbers to float rounding; it cannot return the contexts' KV cache (``forced.keep``).
    """
    args = (model, block_ids, block_line, context_group, context_own, tail_ids, tail_mask, owner, max_new_tokens)
    settings = (max_new_tokens, eos_ids, pad_id, temperature, top_p, top_k, greedy, min_new_tokens, compact)
    if not (cascade and supports_cascade(model)):
        return score_then_decode(model, prefill_set(*args), tail_ids, forced, *settings)
    if forced is not None and forced.keep is not None:
        raise ValueError("decode_set: cascade attention does not keep the contexts' KV cache (forced.keep)")
    logits, cache, mask, positions, shared = prefill_set_cascade(*args)
    scored = None
    if forced is not None:
        with cascade_attention(model, shared.select(forced.rows)):
            scored = score_forced_rows(model, cache, logits, mask, positions, tail_ids, forced)
    with cascade_attention(model, shared):
        tokens, _ = score_then_decode(model, (logits, cache, mask, positions), tail_ids, None, *settings)
    return tokens, scored
