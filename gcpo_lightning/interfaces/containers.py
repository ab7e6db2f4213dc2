"""Typed containers passed between the components of one training step.

Shape legend used throughout the package: ``B`` prompts, ``G`` group size (``num_generations``),
``N = B*G`` completions, ``P`` prompt tokens, ``T`` completion tokens, ``D`` hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

import torch
from torch import Tensor

from gcpo_lightning.functional.losses import IS_MODES, importance_weights

T = TypeVar("T")


def require(value: T | None, what: str) -> T:
    """``value``, or a ``ValueError`` naming what is missing (an optional field a component needs)."""
    if value is None:
        raise ValueError(f"{what} is missing")
    return value


@dataclass
class PromptCache:
    """The KV cache of ``r`` prompts without their last token, for a later pass that continues them.

    Made under the rollout policy without gradient (GCPO's contexts ``x_{i,0}``, kept from context generation for
    ``policy_context: context_frozen``); valid only while the policy's weights are those it was made with.
    """

    keys: list[Tensor]  # per layer [r, heads, L, head_dim]
    values: list[Tensor]  # per layer [r, heads, L, head_dim]
    mask: Tensor  # [r, L] 1 for real tokens (left-padded)
    last_token: Tensor  # [r] each prompt's last token, not in the cache
    last_position: Tensor  # [r] its position id

    def select(self, index: Tensor) -> PromptCache:
        """The prompts at ``index``."""
        return PromptCache(
            keys=[k[index] for k in self.keys],
            values=[v[index] for v in self.values],
            mask=self.mask[index],
            last_token=self.last_token[index],
            last_position=self.last_position[index],
        )


@dataclass
class SetContexts:
    """GCPO's contexts ``x_{i,l}`` read as sets (``ColliderGraphBuilder(context_layout="set")``), one row per candidate.

    Each group's candidates appear once, in a block ``[P | L_0 .. L_{G-1}]`` (``P``: the context's header with ``q``;
    ``L_k``: candidate ``k``'s line) that every context of the group shares; ``x_{i,l}`` is the block without
    ``L_i``, followed by its tail (the integrated output ``y_{n,l}`` and the instruction). How the tokens attend to
    each other: :mod:`gcpo_lightning.functional.set_attention`.
    """

    block_ids: Tensor  # [N, Lb] right-padded tokens of candidate n's group block (the same for the G rows of a group)
    block_line: Tensor  # [N, Lb] -1 on P, k on candidate line k, -2 on padding
    own: Tensor  # [N] the candidate's own line i, hidden from its contexts
    group: Tensor  # [N] the group (prompt) index
    tail_ids: Tensor  # [N, M, Lt] right-padded tokens of x_{i,l} after the lines
    tail_mask: Tensor  # [N, M, Lt]

    def select(self, index: Tensor) -> SetContexts:
        """The candidates at ``index``."""
        return SetContexts(
            block_ids=self.block_ids[index],
            block_line=self.block_line[index],
            own=self.own[index],
            group=self.group[index],
            tail_ids=self.tail_ids[index],
            tail_mask=self.tail_mask[index],
        )


def cat_prompt_caches(parts: list[PromptCache]) -> PromptCache:
    """Concatenate caches along prompts, left-padding each to the longest (masked, so the values do not matter)."""
    L = max(p.mask.shape[1] for p in parts)
    pad = lambda t, d: torch.nn.functional.pad(t, (0, 0) * d + (L - t.shape[-1 - d], 0))  # noqa: E731
    return PromptCache(
        keys=[torch.cat([pad(p.keys[i], 1) for p in parts]) for i in range(len(parts[0].keys))],
        values=[torch.cat([pad(p.values[i], 1) for p in parts]) for i in range(len(parts[0].values))],
        mask=torch.cat([pad(p.mask, 0) for p in parts]),
        last_token=torch.cat([p.last_token for p in parts]),
        last_position=torch.cat([p.last_position for p in parts]),
    )


@dataclass(frozen=True)
class ImportanceCorrection:
    """The sampler/trainer mismatch correction the loss applies (TRL's ``vllm_importance_sampling_correction``).

    A sampler whose engine (vLLM) computes its log-probabilities differently from the policy puts them in
    ``Rollout.sampler_logps`` and this correction in ``Rollout.importance_correction``; the loss then multiplies
    each token's policy-gradient term (not the KL penalty) by ``pi_old / pi_sampler``, formed by ``mode`` (TRL's
    ``vllm_importance_sampling_mode``) with the bounds ``clip_min`` / ``clip_max`` (``None``: unbounded).
    """

    mode: str = "token_truncate"
    clip_min: float | None = None
    clip_max: float | None = 3.0

    def __post_init__(self) -> None:
        if self.mode not in IS_MODES:
            raise ValueError(f"importance sampling mode must be one of {IS_MODES}, got {self.mode!r}")
        if self.clip_min is not None and self.clip_max is not None and self.clip_min > self.clip_max:
            raise ValueError(f"importance sampling clip_min {self.clip_min} is above clip_max {self.clip_max}")

    def weights(self, old_logps: Tensor, sampler_logps: Tensor, mask: Tensor) -> Tensor:
        """``[N, T]`` (token modes) or ``[N, 1]`` (sequence modes) weights; ``sampler_logps`` checked first."""
        check_sampler_logps(sampler_logps, mask)
        return importance_weights(old_logps, sampler_logps, mask, self.mode, self.clip_min, self.clip_max)


def check_sampler_logps(sampler_logps: Tensor, mask: Tensor) -> None:
    """A ``ValueError`` naming what is wrong unless ``sampler_logps`` are ``[N, T]`` log-probabilities.

    At completion tokens (``mask`` 1) each value must be ``<= 0`` or NaN (a token the sampler gave no log-prob for:
    ratio 1, as in TRL); infinite values would turn the weights into 0 or the clip bound without saying so.
    """
    where = "Rollout.sampler_logps"
    if sampler_logps.shape != mask.shape:
        raise ValueError(
            f"{where} has shape {tuple(sampler_logps.shape)}, expected {tuple(mask.shape)} "
            "([N, T]: one log-prob per completion token, like completion_ids)"
        )
    if not sampler_logps.is_floating_point():
        raise ValueError(f"{where} must be a floating-point tensor of log-probs, got {sampler_logps.dtype}")
    real = sampler_logps[mask.bool()]  # [tokens]
    if torch.isinf(real).any():
        raise ValueError(f"{where} has {int(torch.isinf(real).sum())} infinite values at completion tokens")
    if (real > 1e-4).any():
        raise ValueError(
            f"{where} has values above 0 (max {real.nan_to_num(nan=0.0).max().item():.4g}) at completion tokens: "
            "they must be log-probabilities, not probabilities or logits"
        )


@dataclass
class Rollout:
    """A batch of groups: ``G`` sampled completions for each of ``B`` prompts, group-major.

    Completion ``n`` belongs to prompt ``n // G``. Tensors live on the policy's device.
    """

    prompts: list[str]  # B prompts as fed to the model (chat template applied where used)
    completions: list[str]  # N decoded completions
    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P] 1 for real prompt tokens
    completion_ids: Tensor  # [N, T] right-padded
    completion_mask: Tensor  # [N, T] 1 up to and including the first EOS
    group_size: int  # G
    old_logps: Tensor | None = None  # [N, T] log pi_old(y_t | q, y_<t), temperature applied
    hidden: Tensor | None = None  # [N, D] rep(y_i): last-layer hidden state at the final completion token
    truncated: Tensor | None = None  # [N] bool, True where no EOS was generated
    # [prompts, T'] log p(continuation | prompt) of continuations scored during generation (sample_shared)
    continuation_logps: Tensor | None = None
    prompt_cache: PromptCache | None = None  # the KV cache of the prompts the sampler was asked to keep
    sampler_logps: Tensor | None = None  # [N, T] log-probs of the sampled tokens under the sampling engine (vLLM)
    importance_correction: ImportanceCorrection | None = None  # set: the loss weights by pi_old / pi_sampler
    rows: list[dict[str, Any]] = field(default_factory=list)  # B data rows (prompt plus e.g. the answer column)
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. the sampler's phase timings

    @property
    def num_prompts(self) -> int:
        """``B``."""
        return len(self.prompts)

    def input_ids(self) -> Tensor:
        """``[N, P+T]`` prompt and completion tokens side by side."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    def attention_mask(self) -> Tensor:
        """``[N, P+T]`` the mask matching :meth:`input_ids`."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def scoring_inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(prompt_ids, prompt_mask, completion_ids, completion_mask)``, the arguments of a scoring pass."""
        return self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask

    def row_columns(self) -> dict[str, list[Any]]:
        """Every data column repeated ``G`` times, so that each list has one entry per completion."""
        keys = self.rows[0].keys() if self.rows else []
        return {k: [row[k] for row in self.rows for _ in range(self.group_size)] for k in keys}

    def sampler_weights(self, old_logps: Tensor) -> Tensor | None:
        """``[N, T]`` or ``[N, 1]`` weights ``pi_old / pi_sampler`` of the loss's policy term, given ``old_logps``
        ``[N, T]``; ``None`` without an :class:`ImportanceCorrection` (the samplers that score with the policy)."""
        if self.importance_correction is None:
            return None
        sampler_logps = require(self.sampler_logps, "Rollout.sampler_logps (Rollout.importance_correction is set)")
        return self.importance_correction.weights(old_logps, sampler_logps, self.completion_mask)

    def select(self, index: Tensor) -> Rollout:
        """The completions at ``index`` (a 1D tensor of completion positions), as a view for an update step.

        ``rows``/``prompts`` are kept whole: the selection is used for the loss, not for rewards.
        """
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Rollout(
            prompts=self.prompts,
            completions=[self.completions[i] for i in index.tolist()],
            prompt_ids=self.prompt_ids[index],
            prompt_mask=self.prompt_mask[index],
            completion_ids=self.completion_ids[index],
            completion_mask=self.completion_mask[index],
            group_size=self.group_size,
            old_logps=pick(self.old_logps),
            hidden=pick(self.hidden),
            truncated=pick(self.truncated),
            sampler_logps=pick(self.sampler_logps),
            importance_correction=self.importance_correction,
            rows=self.rows,
        )


