"""Score one completion under several contexts that share a prefix, in one forward pass per candidate.

For candidate ``i`` the ``M`` contexts ``x_{i,l}`` share ``q`` and the other candidates and differ only from
the integrated output on. One packed sequence ``[prefix | x_{i,0} suffix, y_i | x_{i,1} suffix, y_i | ...]`` with
a 4D additive attention mask (each branch sees the prefix and itself) and per-branch position ids gives exactly
the log-probs of ``M`` separate passes, while the long prefix is encoded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gcpo_lightning.components.scoring.logprobs import chunked_head_logps, final_states, lm_head


@dataclass
class PackedBranches:
    """One candidate's packed sequence: token ids, positions, the branch mask and where ``y`` is predicted."""

    ids: list[int]  # [L]
    positions: list[int]  # [L]
    branch: list[int]  # [L] -1 for the shared prefix, l for branch l
    predict_at: list[list[int]]  # [M][T_y] position whose logits predict y_t in branch l


def common_prefix_length(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix shared by all ``seqs``."""
    n = min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != seqs[0][k] for s in seqs[1:]):
            return k
    return n


def pack_branches(contexts: list[list[int]], completion: list[int]) -> PackedBranches:
    """Pack ``M`` contexts (token lists) that share a prefix, each followed by the same ``completion``."""
    c = min(common_prefix_length(contexts), min(len(x) for x in contexts) - 1)  # every branch keeps >= 1 token
    ids, positions, branch = list(contexts[0][:c]), list(range(c)), [-1] * c
    predict_at = []
    for b, ctx in enumerate(contexts):
        start = len(ids)
        suffix = ctx[c:] + completion[:-1]  # the last completion token predicts nothing we need
        ids += suffix
        positions += range(c, c + len(suffix))
        branch += [b] * len(suffix)
        first = start + len(ctx) - c - 1  # position predicting completion[0]
        predict_at.append([first + t for t in range(len(completion))])
    return PackedBranches(ids, positions, branch, predict_at)


def branch_attention_mask(branch: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive ``[n, 1, L, L]`` mask: causal, and a branch token sees only the prefix and its own branch.

    Args:
        branch: ``[n, L]`` branch index per token (-1 for the prefix).
        valid: ``[n, L]`` bool, False on right padding.
        dtype: the model's compute dtype.
    """
    L = branch.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=branch.device).tril()  # [L, L]
    q_branch, k_branch = branch.unsqueeze(2), branch.unsqueeze(1)  # [n, L, 1], [n, 1, L]
    same = (k_branch == -1) | (q_branch == k_branch)  # [n, L, L]
    allowed = causal & same & valid.unsqueeze(1) & valid.unsqueeze(2)  # [n, L, L]
    allowed |= torch.eye(L, dtype=torch.bool, device=branch.device)  # padding rows attend to themselves (no NaN)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=branch.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)  # [n, 1, L, L]


@torch.no_grad()
def shared_prefix_logps(
    model: nn.Module,
    contexts: list[list[list[int]]],
    completions: list[list[int]],
    temperature: float = 1.0,
    batch_size: int = 16,
) -> list[Tensor]:
    """``log p(y_t | x_l, y_<t)`` for each candidate and each of its contexts, one packed pass per candidate.

    Args:
        model: a Hugging Face causal LM that accepts a 4D additive attention mask (eager or sdpa attention).
        contexts: ``[n][M]`` token lists (no padding) of each candidate's contexts.
        completions: ``[n]`` token lists (no padding) of each candidate.
        temperature: the rollout temperature.
        batch_size: packed sequences per forward pass.

    Returns:
        ``n`` tensors of shape ``[M, T_y]`` (fp32).
    """
    packs = [pack_branches(ctx, y) for ctx, y in zip(contexts, completions)]
    out: list[Tensor] = []
    for s in range(0, len(packs), batch_size):
        out += _score_packs(model, packs[s : s + batch_size], completions[s : s + batch_size], temperature)
    return out


def _score_packs(
    model: nn.Module, packs: list[PackedBranches], ys: list[list[int]], temperature: float
) -> list[Tensor]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    L = max(len(p.ids) for p in packs)
    pad = lambda xs, v: torch.tensor([x + [v] * (L - len(x)) for x in xs], device=device)  # noqa: E731
    ids = pad([p.ids for p in packs], 0)  # [n, L]
    positions = pad([p.positions for p in packs], 0)  # [n, L]
    branch = pad([p.branch for p in packs], -2)  # [n, L] -2 marks padding
    mask = branch_attention_mask(branch, branch != -2, dtype)  # [n, 1, L, L]
    was_training = model.training
    model.eval()
    with final_states(model) as captured:
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=1 if captured else 0,
            output_hidden_states=not captured,
        )
    model.train(was_training)
    states = captured["states"] if captured else out.hidden_states[-1]  # [n, L, D] after the final norm
    results = []
    for k, (pack, y) in enumerate(zip(packs, ys)):
        at = torch.tensor(pack.predict_at, device=device)  # [M, T_y]
        target = torch.tensor(y, device=device).expand(at.shape[0], -1)  # [M, T_y]
        # the LM head only at the M x T_y positions that predict y, one branch at a time: never [n, L, V]
        results.append(chunked_head_logps(lm_head(model), states[k][at], target, temperature, chunk_size=1)[0])
    return results
