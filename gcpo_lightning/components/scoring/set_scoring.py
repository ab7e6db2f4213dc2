"""Score candidates under their contexts read as sets (``context_layout: set``).

For the rows of one group the sequence is ``[block | tail_{r} y_r[:-1] | tail_{r'} y_{r'}[:-1] | ...]``: the group's
block ``[P | L_0 .. L_{G-1}]`` once, then one branch per scored row ``r`` (candidate ``i``, context ``l``): the tail
of ``x_{i,l}`` and the candidate's tokens. The mask of :mod:`gcpo_lightning.functional.set_attention` makes each
branch see ``P``, the lines other than ``L_i``, and itself, which is ``log p(y_i | x_{i,l})`` with ``x_{i,l}`` read
as a set. A group's ``G`` contexts cost one block plus ``G`` short branches instead of ``G`` full contexts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gcpo_lightning.components.scoring.logprobs import chunked_head_logps, final_states, lm_head
from gcpo_lightning.functional.set_attention import (
    BRANCH,
    PAD,
    block_rows,
    set_attention_mask,
    visible_block_positions,
)
from gcpo_lightning.interfaces.containers import SetContexts


@dataclass
class PackedSets:
    """Packed sequences (one per group) and where each scored row's completion is predicted."""

    ids: Tensor  # [g, L] right-padded tokens
    positions: Tensor  # [g, L]
    line: Tensor  # [g, L] set_attention codes
    hidden: Tensor  # [g, L] the line each branch token hides
    branch: Tensor  # [g, L] branch id of each branch token, -1 elsewhere
    sequence: Tensor  # [r] the packed sequence of each scored row
    predict_at: Tensor  # [r, T] position predicting completion token t (0 past the completion's end)


def pack_sets(contexts: SetContexts, tails: Tensor, completion_ids: Tensor, completion_mask: Tensor) -> PackedSets:
    """Pack the rows of ``contexts`` (each with its context ``tails[r]`` and completion) by group.

    Args:
        contexts: ``r`` rows (candidates; the same candidate may appear with several tails).
        tails: ``[r]`` which context ``l`` of each row.
        completion_ids: ``[r, T]`` right-padded completions ``y``.
        completion_mask: ``[r, T]``.
    """
    device, T = completion_ids.device, completion_ids.shape[1]
    seqs: dict[int, dict[str, list[int]]] = {}
    sequence, predict_at = [], []
    for r in range(completion_ids.shape[0]):
        g = int(contexts.group[r])
        if g not in seqs:  # the group's block, once
            real = contexts.block_line[r] != PAD
            block = contexts.block_ids[r][real].tolist()
            seqs[g] = {
                "ids": block,
                "positions": list(range(len(block))),
                "line": contexts.block_line[r][real].tolist(),
                "hidden": [-1] * len(block),
                "branch": [-1] * len(block),
            }
        s, branch_id = seqs[g], len({b for b in seqs[g]["branch"] if b >= 0})
        tail_l = int(tails[r])
        tail = contexts.tail_ids[r, tail_l][contexts.tail_mask[r, tail_l].bool()].tolist()
        y = completion_ids[r][completion_mask[r].bool()].tolist()
        tokens = tail + y[:-1]
        start, first_position = len(s["ids"]), len([x for x in s["line"] if x != BRANCH])  # after the block
        s["ids"] += tokens
        s["positions"] += range(first_position, first_position + len(tokens))
        s["line"] += [BRANCH] * len(tokens)
        s["hidden"] += [int(contexts.own[r])] * len(tokens)
        s["branch"] += [branch_id] * len(tokens)
        first = start + len(tail) - 1  # the last tail token predicts y_0
        at = [first + t for t in range(len(y))]
        predict_at.append(at + [0] * (T - len(at)))
        sequence.append(list(seqs).index(g))
    L = max(len(s["ids"]) for s in seqs.values())

    def pad(key: str, value: int) -> Tensor:
        return torch.tensor([s[key] + [value] * (L - len(s[key])) for s in seqs.values()], device=device)

    return PackedSets(
        ids=pad("ids", 0),
        positions=pad("positions", 0),
        line=pad("line", PAD),
        hidden=pad("hidden", -1),
        branch=pad("branch", -1),
        sequence=torch.tensor(sequence, device=device),
        predict_at=torch.tensor(predict_at, dtype=torch.long, device=device).view(-1, T),
    )


def packed_set_logps(
    model: nn.Module,
    contexts: SetContexts,
    tails: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 16,
) -> Tensor:
    """:func:`set_context_logps` as one forward pass over one packed sequence per group (:func:`pack_sets`), every
    branch masked from the others: the plainest statement of the layout, which :func:`set_context_logps` (cheaper:
    it computes no attention between branches) is tested against.  ``[r, T]``."""
    packed = pack_sets(contexts, tails, completion_ids, completion_mask)
    dtype = next(model.parameters()).dtype
    mask = set_attention_mask(packed.line, packed.hidden, packed.branch, dtype)  # [g, 1, L, L]
    with final_states(model) as captured:
        out = model(
            input_ids=packed.ids,
            attention_mask=mask,
            position_ids=packed.positions,
            use_cache=False,
            logits_to_keep=1 if captured else 0,
            output_hidden_states=not captured,
        )
    states = captured["states"] if captured else out.hidden_states[-1]  # [g, L, D] after the final norm
    rows = states[packed.sequence.unsqueeze(1), packed.predict_at]  # [r, T, D]
    return chunked_head_logps(lm_head(model), rows, completion_ids, temperature, chunk_size)[0]  # [r, T]