@dataclass
class Scores:
    """Per-token scores of completions under one model."""

    logps: Tensor  # [N, T] log-probabilities of the completion tokens
    entropy: Tensor | None = None  # [N, T] entropy of the (temperature-scaled) next-token distribution
    hidden: Tensor | None = None  # [N, D] final-token last-layer hidden state


@dataclass
class CausalGraph:
    """The causal structure of each group (paper Sec. 3): who conditions whom.

    GRPO's view is the fork alone: ``q -> y_i`` with independent responses (``integrated is None``).
    GCPO adds the collider: all candidates cause integrated outputs ``y_{n,l}``, and every candidate ``i`` gets
    conditioning contexts ``x_{i,l} = q + {y_k, k != i} + y_{n,l}``.
    """

    group_size: int  # G
    representations: Tensor | None = None  # [N, D] rep(y_i) of every candidate
    integrated: list[list[str]] | None = None  # [B][M] integrated outputs y_{n,l}
    context_prompts: list[list[list[str]]] | None = None  # [B][G][M] rendered contexts x_{i,l}
    context_representations: Tensor | None = None  # [N, M, D] Zbar_{i,l}: mean rep of K samples per context
    context_ids: Tensor | None = None  # [N, M, Px] left-padded token ids of the contexts x_{i,l}
    context_mask: Tensor | None = None  # [N, M, Px] 1 for real context tokens
    context_samples: list[str] | None = None  # [N*M*K] the samples O_{i,l,k}, candidate-major
    # [N, M, T] log p_old(y_{i,t} | x_{i,l}, y_{i,<t}), scored while the contexts were generated (when the sampler
    # could); the causal KL's p_x and p_phi (Eq. 13) then need no pass of their own
    context_logps: Tensor | None = None
    context_cache: PromptCache | None = None  # [N] x_{i,0}'s KV cache from context generation, when kept
    set_contexts: SetContexts | None = None  # the contexts as sets (context_layout: set); the causal passes use them
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def is_independent(self) -> bool:
        """True for GRPO's graph: no collider, responses conditioned on q alone."""
        return self.integrated is None

    def structure(self, group: int = 0) -> dict[str, Any]:
        """Group ``group``'s nodes, causal edges and conditioning sets, by name, for inspection.

        Edges: ``q -> y_i`` (the fork) and, with a collider, ``y_i -> y_n,l`` and ``q -> y_n,l``. Each context
        ``x_i,l`` lists the nodes it conditions on: ``q``, every ``y_k`` with ``k != i``, and ``y_n,l``.
        """
        G = self.group_size
        M = 0 if self.integrated is None else len(self.integrated[group])
        ys, yn = [f"y_{i}" for i in range(G)], [f"y_n,{m}" for m in range(M)]
        edges = [("q", y) for y in ys] + [(src, n) for n in yn for src in ["q", *ys]]
        contexts = {
            f"x_{i},{m}": ["q", *[y for k, y in enumerate(ys) if k != i], yn[m]] for i in range(G) for m in range(M)
        }
        return {"nodes": ["q", *ys, *yn], "edges": edges, "contexts": contexts}


