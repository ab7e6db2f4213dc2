"""Generation backends of :class:`~gcpo_lightning.components.sampling.group_sampler.GroupSampler`: how tokens are
decoded, given the sampler's settings. The sampler owns batching, masks and scoring; a backend only generates.

- :class:`KVCacheLoop`: the kit's lean KV-cached loop (:func:`~gcpo_lightning.components.sampling.decoding.decode`),
  fastest on small models and on CPU;
- :class:`StaticCacheLoop`: the same loop with fixed shapes (a static KV cache, a one-token step that
  ``torch.compile`` captures as a CUDA graph: :mod:`~gcpo_lightning.components.sampling.static_decoding`), for GPUs;
- :class:`HFGenerate`: Hugging Face ``generate`` (any model, any generation feature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gcpo_lightning.components.sampling.decoding import (
    Forced,
    decode,
    decode_shared_prefix,
    prefill_shared,
    score_forced_rows,
)
from gcpo_lightning.components.sampling.set_decoding import decode_set
from gcpo_lightning.components.sampling.static_decoding import (
    StaticBuffers,
    Step,
    allocate_buffers,
    decode_step,
    loaded,
    static_decode,
    static_decode_loop,
)
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

    def loop_args(self) -> tuple[int, list[int], int, float, float, int, bool, int]:
        """The decoding loop's positional settings: ``max_new_tokens`` to ``min_new_tokens``, in field order."""
        return (
            self.max_new_tokens,
            self.eos_ids,
            self.pad_id,
            self.temperature,
            self.top_p,
            self.top_k,
            self.greedy,
            self.min_new_tokens,
        )


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
        cascade: with GCPO's contexts read as sets (``generate_set``) on CPU, attend to each group's shared block
            once per step (cascade attention) instead of copying it into every row's KV cache: the same tokens to
            float rounding; ``false`` copies it (as on other devices).
    """

    def __init__(self, preallocate: bool = True, compact: float | None = 0.25, cascade: bool = True) -> None:
        if compact is not None and not 0 < compact <= 1:
            raise ValueError(f"KVCacheLoop: compact must be in (0, 1] or null, got {compact}")
        self.preallocate = preallocate
        self.compact = compact
        self.cascade = cascade

    def __repr__(self) -> str:
        return f"{type(self).__name__}(preallocate={self.preallocate}, compact={self.compact}, cascade={self.cascade})"

    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, decoding: Decoding) -> Tensor:
        return decode(
            model,
            prompt_ids,
            prompt_mask,
            *decoding.loop_args(),
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
        return decode_shared_prefix(
            model,
            prefix_ids,
            prefix_mask,
            suffix_ids,
            suffix_mask,
            owner,
            *decoding.loop_args(),
            forced=forced,
            compact=self.compact,
        )

    def generate_set(
        self,
        model: nn.Module,
        blocks: SetBlocks,
        tail_ids: Tensor,
        tail_mask: Tensor,
        owner: Tensor,
        decoding: Decoding,
        forced: Forced | None = None,
    ) -> tuple[Tensor, tuple[Tensor, PromptCache | None] | None]:
        """Rows after GCPO contexts read as sets: each group ``blocks`` prefilled once, each context its block's
        cache without its own candidate's line, the rows' tails (``owner``: the context of each row) on top
        (:func:`~gcpo_lightning.components.sampling.set_decoding.decode_set`)."""
        return decode_set(
            model,
            blocks.ids,
            blocks.line,
            blocks.context_group,
            blocks.context_own,
            tail_ids,
            tail_mask,
            owner,
            *decoding.loop_args(),
            forced=forced,
            compact=self.compact,
            cascade=self.cascade,
        )


@dataclass(frozen=True)
class SetBlocks:
    """The group blocks of contexts read as sets, for :meth:`KVCacheLoop.generate_set`."""

    ids: Tensor  # [b, Lb] right-padded blocks [P | L_0 .. L_{G-1}]
    line: Tensor  # [b, Lb] their line codes (gcpo_lightning.functional.set_attention)
    context_group: Tensor  # [p] the block of each context (candidate)
    context_own: Tensor  # [p] the line each context hides


class StaticCacheLoop(GenerationBackend):
    """:class:`KVCacheLoop` with fixed shapes, for GPUs: the prompts are prefilled as there, then decoded on a static
    KV cache by a one-token step that ``torch.compile(mode="reduce-overhead")`` captures as a CUDA graph. The same
    tokens as :class:`KVCacheLoop`, greedy or with the same seed; shared prefixes (``generate_shared``) too.

    The cache (rows x slots) is kept between calls so that the compiled step is reused: it grows to the largest
    call seen (slots rounded up to ``length_bucket``) and a smaller call is padded to it. What fixed shapes cost:
    finished rows are not dropped (no ``compact``), every step attends over all the slots (masked), padding rows are
    computed, the cache's memory stays allocated between rollouts, and the first calls (and any that grow the cache)
    compile. Models whose layers all use full attention; not for an FSDP-sharded policy.

    Args:
        compile: ``torch.compile`` the decode step: ``auto`` when the model is on CUDA, ``true`` on any device (on
            CPU it compiles C++ code: about a minute even for the tiny model), ``false`` never.
        compile_mode: the ``torch.compile`` mode of the ``inductor`` backend; ``reduce-overhead`` captures CUDA
            graphs, ``null`` compiles without them.
        compile_backend: the ``torch.compile`` backend; ``aot_eager`` traces the step without generating code.
        length_bucket: cache slots are rounded up to a multiple of this, so that prompts of different lengths reuse
            one cache and one compiled step.
    """

    def __init__(
        self,
        compile: bool | Literal["auto"] = "auto",
        compile_mode: str | None = "reduce-overhead",
        compile_backend: str = "inductor",
        length_bucket: int = 256,
    ) -> None:
        if compile not in (True, False, "auto"):
            raise ValueError(f"StaticCacheLoop: compile must be true, false or auto, got {compile!r}")
        if length_bucket < 1:
            raise ValueError(f"StaticCacheLoop: length_bucket must be >= 1, got {length_bucket}")
        self.compile = compile
        self.compile_mode = compile_mode
        self.compile_backend = compile_backend
        self.length_bucket = length_bucket
        self._buffers: StaticBuffers | None = None
        self._compiled: Step | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(compile={self.compile!r}, compile_mode={self.compile_mode!r}, "
            f"compile_backend={self.compile_backend!r}, length_bucket={self.length_bucket})"
        )

    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, decoding: Decoding) -> Tensor:
        return static_decode(model, prompt_ids, prompt_mask, decoding, self.buffers_for)

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
        """As :meth:`KVCacheLoop.generate_shared` (the same prefill and forced scoring), decoded on the static cache."""
        logits, cache, mask, last = prefill_shared(model, prefix_ids, prefix_mask, suffix_ids, suffix_mask, owner, 0)
        scored = None if forced is None else score_forced_rows(model, cache, logits, mask, last, suffix_ids, forced)
        buffers = loaded(model, cache, mask, decoding, self.buffers_for)
        return static_decode_loop(model, logits, mask, last, decoding, buffers), scored

    def compiles(self, model: nn.Module) -> bool:
        """Whether the decode step is compiled for ``model`` (``auto``: when it is on CUDA)."""
        if self.compile == "auto":
            return next(model.parameters()).is_cuda
        return bool(self.compile)

    def buffers_for(self, model: nn.Module, prefilled: Any, rows: int, length: int) -> StaticBuffers:
        """The kept buffers if a call of ``rows`` rows needing ``length`` slots fits them, else larger ones (the
        largest call so far, slots rounded up to ``length_bucket``; the old cache is freed first)."""
        kept = self._buffers
        if kept is not None and kept.fits(model, prefilled, rows, length):
            return kept
        if kept is not None and kept.model() is model:
            rows, length = max(rows, kept.rows), max(length, kept.length)
        kept = self._buffers = None  # free the old cache before allocating the new one
        slots = -(-length // self.length_bucket) * self.length_bucket
        self._buffers = allocate_buffers(model, prefilled, rows, slots, self.step_for(model))
        return self._buffers

    def step_for(self, model: nn.Module) -> Step:
        """:func:`~gcpo_lightning.components.sampling.static_decoding.decode_step`, compiled if :meth:`compiles`."""
        if not self.compiles(model):
            return decode_step
        if self._compiled is None:
            inductor = self.compile_backend == "inductor"
            mode = self.compile_mode if inductor else None
            self._compiled = torch.compile(decode_step, mode=mode, backend=self.compile_backend, dynamic=False)
        return self._compiled


class HFGenerate(GenerationBackend):
    """Hugging Face ``model.generate`` with the same sampling settings (any model, any generation feature).

    Args:
        generation_kwargs: more keyword arguments for ``generate``, e.g. ``{cache_implementation: static}`` (a static
            KV cache, which ``generate`` compiles on CUDA; add ``max_cache_len`` to size it for the longest call, so
            that calls reuse one cache and one compiled graph).
    """

    def __init__(self, generation_kwargs: dict[str, Any] | None = None) -> None:
        self.generation_kwargs = generation_kwargs

    def __repr__(self) -> str:
        return f"{type(self).__name__}(generation_kwargs={self.generation_kwargs!r})"

    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, decoding: Decoding) -> Tensor:
        d = decoding
        kwargs: dict = dict(
            max_new_tokens=d.max_new_tokens,
            do_sample=not d.greedy,
            pad_token_id=d.pad_id,
            eos_token_id=d.eos_ids,
            min_new_tokens=d.min_new_tokens,
            **(self.generation_kwargs or {}),
        )
        if not d.greedy:
            kwargs.update(temperature=d.temperature, top_p=d.top_p, top_k=d.top_k)
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)  # type: ignore[operator]
        return out[:, prompt_ids.shape[1] :]
