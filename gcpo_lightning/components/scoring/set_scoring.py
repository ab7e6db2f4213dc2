"""Score candidates under their contexts read as sets: one packed sequence per group (``context_layout: set``).

For the rows of one group the sequence is ``[block | tail_{r} y_r[:-1] | tail_{r'} y_{r'}[:-1] | ...]``: the group's
block ``[P | L_0 .. L_{G-1}]`` once, then one branch per scored row ``r`` (candidate ``i``, context ``l``): the tail
of ``x_{i,l}`` and the candidate's tokens. The mask of :mod:`gcpo_lightning.functional.set_attention` makes each
branch see ``P``, the lines other than ``L_i``, and itself, which is ``log p(y_i | x_{i,l})`` with ``x_{i,l}`` read
as a set. A group's ``G`` contexts cost one block plus ``G`` short branches instead of ``G`` full contexts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gcpo_lightning.components.scoring.logprobs import chunked_head_logps, final_states, lm_head
from gcpo_lightning.functional.set_attention import BRANCH, PAD, set_attention_mask
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

    One forward pass over one packed sequence per group (:func:`pack_sets`); gradients flow when grad is
    enabled (the causal KL's ``pi_theta(y_i | x_i)``), through the block and the branches alike. Positions past a
    completion's end hold the log-prob of token ``completion_ids[r, t]`` at an arbitrary position: mask them.
    """
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
