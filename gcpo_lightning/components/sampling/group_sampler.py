"""Group generation with the policy's own ``generate``."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from gcpo_lightning.components.sampling.backends import Decoding, GenerationBackend, KVCacheLoop
from gcpo_lightning.components.scoring.logprobs import score_in_batches
from gcpo_lightning.interfaces.containers import PolicyModels, Rollout
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
        if temperature < 0:
            raise ValueError(f"GroupSampler: temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"GroupSampler: top_p must be in (0, 1], got {top_p}")
        if max_completion_length < 1:
            raise ValueError(f"GroupSampler: max_completion_length must be >= 1, got {max_completion_length}")
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
        tok = models.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(models.policy.parameters()).device
        prompt_ids = enc["input_ids"].to(device).repeat_interleave(num_generations, dim=0)  # [N, P]
        prompt_mask = enc["attention_mask"].to(device).repeat_interleave(num_generations, dim=0)  # [N, P]
        start = time.perf_counter()
        completion_ids = self._generate(models, prompt_ids, prompt_mask, greedy)  # [N, T]
        generated = time.perf_counter()
        completion_mask, truncated = completion_mask_from_eos(completion_ids, eos_ids(tok))
        completion_ids = completion_ids.masked_fill(completion_mask == 0, tok.pad_token_id)
        rollout = Rollout(
            prompts=list(prompts),
            completions=tok.batch_decode(completion_ids, skip_special_tokens=True),
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            group_size=num_generations,
            truncated=truncated,
        )
        rollout.metrics["timing/generation"] = generated - start
        if score:
            self._score(models, rollout)
            rollout.metrics["timing/scoring"] = time.perf_counter() - generated
        return rollout

    def _generate(self, models: PolicyModels, prompt_ids: Tensor, prompt_mask: Tensor, greedy: bool) -> Tensor:
        """Completion tokens only, ``[N, T]`` with ``T <= max_completion_length``, generated in eval mode."""
        policy = models.policy
        step = self.generation_batch_size or prompt_ids.shape[0]
        was_training = policy.training
        policy.eval()
        try:
            chunks = [self._generate_chunk(models, ids, mask, greedy)
                      for ids, mask in zip(prompt_ids.split(step), prompt_mask.split(step))]
        finally:
            policy.train(was_training)
        return pad_cat(chunks, models.tokenizer.pad_token_id)

    def _generate_chunk(self, models: PolicyModels, ids: Tensor, mask: Tensor, greedy: bool) -> Tensor:
        tok = models.tokenizer
        decoding = Decoding(max_new_tokens=self.max_completion_length, eos_ids=eos_ids(tok), pad_id=tok.pad_token_id,
                            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                            greedy=greedy or self.temperature == 0, min_new_tokens=self.min_new_tokens)
        return self.backend.generate(models.policy, ids, mask, decoding)

    def _score(self, models: PolicyModels, rollout: Rollout) -> None:
        """Fill ``old_logps`` and ``hidden`` with no-grad forward passes of ``score_batch_size`` rows."""
        scores = score_in_batches(models.policy, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                  rollout.completion_mask, models.temperature, True, self.score_batch_size,
                                  models.logits_chunk_size)
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


def pad_cat(chunks: list[Tensor], pad_id: int) -> Tensor:
    """Concatenate ``[n_i, T_i]`` tensors along rows, right-padding to the longest ``T_i``."""
    T = max(c.shape[1] for c in chunks)
    padded = [torch.nn.functional.pad(c, (0, T - c.shape[1]), value=pad_id) for c in chunks]
    return torch.cat(padded)
