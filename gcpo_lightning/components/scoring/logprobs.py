"""Teacher-forced scoring of completions: per-token log-probabilities, entropies and representations.

One forward pass over ``[prompt | completion]`` gives everything the step needs from a model: the log-prob of
each completion token (temperature applied exactly as in generation), the entropy of each next-token
distribution, and ``rep(y)``, the last-layer hidden state (after the final norm) at the final completion token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gcpo_lightning.interfaces.containers import PromptCache, Scores, require


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, exactly as ``generate`` computes them.  ``[N, L] -> [N, L]``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def selective_log_softmax(logits: Tensor, targets: Tensor, chunk_size: int = 16) -> tuple[Tensor, Tensor]:
    """Log-probability of ``targets`` and entropy of each distribution, ``chunk_size`` rows at a time.

    Only one chunk's fp32 softmax is alive at once, so memory does not scale with ``N * T * V``.

    Args:
        logits: ``[N, T, V]`` (already divided by the temperature).
        targets: ``[N, T]`` token ids.
        chunk_size: rows of ``N`` processed together.

    Returns:
        ``(logps, entropy)``, both ``[N, T]`` in fp32.
    """
    logps, entropies = [], []
    for rows, tgt in zip(logits.split(chunk_size), targets.split(chunk_size)):
        log_probs = rows.float().log_softmax(-1)  # [n, T, V]
        logps.append(log_probs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1))  # [n, T]
        with torch.no_grad():
            entropies.append(-(log_probs.exp() * log_probs).sum(-1))  # [n, T]
    return torch.cat(logps), torch.cat(entropies)


def score_completions(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    with_hidden: bool = False,
    chunk_size: int = 16,
    logits_chunk_size: int | None = None,
) -> Scores:
    """Score ``completion_ids`` given ``prompt_ids`` under ``model`` in one forward pass.

    Gradients flow when called outside ``torch.no_grad()``.

    Args:
        model: a Hugging Face causal LM (anything returning ``.logits`` and ``.hidden_states``).
        prompt_ids: ``[N, P]`` left-padded prompt tokens.
        prompt_mask: ``[N, P]``.
        completion_ids: ``[N, T]`` right-padded completion tokens.
        completion_mask: ``[N, T]``.
        temperature: the sampling temperature; logits are divided by it, as in generation.
        with_hidden: also return ``rep(y)``, the final-token hidden state after the last norm.
        chunk_size: rows per log-softmax chunk.
        logits_chunk_size: when set, the model returns only hidden states and the LM head is applied to this many
            rows at a time with activation checkpointing (:func:`chunked_head_logps`): no ``[N, T, V]`` logits
            tensor exists, in forward or backward.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [N, P+T]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [N, P+T]
    T = completion_ids.shape[1]
    chunked = logits_chunk_size is not None
    need_states = chunked or with_hidden
    with final_states(model, enabled=need_states) as captured:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            output_hidden_states=need_states and not captured,
            logits_to_keep=1 if chunked else T + 1,
            use_cache=False,
        )
    states = (captured["states"] if captured else out.hidden_states[-1]) if need_states else None  # [N, P+T, D]
    if chunked:
        states = require(states, "final hidden states")
        logps, entropy = chunked_head_logps(
            lm_head(model),
            states[:, -T - 1 : -1],
            completion_ids,
            temperature,
            require(logits_chunk_size, "logits_chunk_size"),
        )  # position t predicts completion token t
    else:
        logits = out.logits[:, :-1] / temperature  # [N, T, V]: position t predicts completion token t
        logps, entropy = selective_log_softmax(logits, completion_ids, chunk_size)
    hidden = final_token_hidden(require(states, "final hidden states"), attention_mask) if with_hidden else None
    return Scores(logps=logps, entropy=entropy, hidden=hidden)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The decoder's final norm (``...model.norm`` in Llama, Qwen, Mistral, Gemma...), whose output the LM head
    reads; ``None`` when the model has no module of that name."""
    norms = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("norm", "final_layernorm", "ln_f")]
    return norms[-1] if norms else None


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection (through wrappers such as a PEFT model)."""
    return cast(nn.Module, model.get_output_embeddings())  # type: ignore[operator]


@contextmanager
def final_states(model: nn.Module, enabled: bool = True) -> Iterator[dict[str, Tensor]]:
    """Capture the final norm's output ``[N, L, D]`` during the forward passes run in the block.

    The dict yielded is empty (falsy) when disabled or when the model has no recognisable final norm; callers
    then fall back to ``output_hidden_states``. Unlike ``output_hidden_states`` nothing else is kept alive.
    """
    norm = final_norm(model) if enabled else None
    captured: dict[str, Tensor] = {}
    if norm is None:
        yield captured
        return
    captured["states"] = torch.empty(0)  # a placeholder makes the dict truthy: capturing is on
    handle = norm.register_forward_hook(lambda module, inputs, output: captured.__setitem__("states", output))
    try:
        yield captured
    finally:
        handle.remove()