def prefill_blocks(model: nn.Module, block_ids: Tensor, block_line: Tensor) -> Any:
    """One forward pass over right-padded group blocks ``[b, Lb]`` (set attention) into a new ``DynamicCache``; with
    gradient when grad is enabled (the causal KL's pass), without during generation."""
    from transformers import DynamicCache

    cache = DynamicCache()
    none = torch.full_like(block_line, -1)
    model(
        input_ids=block_ids,
        attention_mask=set_attention_mask(block_line, none, none, next(model.parameters()).dtype),  # [b, 1, Lb, Lb]
        position_ids=torch.arange(block_ids.shape[1], device=block_ids.device).expand_as(block_ids),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return cache


def gather_visible(cache: Any, block: Tensor, index: Tensor) -> None:
    """Replace every layer of a blocks' ``cache`` (``[b, h, Lb, d]``) by each context's visible positions, in place:
    ``block`` ``[p]`` the block of each context, ``index`` ``[p, Lv]`` its positions
    (:func:`~gcpo_lightning.functional.set_attention.visible_block_positions`); ``[p, h, Lv, d]``, differentiable."""
    gather = index[:, None, :, None]
    for layer in cache.layers:
        keys, values = layer.keys[block], layer.values[block]
        layer.keys = keys.gather(2, gather.expand(-1, keys.shape[1], -1, keys.shape[-1]))
        layer.values = values.gather(2, gather.expand(-1, values.shape[1], -1, values.shape[-1]))


def set_context_logps(
    model: nn.Module,
    contexts: SetContexts,
    tails: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 16,
) -> Tensor:
    """``log p(y_t | x_{i,l}, y_<t)`` of each row's completion under its context read as a set.  ``[r, T]``.

    Two passes: the rows' group blocks into a KV cache (once per group), each row's visible block positions
    gathered from it, then every row's branch ``[tail | y[:-1]]`` on top of its gathered cache, so that a branch
    attends to its own context and itself only. Gradients flow when grad is enabled (the causal KL's
    ``pi_theta(y_i | x_i)``), through the blocks and the branches alike. Equals :func:`packed_set_logps` to float
    rounding, values and gradient (tested). Positions past a completion's end hold the log-prob of
    ``completion_ids[r, t]`` at an arbitrary position: mask them.
    """
    device, T = completion_ids.device, completion_ids.shape[1]
    firsts, local = block_rows(contexts.group)  # [g], [r]
    block_line = contexts.block_line[firsts]  # [g, Lb]
    cache = prefill_blocks(model, contexts.block_ids[firsts], block_line)
    index, prefix_mask = visible_block_positions(block_line[local], contexts.own)  # [r, Lv] twice
    gather_visible(cache, local, index)  # [g, h, Lb, d] -> [r, h, Lv, d]
    branches, starts, lengths = [], [], []
    for r in range(completion_ids.shape[0]):
        tail = contexts.tail_ids[r, int(tails[r])][contexts.tail_mask[r, int(tails[r])].bool()].tolist()
        y = completion_ids[r][completion_mask[r].bool()].tolist()
        branches.append(tail + y[:-1])
        starts.append(len(tail) - 1)  # the last tail token predicts y_0
        lengths.append(len(y))
    Ls = max(len(b) for b in branches)
    ids = torch.tensor([b + [0] * (Ls - len(b)) for b in branches], device=device)  # [r, Ls] right-padded
    branch_mask = torch.tensor([[1] * len(b) + [0] * (Ls - len(b)) for b in branches], device=device)
    block_length = (block_line != PAD).sum(1)[local]  # [r] the branch continues after the whole block
    with final_states(model) as captured:
        out = model(
            input_ids=ids,
            attention_mask=torch.cat([prefix_mask, branch_mask], dim=1),
            position_ids=block_length.unsqueeze(1) + torch.arange(Ls, device=device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1 if captured else 0,
            output_hidden_states=not captured,
        )
    states = captured["states"] if captured else out.hidden_states[-1]  # [r, Ls, D]
    at = torch.tensor(
        [[s + t if t < n else 0 for t in range(T)] for s, n in zip(starts, lengths)], dtype=torch.long, device=device
    )  # [r, T]
    rows = states.gather(1, at.unsqueeze(-1).expand(-1, -1, states.shape[-1]))  # [r, T, D]
    return chunked_head_logps(lm_head(model), rows, completion_ids, temperature, chunk_size)[0]  # [r, T]
