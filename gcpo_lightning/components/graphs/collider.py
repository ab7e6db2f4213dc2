"""GCPO's causal graph (paper Sec. 3): the collider of integrated outputs and the conditioning contexts.

For every group of ``G`` candidates ``y_i`` to a query ``q``:

1. ``M`` integrated outputs ``y_{n,l} ~ pi_old(. | integration prompt(q, y_0..y_{G-1}))``;
2. contexts ``x_{i,l} = q + {y_k : k != i} + y_{n,l}`` for every candidate ``i`` and integrated output ``l``;
3. ``K`` samples ``O_{i,l,k} ~ pi_old(. | x_{i,l})`` and their mean representation ``Zbar_{i,l}``.

Every phase is one batched sampler call over the whole batch (no Python loop over ``i`` or ``l``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from gcpo_lightning.components.graphs.prompts import (
    CANDIDATE_LINE,
    CONTEXT_TEMPLATE,
    INTEGRATION_TEMPLATE,
    render_candidates,
)
from gcpo_lightning.components.graphs.set_prompts import build_set_contexts, split_context_template
from gcpo_lightning.components.sampling.group_sampler import encode_prompts
from gcpo_lightning.components.scoring.logprobs import score_in_batches
from gcpo_lightning.functional.clock import timed
from gcpo_lightning.interfaces.containers import CausalGraph, PolicyModels, Rollout, SetContexts, require
from gcpo_lightning.interfaces.protocols import CausalGraphBuilder, Sampler


def require_placeholders(name: str, template: str, placeholders: tuple[str, ...]) -> None:
    """Raise a ``ValueError`` naming the template and the placeholders it lacks."""
    missing = [p for p in placeholders if "{" + p + "}" not in template]
    if missing:
        raise ValueError(f"{name} is missing placeholder(s) {['{' + p + '}' for p in missing]}: {template!r}")


def throughput(phase: str, samples: Rollout, seconds: float) -> dict[str, float]:
    """``tokens_per_s/<phase>``: the phase's sampled tokens (generated, or scored for a representation) per second."""
    tokens = float(samples.completion_mask.sum())
    return {f"tokens_per_s/{phase}": tokens / seconds if seconds > 0 else 0.0}


