"""A lean KV-cached decoding loop: the sampler's default way to generate.

It does what group sampling needs and nothing else (temperature, top-p, top-k, EOS per row, early exit when
every row has finished), which on small models is ~2x faster than ``generate``'s general machinery. The
temperature and filtering are the same as ``generate``'s, so log-probs recomputed later match.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gcpo_lightning.components.scoring.logprobs import position_ids_from_mask


def filter_logits(logits: Tensor, top_p: float = 1.0, top_k: int = 0) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to ``-inf``.  ``[n, V] -> [n, V]``."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [n, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [n, V]
        cum = sorted_logits.softmax(-1).cumsum(-1)  # [n, V]
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: Tensor, temperature: float, top_p: float, top_k: int, greedy: bool) -> Tensor:
    """One token per row: argmax, or a sample from the tempered, filtered distribution.  ``[n, V] -> [n]``."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_p, top_k).softmax(-1)  # [n, V]
    return torch.multinomial(probs, 1).squeeze(-1)


@torch.no_grad()
def decode(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    min_new_tokens: int = 0,
) -> Tensor:
    """Generate up to ``max_new_tokens`` after left-padded prompts; rows stop at their first EOS.

    EOS cannot be sampled before ``min_new_tokens`` tokens (as ``generate``'s ``min_new_tokens``).

    Returns:
        ``[n, T]`` completion tokens (``T <= max_new_tokens``), ``pad_id`` after a row's EOS.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    mask = prompt_mask
    positions = position_ids_from_mask(mask)  # [n, P]
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    eos = torch.tensor(eos_ids, device=prompt_ids.device)
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)  # [n]
    tokens = []
    for t in range(max_new_tokens):
        logits = out.logits[:, -1]  # [n, V]
        if t < min_new_tokens:
            logits = logits.index_fill(-1, eos, float("-inf"))
        nxt = next_tokens(logits, temperature, top_p, top_k, greedy)  # [n]
        nxt = nxt.masked_fill(done, pad_id)
        tokens.append(nxt)
        done = done | torch.isin(nxt, eos)
        if done.all():
            break
        mask = torch.cat([mask, (~done).long().unsqueeze(1) | 1], dim=1)  # [n, P+t+1]
        positions = positions[:, -1:] + 1  # [n, 1]
        out = model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=True)
    return torch.stack(tokens, dim=1)  # [n, T]