@dataclass
class Advantages:
    """Per-completion advantages and the statistics worth logging."""

    values: Tensor  # [N] advantage of each completion (the same for all its tokens)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Penalty:
    """A per-token penalty added to the negative surrogate before aggregation (already weighted, e.g. beta*KL)."""

    per_token: Tensor  # [N, T]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PenaltyInputs:
    """What a penalty prepares once per rollout, without gradients (``ProjectedKL.prepare``).

    Every tensor has leading dimension ``N`` (one row per completion), so :meth:`select` cuts the mini- and
    micro-batches of the update. A custom penalty subclasses this dataclass to add its own tensor fields.
    """

    ref_logps: Tensor | None = None  # [N, T] log pi_ref(y_t | q, y_<t) (Eq. 7)
    causal_ref_logps: Tensor | None = None  # [N, T] log p'_ref, the causally projected reference (Eq. 13)
    causal_clamped: Tensor | None = None  # [N, T] bool: p'_ref was clamped into [min_prob, 1]
    context_ids: Tensor | None = None  # [N, Px] the context x_i = x_{i,0} pi_theta is scored on (Eq. 12)
    context_mask: Tensor | None = None  # [N, Px]
    context_cache: PromptCache | None = None  # [N] x_i's KV cache under the rollout policy (context_frozen)
    set_contexts: SetContexts | None = None  # [N] x_i as a set (context_layout: set), scored packed per group

    def select(self, index: Tensor) -> PenaltyInputs:
        """The rows at ``index`` of every tensor (and :class:`PromptCache`) field; other fields as they are."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        rows: dict[str, Any] = {
            k: v[index] if isinstance(v, Tensor) else v.select(index) for k, v in values.items() if _rows(v)
        }
        return replace(self, **rows)

    def after_update(self) -> PenaltyInputs:
        """What stays valid once the policy has taken an optimiser step: everything but the KV caches made under
        the rollout policy's weights (``context_cache``)."""
        return replace(self, context_cache=None)


def _rows(value: Any) -> bool:
    """Whether a field has one row per completion (a tensor, a prompt cache, set contexts)."""
    return isinstance(value, Tensor | PromptCache | SetContexts)


@dataclass
class PolicyModels:
    """The models a step scores with: the trainable policy, the frozen reference (if any) and the tokenizer."""

    policy: Any  # a Hugging Face causal LM (nn.Module)
    tokenizer: Any  # a Hugging Face tokenizer, left padding
    reference: Any | None = None
    temperature: float = 1.0  # the rollout temperature, applied whenever log-probs are recomputed
    render: Callable[[str], str] = str  # text -> model input (applies the chat template where one is used)
    logits_chunk_size: int | None = None  # rows per LM-head chunk when scoring (None: the model's full logits)