def _head_logps(head: nn.Module, states: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Log-probs of ``targets`` and (detached) entropies from hidden ``states``.  ``[n, T, D] -> [n, T], [n, T]``."""
    log_probs = (head(states).float() / temperature).log_softmax(-1)  # [n, T, V]
    logps = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [n, T]
    entropy = -(log_probs.exp() * log_probs).sum(-1).detach()  # [n, T]
    return logps, entropy


def chunked_head_logps(
    head: nn.Module, states: Tensor, targets: Tensor, temperature: float = 1.0, chunk_size: int = 4
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies through the LM ``head``, ``chunk_size`` rows at a time.

    Each chunk's logits are recomputed in backward (activation checkpointing), so at most one ``[chunk, T, V]``
    logits tensor is alive at once, in forward and in backward: memory does not grow with ``N * T * V``.

    Args:
        head: the output projection (``model.get_output_embeddings()``).
        states: ``[N, T, D]`` final hidden states (after the last norm) at the positions that predict ``targets``.
        targets: ``[N, T]`` token ids.
        temperature: divides the logits, as in generation.
        chunk_size: rows of ``N`` per chunk.

    Returns:
        ``(logps, entropy)``, both ``[N, T]`` in fp32; gradients flow through ``logps`` when ``states`` has them.
    """
    logps, entropies = [], []
    for rows, tgt in zip(states.split(chunk_size), targets.split(chunk_size)):
        if torch.is_grad_enabled() and rows.requires_grad:
            lp, ent = checkpoint(_head_logps, head, rows, tgt, temperature, use_reentrant=False)
        else:
            lp, ent = _head_logps(head, rows, tgt, temperature)
        logps.append(lp)
        entropies.append(ent)
    return torch.cat(logps), torch.cat(entropies)


def final_token_hidden(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Hidden state at the last attended position of each row.  ``[N, L, D], [N, L] -> [N, D]``.

    With left-padded prompts and right-padded completions the last attended position is the final completion
    token (its EOS where one was generated).
    """
    L = attention_mask.shape[1]
    positions = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)  # [N, L]
    last = (positions * attention_mask.long()).amax(dim=1)  # [N]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()  # [N, D]


@torch.no_grad()
def score_in_batches(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    with_hidden: bool = False,
    batch_size: int = 64,
    logits_chunk_size: int | None = None,
) -> Scores:
    """:func:`score_completions` without gradients, ``batch_size`` rows per forward pass, in eval mode."""
    was_training = model.training
    model.eval()
    parts = [
        score_completions(
            model,
            prompt_ids[s : s + batch_size],
            prompt_mask[s : s + batch_size],
            completion_ids[s : s + batch_size],
            completion_mask[s : s + batch_size],
            temperature=temperature,
            with_hidden=with_hidden,
            logits_chunk_size=logits_chunk_size,
        )
        for s in range(0, prompt_ids.shape[0], batch_size)
    ]
    model.train(was_training)
    hidden = torch.cat([require(p.hidden, "Scores.hidden") for p in parts]) if with_hidden else None
    entropy = torch.cat([require(p.entropy, "Scores.entropy") for p in parts])
    return Scores(logps=torch.cat([p.logps for p in parts]), entropy=entropy, hidden=hidden)


def score_after_frozen_prefix(
    model: nn.Module,
    prefix_ids: Tensor,
    prefix_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    logits_chunk_size: int | None = None,
) -> Tensor:
    """``log p(y_t | prefix, y_<t)`` as :func:`score_completions`, with the prefix encoded without gradient.

    The prefix (all but its last token) is run under ``torch.no_grad()`` into a KV cache; the gradient pass covers
    only ``[last prefix token | completion]``, which attends to that cache. The values equal
    :func:`score_completions` to float rounding; the gradient omits the path through the prefix's keys and values
    (GCPO's ``policy_context: context_frozen``, a measured **[decision]**, docs/algorithm.md). Cost: one no-grad
    forward over the prefix plus a gradient pass over ``T + 1`` tokens, instead of a gradient pass over ``P + T``.

    Args:
        prefix_ids: ``[N, P]`` left-padded (its last column is a real token in every row).
        prefix_mask: ``[N, P]``.
        completion_ids: ``[N, T]`` right-padded.
        completion_mask: ``[N, T]``.

    Returns:
        ``[N, T]`` fp32 log-probs (with gradient when grad is enabled).
    """
    from transformers import DynamicCache

    cache: Any = DynamicCache()
    positions = position_ids_from_mask(prefix_mask)  # [N, P]
    with torch.no_grad():
        model(
            input_ids=prefix_ids[:, :-1],
            attention_mask=prefix_mask[:, :-1],
            position_ids=positions[:, :-1],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    prompt = PromptCache(
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        mask=prefix_mask[:, :-1],
        last_token=prefix_ids[:, -1],
        last_position=positions[:, -1],
    )
    return score_after_cache(model, prompt, completion_ids, completion_mask, temperature, logits_chunk_size)


def score_after_cache(
    model: nn.Module,
    prompt: PromptCache,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    logits_chunk_size: int | None = None,
) -> Tensor:
    """``log p(y_t | prompt, y_<t)`` with the prompt (but its last token) given as a KV cache made without gradient.

    The gradient pass covers ``[last prompt token | y[:-1]]`` attending to the cache (which is not modified, so it
    can serve several passes). Returns ``[N, T]`` fp32 log-probs, with gradient when grad is enabled.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (keys, values) in enumerate(zip(prompt.keys, prompt.values)):
        cache.update(keys, values, i)
    T = completion_ids.shape[1]
    inputs = torch.cat([prompt.last_token.unsqueeze(1), completion_ids[:, :-1]], dim=1)  # [N, T]: t predicts y_t
    mask = torch.cat([prompt.mask, prompt.mask.new_ones(prompt.mask.shape[0], 1), completion_mask[:, :-1]], dim=1)
    positions = prompt.last_position.unsqueeze(1) + torch.arange(T, device=inputs.device)  # [N, T]
    chunked = logits_chunk_size is not None
    with final_states(model, enabled=chunked) as captured:
        out = model(
            input_ids=inputs,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1 if chunked and captured else T,
            output_hidden_states=chunked and not captured,
        )
    if logits_chunk_size is not None:
        states = captured["states"] if captured else out.hidden_states[-1]  # [N, T, D]
        return chunked_head_logps(lm_head(model), states, completion_ids, temperature, logits_chunk_size)[0]
    return selective_log_softmax(out.logits / temperature, completion_ids)[0]
