"""Generation backends of :class:`~gcpo_lightning.components.sampling.group_sampler.GroupSampler`: how tokens are
decoded, given the sampler's settings. The sampler owns batching, masks and scoring; a backend only generates.

- :class:`KVCacheLoop`: the kit's lean KV-cached loop (:func:`~gcpo_lightning.components.sampling.decoding.decode`),
  fastest on small models;
- :class:`HFGenerate`: Hugging Face ``generate`` (any model, any generation feature).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from gcpo_lightning.components.sampling.decoding import Forced, decode, decode_shared_prefix
from gcpo_lightning.interfaces.containers import PromptCache


@dataclass(frozen=True)
class Decoding:
    """What to generate: the sampler's settings for one call."""

    max_new_tokens: int
    eos_ids: list[int]
    pad_id: int
    temperature: float
    top_p: float
    top_k: int
    greedy: bool
    min_new_tokens: int


class GenerationBackend:
    """Base class: ``[n, P]`` left-padded prompts to ``[n, T]`` completion tokens (``T <= max_new_tokens``)."""

    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, decoding: Decoding) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class KVCacheLoop(GenerationBackend):
    """The kit's KV-cached decoding loop (temperature, top-p, top-k, min_new_tokens; stops at EOS).

    Args:
        preallocate: write the KV cache into buffers sized for the whole generation (the same tokens as a cache
            grown by concatenation, without copying it every step); ``false`` grows it (the old loop).
        compact: once this fraction of the rows in the batch has finished, drop them (and their KV cache rows)
            so that later steps cost only the rows still writing; the same tokens, sampled or greedy, because
            every step draws one number per original row. ``null`` keeps every row to the end (the old loop).
    """

    def __init__(self, preallocate: bool = True, compact: float | None = 0.25) -> None:
        if compact is not None and not 0 < compact <= 1:
            raise ValueError(f"KVCacheLoop: compact must be in (0, 1] or null, got {compact}")
        self.preallocate = preallocate
        self.compact = compact

    def __repr__(self) -> str:
        return f"{type(self).__name__}(preallocate={self.preallocate}, compact={self.compact})"

    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, decoding: Decoding) -> Tensor:
        d = decoding
        return decode(
            model,
            prompt_ids,
            prompt_mask,
            d.max_new_tokens,
            d.eos_ids,
            d.pad_id,
            d.temperature,
            d.top_p,
            d.top_k,
            d.greedy,
            d.min_new_tokens,
            preallocate=self.preallocate,
            compact=self.compact,
        )

    def generate_shared(
        self,
        model: nn.Module,
        prefix_ids: Tensor,
        prefix_mask: Tensor,
        suffix_ids: Tensor,
        suffix_mask: Tensor,
        owner: Tensor,
        decoding: Decoding,
        forced: Forced | None = None,
    ) -> tuple[Tensor, tuple[Tensor, PromptCache | None] | None]:
        """Rows ``[prefix_ids[owner[r]] | suffix_ids[r]]``, each distinct prefix prefilled once and its KV cache
        copied to its rows (:func:`~gcpo_lightning.components.sampling.decoding.decode_shared_prefix`), and the
        log-probs of the ``forced`` continuations, scored on that cache before decoding (and the KV cache of the
        prompts ``forced.keep`` names)."""
        d = decoding
        return decode_shared_prefix(
            model,
            prefix_ids,
            prefix_mask,
            suffix_ids,
            suffix_mask,
            owner,
            d.max_new_tokens,
            d.eos_ids,
            d.pad_id,
            d.temperature,
            d.top_p,
            d.top_k,
            d.greedy,
            d.min_new_tokens,
            forced=forced,
            compact=self.compact,
        )


class HFGenerate(GenerationBackend):
    """Hugging Face ``model.generate`` with the same sampling settings (any model, any generation feature)."""

    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, decoding: Decoding) -> Tensor:
        d = decoding
        kwargs: dict = dict(
            max_new_tokens=d.max_new_tokens,
            do_sample=not d.greedy,
            pad_token_id=d.pad_id,
            eos_token_id=d.eos_ids,
            min_new_tokens=d.min_new_tokens,
        )
        if not d.greedy:
            kwargs.update(temperature=d.temperature, top_p=d.top_p, top_k=d.top_k)
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)  # type: ignore[operator]
        return out[:, prompt_ids.shape[1] :]
