"""``GroupSampler.sample_set``: GCPO's context samples with the contexts read as sets (``context_layout: set``).

The rows, ``K`` per context ``x_{i,l}``, are generated a few whole groups at a time (at most the sampler's
``generation_batch_size`` rows): each group's block is prefilled once and every context reuses its KV cache
(:mod:`gcpo_lightning.components.sampling.set_decoding`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gcpo_lightning.components.sampling.backends import SetBlocks
from gcpo_lightning.components.sampling.padding import left_pad, pad_cat
from gcpo_lightning.functional.batching import group_spans
from gcpo_lightning.functional.clock import wall_time
from gcpo_lightning.functional.set_attention import block_rows, visible_lines
from gcpo_lightning.interfaces.containers import PolicyModels, PromptCache, Rollout, SetContexts, cat_prompt_caches

if TYPE_CHECKING:
    from gcpo_lightning.components.sampling.group_sampler import GroupSampler


def context_tokens(contexts: SetContexts, n: int, m: int) -> list[int]:
    """The tokens of ``x_{n,l}`` in reading order: the visible block tokens (``P``, the other lines), the tail."""
    visible = visible_lines(contexts.block_line[n : n + 1], contexts.own[n : n + 1])[0]  # [Lb]
    return contexts.block_ids[n][visible].tolist() + contexts.tail_ids[n, m][contexts.tail_mask[n, m].bool()].tolist()


def chunk_blocks(contexts: SetContexts, candidates: list[int]) -> SetBlocks:
    """The blocks of the groups of ``candidates`` (consecutive, whole groups) and each candidate's context."""
    firsts, local = block_rows(contexts.group[candidates])  # [b] within the chunk, [p] each candidate's block
    rows = torch.tensor(candidates, device=firsts.device)[firsts]  # [b] a row of each block
    return SetBlocks(
        ids=contexts.block_ids[rows],
        line=contexts.block_line[rows],
        context_group=local,
        context_own=contexts.own[candidates],
    )


def sample_set(
    sampler: GroupSampler,
    models: PolicyModels,
    contexts: SetContexts,
    K: int,
    greedy: bool = False,
    continuations: list[list[int]] | None = None,
    keep_cache: list[int] | None = None,
) -> Rollout:
    """``K`` samples after every context ``x_{n,l}`` of ``contexts`` (rows in order ``(n, l, k)``), unscored.

    ``continuations`` (``N*M`` token lists, order ``(n, l)``) are scored teacher-forced after their context before
    decoding (``Rollout.continuation_logps``); ``keep_cache`` (indices ``n*M + l``) keeps those contexts' KV cache
    (``Rollout.prompt_cache``), as :meth:`GroupSampler.sample_shared` does.
    """
    N, M = contexts.tail_ids.shape[:2]
    if continuations is not None and len(continuations) != N * M:
        raise ValueError(f"sample_set: {len(continuations)} continuations for {N * M} contexts")
    device, pad = contexts.block_ids.device, models.tokenizer.pad_token_id
    sizes = torch.unique_consecutive(contexts.group, return_counts=True)[1].tolist()  # candidates per group
    step = sampler.generation_batch_size or N * M * K
    backend: Any = sampler.backend  # a backend with generate_set (checked by GroupSampler.sample_set)
    keep = set(keep_cache or [])
    start = wall_time()
    policy, was_training = models.policy, models.policy.training
    policy.eval()
    chunks, scored, caches, first = [], [], [], 0
    try:
        for g, last in group_spans([size * M * K for size in sizes], step):
            n = sum(sizes[g:last])  # candidates in this chunk
            candidates = list(range(first, first + n))
            prompts = [c * M + m for c in candidates for m in range(M)]  # (n, l) in this chunk
            tails = [
                contexts.tail_ids[p // M, p % M][contexts.tail_mask[p // M, p % M].bool()].tolist() for p in prompts
            ]
            tail_ids, tail_mask = left_pad(tails, pad, device)
            forced = (
                None if continuations is None else sampler.forced_continuations(models, continuations, prompts, K, keep)
            )
            owner = torch.arange(n, device=device).repeat_interleave(M * K)  # [rows] the context of each row
            tokens, out = backend.generate_set(
                models.policy,
                chunk_blocks(contexts, candidates),
                tail_ids.repeat_interleave(K, 0),
                tail_mask.repeat_interleave(K, 0),
                owner,
                sampler.decoding(models, greedy),
                forced=forced,
            )
            chunks.append(tokens)
            if out is not None:
                scored.append(out[0])
                if out[1] is not None:
                    caches.append(out[1])
            first += n
    finally:
        policy.train(was_training)
    return set_rollout(sampler, models, contexts, K, chunks, scored, caches, start)


def set_rollout(
    sampler: GroupSampler,
    models: PolicyModels,
    contexts: SetContexts,
    K: int,
    chunks: list[Tensor],
    scored: list[Tensor],
    caches: list[PromptCache],
    start: float,
) -> Rollout:
    """The rollout of :func:`sample_set`, its prompts the contexts' tokens in reading order."""
    N, M = contexts.tail_ids.shape[:2]
    tok = models.tokenizer
    seqs = [context_tokens(contexts, n, m) for n in range(N) for m in range(M)]  # N*M
    prompt_ids, prompt_mask = left_pad(seqs, tok.pad_token_id, contexts.block_ids.device)
    rollout = sampler.finish_rollout(
        models,
        tok.batch_decode(prompt_ids, skip_special_tokens=True),
        prompt_ids.repeat_interleave(K, 0),
        prompt_mask.repeat_interleave(K, 0),
        pad_cat(chunks, tok.pad_token_id),
        K,
        start,
        False,
    )
    rollout.continuation_logps = pad_cat(scored, 0) if scored else None
    rollout.prompt_cache = cat_prompt_caches(caches) if caches else None
    return rollout
