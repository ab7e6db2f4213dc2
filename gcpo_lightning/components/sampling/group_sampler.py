"""Group generation with the policy's own ``generate``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gcpo_lightning.components.sampling.backends import Decoding, GenerationBackend, KVCacheLoop
from gcpo_lightning.components.sampling.decoding import Forced
from gcpo_lightning.components.sampling.padding import left_pad, pad_cat
from gcpo_lightning.components.sampling.set_sampling import sample_set
from gcpo_lightning.components.scoring.logprobs import score_in_batches
from gcpo_lightning.components.scoring.prefix_sharing import common_prefix_length
from gcpo_lightning.functional.batching import group_spans
from gcpo_lightning.functional.clock import wall_time
from gcpo_lightning.interfaces.containers import PolicyModels, PromptCache, Rollout, SetContexts, cat_prompt_caches
from gcpo_lightning.interfaces.protocols import Sampler


class GroupSampler(Sampler):
    """Samples ``G`` completions per prompt with Hugging Face ``generate`` and scores them without gradients.

    The same temperature is applied to generation and to every later log-prob recomputation.

    Args:
        temperature: sampling temperature (TRL's ``temperature``); 0 means greedy.
        top_p: nucleus sampling mass; 1.0 disables it.
        top_k: top-k filter; 0 disables it.
        max_completion_length: maximum new tokens per completion (TRL's ``max_completion_length``).
        generation_batch_size: most sequences per generation call; ``None`` generates the whole batch at once.
        score_batch_size: rows per no-grad scoring forward pass.
        min_new_tokens: EOS is not sampled before this many tokens (0: no minimum).
        backend: how tokens are decoded: :class:`KVCacheLoop` (the kit's lean KV-cached loop, fastest on small
            models; the default) or :class:`HFGenerate` (Hugging Face ``generate``: any model, any feature).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_completion_length: int = 48,
        generation_batch_size: int | None = None,
        score_batch_size: int = 64,
        min_new_tokens: int = 0,
        backend: GenerationBackend | None = None,
    ) -> None:
        check_sampling_settings("GroupSampler", temperature, top_p, max_completion_length)
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.max_completion_length = max_completion_length
        self.generation_batch_size = generation_batch_size
        self.score_batch_size = score_batch_size
        self.min_new_tokens = min_new_tokens
        self.backend = KVCacheLoop() if backend is None else backend

    @torch.no_grad()
    def sample(
        self, models: PolicyModels, prompts: list[str], num_generations: int, greedy: bool = False, score: bool = True
    ) -> Rollout:
        """Generate ``num_generations`` completions for each prompt (group-major) and optionally score them."""
        prompt_ids, prompt_mask = self._encode(models, prompts, num_generations)
        start = wall_time()
        completion_ids = self._generate(models, prompt_ids, prompt_mask, greedy)  # [N, T]
        return self.finish_rollout(
            models, prompts, prompt_ids, prompt_mask, completion_ids, num_generations, start, score
        )

    @torch.no_grad()
    def sample_shared(
        self,
        models: PolicyModels,
        groups: list[list[str]],
        num_generations: int,
        greedy: bool = False,
        score: bool = True,
        continuations: list[list[int]] | None = None,
        keep_cache: list[int] | None = None,
    ) -> Rollout:
        """As :meth:`sample` over the prompts of ``groups`` flattened, encoding each group's shared prefix once.

        The prompts of a group share a token prefix (GCPO's ``M`` contexts of one candidate share ``q`` and the
        other candidates); with a backend that can fork a KV cache (``KVCacheLoop``) the prefix is prefilled once
        and its cache copied to the group's ``len(group) * num_generations`` rows. Same result as :meth:`sample`
        on the flattened list, up to float rounding (tests/component/test_gcpo_cost.py); other backends (e.g.
        ``HFGenerate``, or a server with its own prefix cache) receive the flattened prompts unchanged.

        ``continuations`` (one token list per flattened prompt) are scored teacher-forced after their prompt on
        the same KV cache, before decoding: ``Rollout.continuation_logps`` ``[prompts, T]``, temperature applied
        (GCPO's ``p(y_i | x_{i,l})`` without a second pass over ``x_{i,l}``). ``keep_cache`` (ascending indices
        of flattened prompts with a continuation) returns those prompts' KV cache in ``Rollout.prompt_cache``.
        Both are left ``None`` by backends that cannot (the caller then computes them itself).
        """
        flat = [p for group in groups for p in group]
        if continuations is not None and len(continuations) != len(flat):
            raise ValueError(f"sample_shared: {len(continuations)} continuations for {len(flat)} prompts")
        if not hasattr(self.backend, "generate_shared"):
            return self.sample(models, flat, num_generations, greedy, score)
        prompt_ids, prompt_mask = self._encode(models, flat, num_generations)
        start = wall_time()
        policy, was_training = models.policy, models.policy.training
        policy.eval()
        try:
            completion_ids, forced_logps, cache = self._generate_shared(
                models,
                prompt_ids,
                prompt_mask,
                [len(g) for g in groups],
                num_generations,
                greedy,
                continuations,
                keep_cache,
            )
        finally:
            policy.train(was_training)
        rollout = self.finish_rollout(
            models, flat, prompt_ids, prompt_mask, completion_ids, num_generations, start, score
        )
        rollout.continuation_logps, rollout.prompt_cache = forced_logps, cache
        return rollout

    @torch.no_grad()
    def sample_set(
        self,
        models: PolicyModels,
        contexts: SetContexts,
        num_generations: int,
        greedy: bool = False,
        continuations: list[list[int]] | None = None,
        keep_cache: list[int] | None = None,
    ) -> Rollout:
        """``num_generations`` unscored samples after each of GCPO's contexts read as sets (rows ``(n, l, k)``):
        each group's block is prefilled once (:func:`~gcpo_lightning.components.sampling.set_sampling.sample_set`;
        ``continuations`` and ``keep_cache`` as in :meth:`sample_shared`). Needs a backend with ``generate_set``
        (:class:`KVCacheLoop`)."""
        if not hasattr(self.backend, "generate_set"):
            raise ValueError(
                f"GroupSampler.sample_set: the backend {self.backend!r} cannot read contexts as sets "
                "(context_layout: set needs backend: KVCacheLoop)"
            )
        return sample_set(self, models, contexts, num_generations, greedy, continuations, keep_cache)

    def _encode(self, models: PolicyModels, prompts: list[str], num_generations: int) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and mask, each row repeated ``num_generations`` times.  ``[N, P]`` twice."""
        return encode_prompts(models.tokenizer, prompts, num_generations, next(models.policy.parameters()).device)

    def finish_rollout(
        self,
        models: PolicyModels,
        prompts: list[str],
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        num_generations: int,
        start: float,
        score: bool,
    ) -> Rollout:
        """The :class:`Rollout` of generated ``completion_ids`` after ``prompt_ids``, timed from ``start``;
        scored by the policy (old log-probs) when ``score``."""
        generated = wall_time()
        rollout = rollout_from_tokens(
            models.tokenizer, prompts, prompt_ids, prompt_mask, completion_ids, num_generations
        )
        rollout.metrics["timing/generation"] = generated - start
        if score:
            self._score(models, rollout)
            rollout.metrics["timing/scoring"] = wall_time() - generated
        return rollout

    def _generate_shared(
        self,
        models: PolicyModels,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        sizes: list[int],
        K: int,
        greedy: bool,
        continuations: list[list[int]] | None = None,
        keep_cache: list[int] | None = None,
    ) -> tuple[Tensor, Tensor | None, PromptCache | None]:
        """Completions ``[N, T]`` of rows grouped by shared prefix: ``sizes[g] * K`` consecutive rows per group,
        at most ``generation_batch_size`` rows per call (whole groups); the continuations' log-probs and the kept
        prompts' KV cache."""
        rows_of = [s * K for s in sizes]
        step = self.generation_batch_size or sum(rows_of)
        keep = set(keep_cache or [])
        chunks, scored, caches, first, prompt = [], [], [], 0, 0
        for g, last in group_spans(rows_of, step):
            n, count = sum(rows_of[g:last]), sum(sizes[g:last])  # rows and prompts in this chunk
            rows = slice(first, first + n)
            prompts = list(range(prompt, prompt + count))
            forced = (
                None if continuations is None else self.forced_continuations(models, continuations, prompts, K, keep)
            )
            tokens, out = self._generate_shared_chunk(
                models, prompt_ids[rows], prompt_mask[rows], rows_of[g:last], greedy, forced
            )
            chunks.append(tokens)
            if out is not None:
                scored.append(out[0])
                if out[1] is not None:
                    caches.append(out[1])
            first, prompt = first + n, prompt + count
        forced_logps = pad_cat(scored, 0) if scored else None
        return (
            pad_cat(chunks, models.tokenizer.pad_token_id),
            forced_logps,
            cat_prompt_caches(caches) if caches else None,
        )

    def forced_continuations(
        self, models: PolicyModels, continuations: list[list[int]], prompts: list[int], K: int, keep: set[int]
    ) -> Forced:
        """The continuations of a chunk's ``prompts`` (indices into ``continuations``), scored after the first of
        each prompt's ``K`` rows; the KV cache of the prompts in ``keep`` is kept (none when ``keep`` is empty)."""
        kept = [i for i, p in enumerate(prompts) if p in keep] if keep else None
        continuations = [continuations[p] for p in prompts]
        device = next(models.policy.parameters()).device
        longest = max(1, max(len(c) for c in continuations))
        ids = torch.full((len(continuations), longest), models.tokenizer.pad_token_id, dtype=torch.long)
        for r, c in enumerate(continuations):
            ids[r, : len(c)] = torch.tensor(c, dtype=torch.long)
        return Forced(
            rows=torch.arange(len(continuations), device=device) * K,
            ids=ids.to(device),
            temperature=models.temperature,
            chunk_size=models.logits_chunk_size or 16,
            keep=None if kept is None else torch.tensor(kept, dtype=torch.long, device=device),
        )

    def _generate_shared_chunk(
        self, models: PolicyModels, ids: Tensor, mask: Tensor, rows_of: list[int], greedy: bool, forced: Forced | None
    ) -> tuple[Tensor, tuple[Tensor, PromptCache | None] | None]:
        device, pad = ids.device, models.tokenizer.pad_token_id
        seqs = [row[m.bool()].tolist() for row, m in zip(ids, mask)]  # real tokens of every row
        owner = torch.arange(len(rows_of), device=device).repeat_interleave(torch.tensor(rows_of, device=device))
        prefixes, suffixes, first = [], [], 0
        for n in rows_of:
            group = seqs[first : first + n]
            c = min(common_prefix_length(group), min(len(s) for s in group) - 1)  # every row keeps >= 1 token
            prefixes.append(group[0][:c])
            suffixes += [s[c:] for s in group]
            first += n
        prefix_ids, prefix_mask = left_pad(prefixes, pad, device)
        suffix_ids, suffix_mask = left_pad(suffixes, pad, device)
        backend: Any = self.backend  # a backend with generate_shared (checked by sample_shared)
        return backend.generate_shared(
            models.policy,
            prefix_ids,
            prefix_mask,
            suffix_ids,
            suffix_mask,
            owner,
            self.decoding(models, greedy),
            forced=forced,
        )

    def _generate(self, models: PolicyModels, prompt_ids: Tensor, prompt_mask: Tensor, greedy: bool) -> Tensor:
        """Completion tokens only, ``[N, T]`` with ``T <= max_completion_length``, generated in eval mode."""
        policy = models.policy
        step = self.generation_batch_size or prompt_ids.shape[0]
        was_training = policy.training
        policy.eval()
        try:
            chunks = [
                self._generate_chunk(models, ids, mask, greedy)
                for ids, mask in zip(prompt_ids.split(step), prompt_mask.split(step))
            ]
        finally:
            policy.train(was_training)
        return pad_cat(chunks, models.tokenizer.pad_token_id)

    def _generate_chunk(self, models: PolicyModels, ids: Tensor, mask: Tensor, greedy: bool) -> Tensor:
        return self.backend.generate(models.policy, ids, mask, self.decoding(models, greedy))

    def decoding(self, models: PolicyModels, greedy: bool) -> Decoding:
        """This sampler's decoding settings (greedy when ``greedy`` or at temperature 0)."""
        tok = models.tokenizer
        return Decoding(
            max_new_tokens=self.max_completion_length,
            eos_ids=eos_ids(tok),
            pad_id=tok.pad_token_id,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            greedy=greedy or self.temperature == 0,
            min_new_tokens=self.min_new_tokens,
        )

    def _score(self, models: PolicyModels, rollout: Rollout) -> None:
        score_rollout(models, rollout, self.score_batch_size)


def check_sampling_settings(owner: str, temperature: float, top_p: float, max_completion_length: int) -> None:
    """Raise a ``ValueError`` naming ``owner`` and the setting when a sampler's settings are out of range."""
    if temperature < 0:
        raise ValueError(f"{owner}: temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{owner}: top_p must be in (0, 1], got {top_p}")
    if max_completion_length < 1:
        raise ValueError(f"{owner}: max_completion_length must be >= 1, got {max_completion_length}")


def encode_prompts(tokenizer: Any, prompts: list[str], G: int, device: Any) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids and mask, each row repeated ``G`` times.  ``[N, P]`` twice."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids = enc["input_ids"].to(device).repeat_interleave(G, dim=0)  # [N, P]
    prompt_mask = enc["attention_mask"].to(device).repeat_interleave(G, dim=0)  # [N, P]
    return prompt_ids, prompt_mask


def rollout_from_tokens(
    tokenizer: Any, prompts: list[str], prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, G: int
) -> Rollout:
    """A rollout from generated ``[N, T]`` tokens: masked after each row's first EOS, padded there, decoded."""
    completion_mask, truncated = completion_mask_from_eos(completion_ids, eos_ids(tokenizer))
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    return Rollout(
        prompts=list(prompts),
        completions=tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        group_size=G,
        truncated=truncated,
    )


def score_rollout(models: PolicyModels, rollout: Rollout, batch_size: int) -> None:
    """Fill ``old_logps`` and ``hidden`` with the policy's no-grad forward passes of ``batch_size`` rows."""
    scores = score_in_batches(
        models.policy,
        rollout.prompt_ids,
        rollout.prompt_mask,
        rollout.completion_ids,
        rollout.completion_mask,
        models.temperature,
        True,
        batch_size,
        models.logits_chunk_size,
    )
    rollout.old_logps = scores.logps  # [N, T]
    rollout.hidden = scores.hidden  # [N, D]


def eos_ids(tokenizer) -> list[int]:
    """The token ids that end a completion (the tokenizer's EOS, plus a chat model's end-of-turn if distinct)."""
    ids = {tokenizer.eos_token_id}
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def completion_mask_from_eos(completion_ids: Tensor, eos: list[int]) -> tuple[Tensor, Tensor]:
    """Mask up to and including the first EOS, and which rows never produced one.

    ``[N, T] -> ([N, T] long, [N] bool)``
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))  # [N, T]
    T = completion_ids.shape[1]
    has_eos = is_eos.any(dim=1)  # [N]
    first = torch.where(has_eos, is_eos.long().argmax(dim=1), torch.full_like(has_eos, T, dtype=torch.long))  # [N]
    positions = torch.arange(T, device=completion_ids.device).unsqueeze(0)  # [1, T]
    mask = (positions <= first.unsqueeze(1)).long()  # [N, T]
    return mask, ~has_eos