class ColliderGraphBuilder(CausalGraphBuilder):
    """GCPO's graph: integrated outputs (the collider), contexts ``x_{i,l}`` and their representations.

    ``rep(o)`` is the policy's final-token last-layer hidden state of ``prompt(q) + o`` (the spec's decision), so
    candidates and context samples live in one space; ``represent_in_context`` uses ``x_{i,l} + o`` instead.

    Args:
        num_integrated: ``M``, integrated outputs per group (the paper uses ``M = G``).
        num_context_samples: ``K``, samples per context ``x_{i,l}`` (the paper uses ``K = G``). ``0``: no samples
            and no ``Zbar`` (``context_representations`` is ``None``), the contexts only encoded for the causal KL,
            which then scores ``p_x``, ``p_phi`` in its own pass (the same values; tested): for adjusters that read
            no ``Zbar``, such as the "without causal weighting" ablation (``GroupNormalizedAdvantage``).
            Needs ``context_layout: text`` and ``keep_context_cache: false``.
        integration_template: the integration prompt; placeholders ``{question}`` and ``{candidates}``.
        context_template: the context ``x_{i,l}``; placeholders ``{question}``, ``{others}``, ``{integrated}``.
        candidate_template: one numbered candidate line; placeholders ``{index}`` (1-based) and ``{text}``.
        max_candidate_tokens: cut each candidate to its last N tokens in the prompts (``None``: never cut).
        represent_in_context: represent context samples under their own context rather than under ``q``.
        batch_size: rows per no-grad forward pass.
        share_prefix: generate with prefix reuse where the sampler offers it (``GroupSampler.sample_shared``):
            the ``M*K`` context rows of a candidate (and the ``M`` integrated rows of a group) prefill their shared
            prefix once and fork its KV cache. Same tokens as without (exact up to float rounding; tested);
            ``false`` keeps one independent prompt per row.
        score_candidates: while the contexts are generated (``share_prefix`` with a sampler that can), also score
            each candidate ``y_i`` teacher-forced after its contexts ``x_{i,l}`` on the same KV cache:
            ``CausalGraph.context_logps``, the causal KL's ``p_x``/``p_phi`` without a second pass over the
            contexts (exact to float rounding; tested). Turn off when nothing reads them (``kappa: 0``).
        keep_context_cache: with ``score_candidates``, keep the KV cache of every ``x_{i,0}`` from context
            generation (``CausalGraph.context_cache``), which ``CausalProjectedKL(policy_context="context_frozen")``
            then attends to instead of encoding ``x_i`` again (same values; valid until the first optimiser step).
            Memory: one cache row per candidate.
        context_layout: ``text`` (the paper's contexts as prompts: each ``x_{i,l}`` is read in order, every
            candidate attending to those before it) or ``set`` (**[decision]**, the paper's ``x_i`` is a set: each
            group's header and candidate lines are encoded once, every line attending only to the header and itself,
            and each context is that encoding without its own candidate's line, followed by its tail; positions keep
            a gap where ``y_i`` was). ``set`` prefills one block per group instead of one context per candidate and
            lets the causal KL's passes on ``x_i`` encode each group's block once; its deviation from ``text``
            is measured in docs/benchmarks.md. Needs the ``KVCacheLoop`` backend, ``represent_in_context: false``,
            ``keep_context_cache: false`` and a context template with ``{others}`` followed by a newline.
    """

    def __init__(
        self,
        num_integrated: int = 2,
        num_context_samples: int = 1,
        integration_template: str = INTEGRATION_TEMPLATE,
        context_template: str = CONTEXT_TEMPLATE,
        candidate_template: str = CANDIDATE_LINE,
        max_candidate_tokens: int | None = None,
        represent_in_context: bool = False,
        batch_size: int = 64,
        share_prefix: bool = True,
        score_candidates: bool = True,
        keep_context_cache: bool = False,
        context_layout: Literal["text", "set"] = "text",
    ) -> None:
        if num_integrated < 1:
            raise ValueError(f"ColliderGraphBuilder: num_integrated (M) must be >= 1, got {num_integrated}")
        if num_context_samples < 0:
            raise ValueError(f"ColliderGraphBuilder: num_context_samples (K) must be >= 0, got {num_context_samples}")
        if num_context_samples == 0 and (context_layout != "text" or keep_context_cache):
            raise ValueError(
                "ColliderGraphBuilder: num_context_samples: 0 (no context samples) needs context_layout: text and "
                "keep_context_cache: false (both act while the context samples are generated)"
            )
        if keep_context_cache and not score_candidates:
            raise ValueError("ColliderGraphBuilder: keep_context_cache needs score_candidates: true")
        if max_candidate_tokens is not None and max_candidate_tokens < 1:
            raise ValueError(
                f"ColliderGraphBuilder: max_candidate_tokens must be >= 1 or null, got {max_candidate_tokens}"
            )
        if context_layout not in ("text", "set"):
            raise ValueError(f"ColliderGraphBuilder: context_layout must be 'text' or 'set', got {context_layout!r}")
        if context_layout == "set":
            split_context_template(context_template)  # raises, naming what the template lacks
            if represent_in_context:
                raise ValueError("ColliderGraphBuilder: context_layout: set needs represent_in_context: false")
            if keep_context_cache:
                raise ValueError(
                    "ColliderGraphBuilder: context_layout: set does not keep x_i's KV cache (keep_context_cache, for "
                    "policy_context: context_frozen); use context_layout: text for that"
                )
        require_placeholders("integration_template", integration_template, ("question", "candidates"))
        require_placeholders("context_template", context_template, ("question", "others", "integrated"))
        require_placeholders("candidate_template", candidate_template, ("index", "text"))
        self.num_integrated = num_integrated
        self.num_context_samples = num_context_samples
        self.integration_template = integration_template
        self.context_template = context_template
        self.candidate_template = candidate_template
        self.max_candidate_tokens = max_candidate_tokens
        self.represent_in_context = represent_in_context
        self.batch_size = batch_size
        self.share_prefix = share_prefix
        self.score_candidates = score_candidates
        self.keep_context_cache = keep_context_cache
        self.context_layout = context_layout

    @property
    def needs_representations(self) -> bool:
        """Whether the rollout's hidden states are read: ``rep(y_i)`` meets ``Zbar``, so not when ``K = 0``."""
        return self.num_context_samples > 0

    # ----- prompts -----------------------------------------------------------------------------------------------

    def candidate_list(self, texts: list[str], skip: int | None = None) -> str:
        """Numbered candidate lines (original 1-based numbering), leaving out candidate ``skip``."""
        return render_candidates(texts, skip, self.candidate_template)

    def candidate_texts(self, rollout: Rollout, tokenizer: Any) -> list[str]:
        """The ``N`` candidates as they appear in prompts (cut to their last tokens if configured)."""
        if self.max_candidate_tokens is None:
            return list(rollout.completions)
        cut = []
        for ids, mask in zip(rollout.completion_ids, rollout.completion_mask):
            real = ids[mask.bool()][-self.max_candidate_tokens :]
            cut.append(tokenizer.decode(real, skip_special_tokens=True))
        return cut

    def integration_prompts(self, questions: list[str], cands: list[str], G: int) -> list[str]:
        """One integration prompt per group: ``q`` plus all ``G`` candidates.  ``B`` strings."""
        return [
            self.integration_template.format(question=q, candidates=self.candidate_list(cands[b * G : (b + 1) * G]))
            for b, q in enumerate(questions)
        ]

    def context_prompts(self, questions: list[str], cands: list[str], integrated: list[list[str]], G: int) -> list:
        """``[B][G][M]`` contexts ``x_{i,l}``: ``q``, the candidates other than ``i``, integrated output ``l``."""
        return [
            [
                [
                    self.context_template.format(
                        question=q, others=self.candidate_list(cands[b * G : (b + 1) * G], skip=i), integrated=y_n
                    )
                    for y_n in integrated[b]
                ]
                for i in range(G)
            ]
            for b, q in enumerate(questions)
        ]

    # ----- the graph ---------------------------------------------------------------------------------------------

    def build(self, rollout: Rollout, models: PolicyModels, sampler: Sampler) -> CausalGraph:
        """Sample the collider and the contexts of every group, and represent every output."""
        G, M, K = rollout.group_size, self.num_integrated, self.num_context_samples
        metrics: dict[str, float] = {}
        questions = [row.get("question", row["prompt"]) for row in rollout.rows]
        cands = self.candidate_texts(rollout, models.tokenizer)
        with timed(metrics, "integration"):
            integ_prompts = [models.render(p) for p in self.integration_prompts(questions, cands, G)]
            integ = self.sample(sampler, models, [[p] for p in integ_prompts], M, score=False)  # B*M outputs
            integrated = [integ.completions[b * M : (b + 1) * M] for b in range(len(questions))]  # [B][M]
        metrics.update(throughput("integration", integ, metrics["timing/integration"]))
        contexts = self.context_prompts(questions, cands, integrated, G)  # [B][G][M]
        per_candidate = [[models.render(x) for x in per_i] for per_b in contexts for per_i in per_b]  # [N][M]
        if K == 0:
            flat = [x for per_i in per_candidate for x in per_i]  # N*M, order (b, i, l)
            ids, mask = encode_prompts(models.tokenizer, flat, 1, rollout.completion_ids.device)  # [N*M, Px] twice
            return self.graph(rollout, integrated, contexts, ids, mask, metrics, context_samples=[])
        with timed(metrics, "context_generation"):
            set_contexts = None
            if self.context_layout == "set":
                set_contexts = build_set_contexts(
                    models,
                    questions,
                    cands,
                    integrated,
                    G,
                    self.context_template,
                    self.candidate_template,
                    rollout.completion_ids.device,
                )
            samples = self.sample_contexts(sampler, models, rollout, per_candidate, set_contexts)  # N*M*K rows
        metrics.update(throughput("context_generation", samples, metrics["timing/context_generation"]))
        with timed(metrics, "context_representation"):
            reps = self.represent(samples, rollout, models, M * K)  # [N*M*K, D]
        metrics.update(throughput("context_representation", samples, metrics["timing/context_representation"]))
        N, D = rollout.completion_ids.shape[0], reps.shape[-1]
        # the contexts as the sampler encoded them (each row repeated K times): no second tokenization
        ids, mask = samples.prompt_ids[::K], samples.prompt_mask[::K]  # [N*M, Px] twice
        return self.graph(
            rollout,
            integrated,
            contexts,
            ids,
            mask,
            metrics,
            context_representations=reps.view(N, M, K, D).mean(2),  # [N, M, D] Zbar_{i,l}
            context_samples=samples.completions,  # [N*M*K] O_{i,l,k}
            context_logps=self.context_logps(samples, N, M, rollout.completion_ids.shape[1]),  # [N, M, T] or None
            context_cache=samples.prompt_cache,  # [N] x_{i,0}'s KV cache, or None
            set_contexts=set_contexts,  # the contexts as sets (context_layout: set), or None
        )

    def sample_contexts(
        self,
        sampler: Sampler,
        models: PolicyModels,
        rollout: Rollout,
        per_candidate: list[list[str]],
        set_contexts: SetContexts | None,
    ) -> Rollout:
        """``K`` samples of every rendered context (``[N][M]``; read as sets when ``set_contexts``), rows in order
        ``(b, i, l, k)``; each candidate scored after its contexts (``score_candidates``), ``x_{i,0}``'s KV cache
        kept (``keep_context_cache``)."""
        M, K = self.num_integrated, self.num_context_samples
        continuations = self.continuations(rollout, M) if self.score_candidates else None  # N*M, y_i after x_{i,l}
        keep = list(range(0, len(per_candidate) * M, M)) if self.keep_context_cache else None  # x_{i,0}, order (b, i)
        if set_contexts is not None:
            return self.sample_set(sampler, models, set_contexts, K, continuations, keep)
        return self.sample(
            sampler, models, per_candidate, K, score=self.represent_in_context, continuations=continuations, keep=keep
        )

    def graph(
        self,
        rollout: Rollout,
        integrated: list[list[str]],
        contexts: list,
        context_ids: Tensor,
        context_mask: Tensor,
        metrics: dict[str, float],
        **samples: Any,
    ) -> CausalGraph:
        """The :class:`CausalGraph` of the rollout's groups: the ``N*M`` left-padded contexts (``[N*M, Px]``, order
        ``(b, i, l)``) as ``[N, M, Px]``, the fields that come of the context samples given as ``samples``."""
        N, M, device = rollout.completion_ids.shape[0], self.num_integrated, rollout.completion_ids.device
        metrics["graph/context_tokens"] = float(context_ids.shape[1])
        return CausalGraph(
            group_size=rollout.group_size,
            representations=rollout.hidden,
            integrated=integrated,
            context_prompts=contexts,
            context_ids=context_ids.to(device).view(N, M, -1),  # [N, M, Px] left-padded x_{i,l}
            context_mask=context_mask.to(device).view(N, M, -1),  # [N, M, Px]
            metrics=metrics,
            **samples,
        )

    @staticmethod
    def continuations(rollout: Rollout, M: int) -> list[list[int]]:
        """Candidate ``y_i``'s tokens once per context ``x_{i,l}``: ``N*M`` lists, order ``(b, i, l)``."""
        ys = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]
        return [y for y in ys for _ in range(M)]

    @staticmethod
    def context_logps(samples: Rollout, N: int, M: int, T: int) -> Tensor | None:
        """``[N, M, T]`` ``log p(y_{i,t} | x_{i,l}, y_{i,<t})`` from the sampler's scored continuations (0 on
        padding), or ``None`` when the sampler did not score them."""
        logps = samples.continuation_logps  # [N*M, T'] with T' <= T
        if logps is None:
            return None
        return torch.nn.functional.pad(logps[:, :T], (0, T - min(T, logps.shape[1]))).view(N, M, T)

    def sample(
        self,
        sampler: Sampler,
        models: PolicyModels,
        groups: list[list[str]],
        K: int,
        score: bool,
        continuations: list[list[int]] | None = None,
        keep: list[int] | None = None,
    ) -> Rollout:
        """``K`` samples of every prompt of ``groups`` (flattened order); the prompts of a group share a prefix,
        encoded once when ``share_prefix`` and the sampler can (``sample_shared``), which then also scores the
        ``continuations`` (one per prompt) on the prompts' KV cache and keeps the cache of the prompts ``keep``."""
        if self.share_prefix and hasattr(sampler, "sample_shared"):
            if continuations is None:
                return sampler.sample_shared(models, groups, K, score=score)
            return sampler.sample_shared(models, groups, K, score=score, continuations=continuations, keep_cache=keep)
        return sampler.sample(models, [p for g in groups for p in g], K, score=score)

    @staticmethod
    def sample_set(
        sampler: Sampler,
        models: PolicyModels,
        contexts: SetContexts,
        K: int,
        continuations: list[list[int]] | None,
        keep: list[int] | None,
    ) -> Rollout:
        """``K`` samples of every context read as a set (``context_layout: set``), rows ``(b, i, l, k)``."""
        sample = getattr(sampler, "sample_set", None)
        if sample is None:
            raise ValueError(
                f"ColliderGraphBuilder: context_layout: set needs a sampler with sample_set (GroupSampler with the "
                f"KVCacheLoop backend), got {type(sampler).__name__}"
            )
        return sample(models, contexts, K, continuations=continuations, keep_cache=keep)

    def represent(self, samples: Rollout, rollout: Rollout, models: PolicyModels, per_candidate: int) -> Tensor:
        """``rep(O)`` of every context sample: under its own context, or (default) under ``prompt(q)``.

        ``per_candidate = M*K`` samples belong to each candidate; candidate ``n``'s prompt is ``rollout.prompt_ids[n]``.
        """
        if self.represent_in_context:
            return require(samples.hidden, "the context samples' hidden states")
        prompt_ids = rollout.prompt_ids.repeat_interleave(per_candidate, dim=0)  # [N*M*K, P]
        prompt_mask = rollout.prompt_mask.repeat_interleave(per_candidate, dim=0)  # [N*M*K, P]
        scores = score_in_batches(
            models.policy,
            prompt_ids,
            prompt_mask,
            samples.completion_ids,
            samples.completion_mask,
            models.temperature,
            True,
            self.batch_size,
            models.logits_chunk_size,
        )
        return require(scores.hidden, "Scores.hidden")

    # ----- a check before training -------------------------------------------------------------------------------

    def check_fits(self, models: PolicyModels, question: str, num_generations: int, max_completion_length: int) -> None:
        """Raise before training when the longest possible context cannot fit the model's maximum length.

        The bound counts every candidate and the integrated output at ``max_completion_length`` tokens (or
        ``max_candidate_tokens`` when candidates are cut), plus the context's own completion.
        """
        limit = getattr(models.policy.config, "max_position_embeddings", None)
        if limit is None:
            return
        count = lambda text: len(models.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        per_candidate = min(max_completion_length, self.max_candidate_tokens or max_completion_length)
        empty = [""] * num_generations
        longest = max(
            count(
                models.render(
                    self.integration_template.format(question=question, candidates=self.candidate_list(empty))
                )
            ),
            count(
                models.render(
                    self.context_template.format(question=question, others=self.candidate_list(empty, 0), integrated="")
                )
            ),
        )
        need = longest + num_generations * per_candidate + 2 * max_completion_length
        if need > limit:
            raise ValueError(
                f"ColliderGraphBuilder: contexts can reach {need} tokens (G={num_generations} candidates of up to "
                f"{per_candidate} tokens, integrated and own completions of {max_completion_length}), more than the "
                f"model's maximum length {limit}; lower num_generations or max_completion_length, or set "
                "max_candidate_tokens"
            )
