"""A lean KV-cached decoding loop: the sampler's default way to generate.

It does what group sampling needs and nothing else (temperature, top-p, top-k, EOS per row, early exit when
every row has finished), which on small models is ~2x faster than ``generate``'s general machinery. The
temperature and filtering are the same as ``generate``'s, so log-probs recomputed later match.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gcpo_lightning.components.scoring.logprobs import chunked_head_logps, final_states, lm_head, position_ids_from_mask
from gcpo_lightning.interfaces.containers import PromptCache


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


def next_tokens(
    logits: Tensor, temperature: float, top_p: float, top_k: int, greedy: bool, uniform: Tensor | None = None
) -> Tensor:
    """One token per row: argmax, or a sample from the tempered, filtered distribution.  ``[n, V] -> [n]``.

    Sampling inverts each row's CDF at ``uniform`` (``[n]`` draws in ``[0, 1)``; fresh ones when ``None``): the same
    distribution as ``torch.multinomial``, with one draw per row that the caller controls, so that a batch whose
    finished rows were dropped (:func:`decode_loop`'s compaction) samples exactly the tokens the full batch would.
    """
    if greedy or temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_p, top_k).softmax(-1)  # [n, V]
    if uniform is None:
        uniform = torch.rand(probs.shape[0], device=probs.device)
    cdf = probs.cumsum(-1)  # [n, V]
    target = (uniform.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)  # [n, 1]
    # the first token whose CDF exceeds the draw; a token of probability 0 never does before its predecessor
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


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
    preallocate: bool = True,
    compact: float | None = 0.25,
) -> Tensor:
    """Generate up to ``max_new_tokens`` after left-padded prompts; rows stop at their first EOS.

    EOS cannot be sampled before ``min_new_tokens`` tokens (as ``generate``'s ``min_new_tokens``).
    ``preallocate`` writes the KV cache into buffers sized for the whole generation instead of growing it by
    concatenation each step (the same numbers; on CPU the concatenations were ~25 % of a long-prompt decode).
    ``compact`` drops finished rows from the batch (see :func:`decode_loop`; the same tokens).

    Returns:
        ``[n, T]`` completion tokens (``T <= max_new_tokens``), ``pad_id`` after a row's EOS.
    """
    logits, cache, last_position = prefill(model, prompt_ids, prompt_mask)
    if preallocate:
        preallocate_cache(cache, max_new_tokens)
    return decode_loop(
        model,
        logits,
        cache,
        prompt_mask,
        last_position,
        max_new_tokens,
        eos_ids,
        pad_id,
        temperature,
        top_p,
        top_k,
        greedy,
        min_new_tokens,
        compact,
    )


@dataclass(frozen=True)
class Forced:
    """Continuations scored teacher-forced after some rows' prompts, on the KV cache the decode prefilled.

    GCPO's ``p(y_i | x_{i,l})``: the candidate ``y_i`` after the context ``x_{i,l}`` whose samples are being
    generated, without encoding ``x_{i,l}`` a second time.
    """

    rows: Tensor  # [f] the row whose prompt each continuation follows
    ids: Tensor  # [f, T] right-padded continuation tokens
    temperature: float = 1.0  # divides the logits, as in generation
    chunk_size: int = 16  # rows per LM-head chunk
    keep: Tensor | None = None  # [k] continuations (indices into rows) whose prompt's KV cache is returned


@torch.no_grad()
def decode_shared_prefix(
    model: nn.Module,
    prefix_ids: Tensor,
    prefix_mask: Tensor,
    suffix_ids: Tensor,
    suffix_mask: Tensor,
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
) -> tuple[Tensor, tuple[Tensor, PromptCache | None] | None]:
    """:func:`decode` for rows ``[prefix_ids[owner[r]] | suffix_ids[r]]``, encoding each distinct prefix once.

    The prefixes are prefilled together, their KV cache is copied to the rows that share them (``owner``), the
    suffixes are prefilled on top, then decoding continues as in :func:`decode`. The attention inputs of every
    row are those of the concatenated prompt (padding in the middle is masked, positions skip it), so the output
    equals :func:`decode` on ``[prefix | suffix]`` up to float rounding (same tokens under greedy decoding).

    Args:
        prefix_ids: ``[p, Lp]`` left-padded distinct prefixes.
        prefix_mask: ``[p, Lp]``.
        suffix_ids: ``[n, Ls]`` left-padded suffixes, each with at least one real token.
        suffix_mask: ``[n, Ls]``.
        owner: ``[n]`` the prefix of each row.
        forced: continuations to score after some rows' prompts before decoding (:func:`score_forced`).
        compact: see :func:`decode_loop`.

    Returns:
        ``([n, T] completion tokens, (the forced continuations' [f, T_forced] log-probs, the KV cache of the
        prompts ``forced.keep`` names) or None)``.
    """
    prefilled = prefill_shared(model, prefix_ids, prefix_mask, suffix_ids, suffix_mask, owner, max_new_tokens)
    settings = (max_new_tokens, eos_ids, pad_id, temperature, top_p, top_k, greedy, min_new_tokens, compact)
    return score_then_decode(model, prefilled, suffix_ids, forced, *settings)


def score_then_decode(
    model: nn.Module,
    prefilled: tuple,
    suffix_ids: Tensor,
    forced: Forced | None,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float,
    top_p: float,
    top_k: int,
    greedy: bool,
    min_new_tokens: int,
    compact: float | None,
) -> tuple[Tensor, tuple[Tensor, PromptCache | None] | None]:
    """After a prefill ``(logits, cache, mask, positions)`` of rows ending in ``suffix_ids``: score the ``forced``
    continuations on a copy of the cache (:func:`score_forced_rows`), then decode (:func:`decode_loop`)."""
    logits, cache, mask, positions = prefilled
    scored = None if forced is None else score_forced_rows(model, cache, logits, mask, positions, suffix_ids, forced)
    tokens = decode_loop(
        model,
        logits,
        cache,
        mask,
        positions,
        max_new_tokens,
        eos_ids,
        pad_id,
        temperature,
        top_p,
        top_k,
        greedy,
        min_new_tokens,
        compact,
    )
    return tokens, scored


def prefill(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor):
    """One forward pass over left-padded prompts into a new ``DynamicCache``.

    Returns ``(logits [n, V] predicting each row's first new token, the filled cache, the last position [n, 1])``.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    positions = position_ids_from_mask(prompt_mask)  # [n, P]
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1], cache, positions[:, -1:]


def score_forced_rows(
    model: nn.Module, cache, logits: Tensor, mask: Tensor, positions: Tensor, suffix_ids: Tensor, forced: Forced
) -> tuple[Tensor, PromptCache | None]:
    """:func:`score_forced` on a copy of the prefilled rows ``forced.rows`` of ``cache`` (the decode goes on from
    the original): ``logits`` ``[n, V]``, ``mask`` ``[n, L]``, ``positions`` ``[n, 1]`` and ``suffix_ids``
    ``[n, Ls]`` are :func:`prefill_shared`'s."""
    rows = forced.rows
    return score_forced(
        model,
        [layer.keys.index_select(0, rows) for layer in cache.layers],
        [layer.values.index_select(0, rows) for layer in cache.layers],
        mask[rows],
        positions[rows],
        suffix_ids[rows, -1],
        logits[rows],
        forced,
    )


def prefill_shared(
    model: nn.Module,
    prefix_ids: Tensor,
    prefix_mask: Tensor,
    suffix_ids: Tensor,
    suffix_mask: Tensor,
    owner: Tensor,
    room: int,
):
    """Prefill distinct prefixes once, fork their KV cache to the rows (``owner``), prefill the suffixes on top.

    Returns ``(logits [n, V] predicting each row's next token, the cache with room for ``room`` more tokens,
    the rows' attention mask [n, Lp+Ls], their last position [n, 1])``.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    model(
        input_ids=prefix_ids,
        attention_mask=prefix_mask,
        position_ids=position_ids_from_mask(prefix_mask),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    preallocate_cache(cache, suffix_ids.shape[1] + room, rows=owner)
    mask = torch.cat([prefix_mask[owner], suffix_mask], dim=1)  # [n, Lp+Ls]
    positions = position_ids_from_mask(mask)[:, prefix_ids.shape[1] :]  # [n, Ls]
    out = model(
        input_ids=suffix_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
    )
    return out.logits[:, -1], cache, mask, positions[:, -1:]


def score_forced(
    model: nn.Module,
    keys: list[Tensor],
    values: list[Tensor],
    mask: Tensor,
    last_position: Tensor,
    last_token: Tensor,
    logits: Tensor,
    forced: Forced,
) -> tuple[Tensor, PromptCache | None]:
    """``log p(c_t | prompt, c_<t)`` of each forced continuation ``c`` after its row's prefilled prompt.

    ``keys``/``values`` (per layer ``[f, h, L, d]``), ``mask`` ``[f, L]``, ``last_position`` ``[f, 1]``,
    ``last_token`` ``[f]`` and ``logits`` ``[f, V]`` are the forced rows' prompt cache (a copy: the decode goes on
    from the original), its mask, its last position and token, and the logits predicting ``c_0``. One pass over
    ``c[:-1]`` on the copy predicts the rest, through the LM head in row chunks. Equals a teacher-forced pass over
    ``[prompt | c]`` to float rounding.

    Returns:
        ``[f, T]`` fp32 log-probs (padding positions hold values for the pad tokens; mask them), and the KV cache
        of the prompts of the continuations ``forced.keep`` names (without their last token, as
        :class:`~gcpo_lightning.interfaces.containers.PromptCache` holds them) or ``None``.
    """
    from transformers import DynamicCache

    ids, T = forced.ids, forced.ids.shape[1]
    first = (logits.float() / forced.temperature).log_softmax(-1).gather(-1, ids[:, :1])  # [f, 1]
    kept = None
    if forced.keep is not None:
        k = forced.keep  # [k] indices into the forced rows
        kept = PromptCache(
            keys=[x[k, :, :-1] for x in keys],
            values=[x[k, :, :-1] for x in values],
            mask=mask[k, :-1],
            last_token=last_token[k],
            last_position=last_position[k, 0],
        )
    if T == 1:
        return first, kept
    copy = DynamicCache()
    for i, (key, value) in enumerate(zip(keys, values)):
        copy.update(key, value, i)
    attention = torch.cat([mask, mask.new_ones(mask.shape[0], T - 1)], dim=1)  # [f, L+T-1]
    positions = last_position + torch.arange(1, T, device=ids.device)  # [f, T-1]
    with final_states(model) as captured:
        out = model(
            input_ids=ids[:, :-1],
            attention_mask=attention,
            position_ids=positions,
            cache=copy,
            use_cache=True,
            logits_to_keep=1 if captured else T - 1,
            output_hidden_states=not captured,
        )
    states = captured["states"] if captured else out.hidden_states[-1]  # [f, T-1, D]
    rest = chunked_head_logps(lm_head(model), states, ids[:, 1:], forced.temperature, forced.chunk_size)[0]
    return torch.cat([first, rest], dim=1), kept  # [f, T]


def decode_loop(
    model: nn.Module,
    logits: Tensor,
    cache,
    mask: Tensor,
    last_position: Tensor,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float,
    top_p: float,
    top_k: int,
    greedy: bool,
    min_new_tokens: int,
    compact: float | None = 0.25,
) -> Tensor:
    """The token-by-token loop after a prefill: ``logits`` ``[n, V]`` predict the first new token.

    ``compact``: once at least this fraction of the rows still in the batch has finished, they are dropped from
    it (their KV cache rows included), so that the steps after cost only the rows still writing; ``None`` keeps
    every row to the end. The tokens are the same either way: each step draws one uniform number per original
    row (:func:`next_tokens`), whether that row is still in the batch or not.

    """
    n = mask.shape[0]
    eos = torch.tensor(eos_ids, device=mask.device)
    out = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=mask.device)  # [n, T]
    rows = torch.arange(n, device=mask.device)  # [a] the original row of each row still in the batch
    done = torch.zeros(n, dtype=torch.bool, device=mask.device)  # [a]
    positions = last_position  # [a, 1]
    steps = 0
    for t in range(max_new_tokens):
        if t < min_new_tokens:
            logits = logits.index_fill(-1, eos, float("-inf"))
        uniform = None if greedy else torch.rand(n, device=mask.device)[rows]  # [a], one draw per original row
        nxt = next_tokens(logits, temperature, top_p, top_k, greedy, uniform)  # [a]
        nxt = nxt.masked_fill(done, pad_id)
        out[rows, t] = nxt
        steps = t + 1
        done = done | torch.isin(nxt, eos)
        if done.all():
            break
        if compact is not None and int(done.sum()) >= compact * done.numel():
            keep = (~done).nonzero().squeeze(1)  # [a']
            select_cache_rows(cache, keep)
            mask, positions, nxt, rows, done = mask[keep], positions[keep], nxt[keep], rows[keep], done[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # [a, P+t+1]
        positions = positions + 1  # [a, 1]
        out_t = model(
            input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        )
        logits = out_t.logits[:, -1]  # [a, V]
    return out[:, :steps]  # [n, T]


def select_cache_rows(cache, rows: Tensor) -> None:
    """Keep only the batch ``rows`` (``[a]`` indices) of every layer of a ``DynamicCache``, preallocated or not (and
    of the blocks the rows attend to by cascade, ``set_cascade.SharedBlocks``, when the cache carries them)."""
    shared = getattr(cache, "shared_blocks", None)
    if shared is not None:
        shared.select_(rows)
    for layer in cache.layers:
        if hasattr(layer, "key_buffer"):
            layer.key_buffer = layer.key_buffer.index_select(0, rows)
            layer.value_buffer = layer.value_buffer.index_select(0, rows)
            layer.keys = layer.key_buffer[..., : layer.length, :]
            layer.values = layer.value_buffer[..., : layer.length, :]
        else:
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)


def preallocated_update(layer, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """A cache layer's ``update`` that writes into buffers with room to spare and returns views of them, instead
    of concatenating (which copies the whole cache every step)."""
    end = layer.length + key_states.shape[-2]
    if end > layer.key_buffer.shape[-2]:  # out of room: grow (does not happen in decode)
        layer.key_buffer = torch.cat([layer.key_buffer[..., : layer.length, :], key_states], dim=-2)
        layer.value_buffer = torch.cat([layer.value_buffer[..., : layer.length, :], value_states], dim=-2)
    else:
        layer.key_buffer[..., layer.length : end, :] = key_states
        layer.value_buffer[..., layer.length : end, :] = value_states
    layer.length = end
    layer.keys, layer.values = layer.key_buffer[..., :end, :], layer.value_buffer[..., :end, :]
    return layer.keys, layer.values


def preallocate_cache(cache, extra: int, rows: Tensor | None = None) -> None:
    """Give every layer of a filled ``DynamicCache`` buffers with room for ``extra`` more tokens, written in place
    by :func:`preallocated_update`; ``rows`` (``[n]`` indices) copies the cached rows to a new batch at the same
    time (the rows that share a prefix)."""
    for layer in cache.layers:
        keys, values = layer.keys, layer.values  # [b, h, L, d]
        if rows is not None:
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
        n, h, length, d = keys.shape
        layer.key_buffer = keys.new_empty(n, h, length + extra, d)
        layer.value_buffer = values.new_empty(n, h, length + extra, values.shape[-1])
        layer.key_buffer[..., :length, :] = keys
        layer.value_buffer[..., :length, :] = values
        layer.length = length
        layer.keys, layer.values = layer.key_buffer[..., :length, :], layer.value_buffer[..., :length, :]
        layer.update = types.MethodType(preallocated_update, layer)
