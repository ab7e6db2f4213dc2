"""GCPO's causally projected KL (paper Eq. 12, 13), combined with the ordinary reference KL (Eq. 7).

Per token of candidate ``y_i``::

    p'_ref = clamp(p(y_t | x_{i,0}) - mean_l p(y_t | x_{i,l}) + p(y_t | q), min_prob, 1)      # Eq. 13, no grad
    kl_causal = k3(p'_ref / pi_theta(y_t | x_i))                                              # Eq. 12
    penalty = beta * k3(pi_ref / pi_theta) + kappa * kl_causal
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from gcpo_lightning.components.penalties.reference_kl import ReferenceKL
from gcpo_lightning.components.scoring.logprobs import (
    score_after_cache,
    score_after_frozen_prefix,
    score_completions,
    score_in_batches,
)
from gcpo_lightning.components.scoring.prefix_sharing import shared_prefix_logps
from gcpo_lightning.components.scoring.set_scoring import set_context_logps
from gcpo_lightning.functional.causal import projected_reference_probs
from gcpo_lightning.functional.losses import k3, masked_mean
from gcpo_lightning.interfaces.containers import (
    CausalGraph,
    Penalty,
    PenaltyInputs,
    PolicyModels,
    Rollout,
    Scores,
    SetContexts,
    require,
)
from gcpo_lightning.interfaces.protocols import ProjectedKL

PolicyContext = Literal["context", "context_frozen", "query"]


def context_probs_shared(rollout: Rollout, graph: CausalGraph, models: PolicyModels, batch_size: int) -> Tensor:
    """As :func:`context_probs`, each candidate's ``M`` contexts packed over their shared prefix.  ``[N, M, T]``."""
    ids = require(graph.context_ids, "CausalGraph.context_ids")  # [N, M, Px]
    mask = require(graph.context_mask, "CausalGraph.context_mask").bool()  # [N, M, Px]
    N, M, _ = ids.shape
    contexts = [[ids[n, m][mask[n, m]].tolist() for m in range(M)] for n in range(N)]
    ys = [y[m.bool()].tolist() for y, m in zip(rollout.completion_ids, rollout.completion_mask)]
    logps = shared_prefix_logps(models.policy, contexts, ys, models.temperature, batch_size)  # N x [M, T_n]
    out = torch.zeros(N, M, rollout.completion_ids.shape[1], device=ids.device)  # padding: log 1 (masked later)
    for n, lp in enumerate(logps):
        out[n, :, : lp.shape[1]] = lp
    return out.exp()


def context_probs(rollout: Rollout, graph: CausalGraph, models: PolicyModels, batch_size: int) -> Tensor:
    """``p(y_{i,t} | x_{i,l}, y_{i,<t})`` under the rollout policy for every candidate and context.  ``[N, M, T]``."""
    ids = require(graph.context_ids, "CausalGraph.context_ids")  # [N, M, Px]
    mask = require(graph.context_mask, "CausalGraph.context_mask")  # [N, M, Px]
    N, M, _ = ids.shape
    scores = score_in_batches(
        models.policy,
        ids.flatten(0, 1),
        mask.flatten(0, 1),
        rollout.completion_ids.repeat_interleave(M, dim=0),
        rollout.completion_mask.repeat_interleave(M, dim=0),
        models.temperature,
        batch_size=batch_size,
        logits_chunk_size=models.logits_chunk_size,
    )
    return scores.logps.exp().view(N, M, -1)


@torch.no_grad()
def context_probs_set(rollout: Rollout, contexts: SetContexts, models: PolicyModels) -> Tensor:
    """As :func:`context_probs`, the contexts read as sets (:func:`set_context_logps`).  ``[N, M, T]``."""
    N, M = contexts.tail_ids.shape[:2]
    policy, was_training = models.policy, models.policy.training
    policy.eval()
    try:
        rows = torch.arange(N, device=contexts.own.device).repeat_interleave(M)  # [N*M] order (n, l)
        logps = set_context_logps(
            policy,
            contexts.select(rows),
            torch.arange(M, device=rows.device).repeat(N),
            rollout.completion_ids[rows],
            rollout.completion_mask[rows],
            models.temperature,
            models.logits_chunk_size or 16,
        )
    finally:
        policy.train(was_training)
    return logps.exp().view(N, M, -1)


class CausalProjectedKL(ProjectedKL):
    """``beta * KL(pi_theta || pi_ref) + kappa * KL(pi_theta(.|x_i) || p'_ref)``, both with k3 (paper Eq. 7, 12).

    Needs a graph from :class:`ColliderGraphBuilder` when ``kappa > 0``.

    Args:
        beta: weight of the reference KL (0 builds no reference model).
        kappa: weight of the causal KL (the paper uses 0.06; 0 is the "no causal KL" ablation).
        policy_context: ``context`` scores ``pi_theta`` on ``x_i`` as the paper writes (an extra gradient pass over
            the long context); ``context_frozen`` gives the same values with ``x_i`` encoded without gradient (the
            gradient pass covers only ``y_i``; the gradient through ``x_i``'s keys and values is dropped, measured in
            docs/benchmarks.md); ``query`` reuses the main pass on ``q`` (cheap). **[decision]**
        min_prob: lower clamp of ``p'_ref``.
        max_ratio: caps ``u = p'_ref / pi_theta`` inside the causal k3 (tokens beyond the cap give no gradient);
            ``None`` leaves it unbounded as in the paper. **[decision]** k3's gradient grows like ``u``, and a
            candidate sampled under ``q`` can be very unlikely under ``x_i`` (``u`` in the thousands), which
            made unbounded training diverge on the embedded model (docs/results.md).
        share_prefix: score each candidate's ``M`` contexts in one packed pass over their shared prefix (exact;
            needs a model that accepts 4D attention masks, as Hugging Face eager/sdpa attention does).
        batch_size: rows per no-grad forward pass (packed sequences when ``share_prefix``).
    """

    def __init__(
        self,
        beta: float = 0.04,
        kappa: float = 0.06,
        policy_context: PolicyContext = "context",
        min_prob: float = 1e-6,
        max_ratio: float | None = None,
        share_prefix: bool = True,
        batch_size: int = 64,
    ) -> None:
        if beta < 0 or kappa < 0:
            raise ValueError(f"CausalProjectedKL: beta and kappa must be >= 0, got beta={beta}, kappa={kappa}")
        if policy_context not in ("context", "context_frozen", "query"):
            raise ValueError(
                "CausalProjectedKL: policy_context must be 'context', 'context_frozen' or 'query', got "
                f"{policy_context!r}"
            )
        if max_ratio is not None and max_ratio <= 1:
            raise ValueError(f"CausalProjectedKL: max_ratio must be > 1 or null, got {max_ratio}")
        if not 0 < min_prob < 1:
            raise ValueError(f"CausalProjectedKL: min_prob must be in (0, 1), got {min_prob}")
        self.beta, self.kappa = beta, kappa
        self.reference_kl = ReferenceKL(beta=beta, batch_size=batch_size)  # the ordinary beta term (Eq. 7)
        self.policy_context = policy_context
        self.min_prob = min_prob
        self.max_ratio = max_ratio
        self.share_prefix = share_prefix
        self.batch_size = batch_size

    @property
    def needs_reference(self) -> bool:
        """A frozen reference is built only when ``beta > 0``."""
        return self.reference_kl.needs_reference

    def prepare(self, rollout: Rollout, graph: CausalGraph, models: PolicyModels) -> PenaltyInputs:
        """Reference log-probs and ``log p'_ref`` (no grad), once per rollout."""
        out = self.reference_kl.prepare(rollout, graph, models)  # ref_logps when beta > 0
        if self.kappa > 0:
            if graph.context_ids is None or graph.context_mask is None:
                raise ValueError("CausalProjectedKL with kappa > 0 needs the contexts of ColliderGraphBuilder")
            p = self.context_probs(rollout, graph, models)  # [N, M, T] p(y_{i,t} | x_{i,l}, y_{i,<t})
            p_ref, clamped = projected_reference_probs(
                p[:, 0], p.mean(1), require(rollout.old_logps, "Rollout.old_logps").exp(), self.min_prob
            )
            out.causal_ref_logps = p_ref.log()  # [N, T]
            out.causal_clamped = clamped  # [N, T]
            if self.policy_context != "query":
                out.context_ids = require(graph.context_ids, "CausalGraph.context_ids")[:, 0]  # [N, Px]: x_i = x_{i,0}
                out.context_mask = require(graph.context_mask, "CausalGraph.context_mask")[:, 0]  # [N, Px]
            if self.policy_context == "context_frozen":
                out.context_cache = graph.context_cache  # [N] x_i's KV cache from context generation, if kept
            out.set_contexts = graph.set_contexts  # x_i read as a set (context_layout: set), or None
        return out

    def context_probs(self, rollout: Rollout, graph: CausalGraph, models: PolicyModels) -> Tensor:
        """``p(y_{i,t} | x_{i,l}, y_{i,<t})`` ``[N, M, T]``: as the graph builder scored them while generating the
        contexts (``ColliderGraphBuilder(score_candidates=True)``), else one pass of its own."""
        if graph.context_logps is not None:
            return graph.context_logps.exp()
        if graph.set_contexts is not None:
            return context_probs_set(rollout, graph.set_contexts, models)
        probs = context_probs_shared if self.share_prefix else context_probs
        return probs(rollout, graph, models, self.batch_size)

    def penalty(self, scores: Scores, rollout: Rollout, prepared: PenaltyInputs, models: PolicyModels) -> Penalty:
        """``beta * kl_ref + kappa * kl_causal`` per token, with both KLs and the clamped fraction logged."""
        mask = rollout.completion_mask
        reference = self.reference_kl.penalty(scores, rollout, prepared, models)  # beta * kl_ref
        per_token, metrics = reference.per_token, dict(reference.metrics)  # [N, T]
        if self.kappa > 0:
            logps_x = self.policy_logps_on_context(scores, rollout, prepared, models)  # [N, T], with grad
            log_u = (
                require(prepared.causal_ref_logps, "PenaltyInputs.causal_ref_logps") - logps_x
            )  # [N, T] log(p'_ref / pi_theta)
            if self.max_ratio is not None:
                metrics["causal_ratio_capped_frac"] = masked_mean(
                    (log_u.detach() > math.log(self.max_ratio)).float(), mask
                )
                log_u = log_u.clamp(max=math.log(self.max_ratio))
            kl_causal = k3(log_u)  # [N, T]
            per_token = per_token + self.kappa * kl_causal
            metrics["causal_kl"] = masked_mean(kl_causal.detach(), mask)
            metrics["causal_clamped_frac"] = masked_mean(
                require(prepared.causal_clamped, "PenaltyInputs.causal_clamped").float(), mask
            )
        return Penalty(per_token=per_token, metrics=metrics)

    def policy_logps_on_context(
        self, scores: Scores, rollout: Rollout, prepared: PenaltyInputs, models: PolicyModels
    ) -> Tensor:
        """``log pi_theta(y_t | x_i, y_<t)`` (the paper), or the main pass's ``log pi_theta(y_t | q, y_<t)``."""
        if self.policy_context == "query":
            return scores.logps
        if prepared.context_ids is None or prepared.context_mask is None:
            raise ValueError("CausalProjectedKL: policy_context='context' needs the contexts from prepare()")
        if self.policy_context == "context" and prepared.set_contexts is not None:
            return set_context_logps(  # each group's block encoded once (context_layout: set)
                models.policy,
                prepared.set_contexts,
                torch.zeros_like(prepared.set_contexts.own),  # x_i = x_{i,0}
                rollout.completion_ids,
                rollout.completion_mask,
                models.temperature,
                models.logits_chunk_size or 16,
            )
        if prepared.set_contexts is not None:
            raise ValueError(
                "CausalProjectedKL: policy_context: context_frozen needs the graph builder's context_layout: text "
                "(with context_layout: set use policy_context: context or query)"
            )
        if self.policy_context == "context_frozen" and prepared.context_cache is not None:
            return score_after_cache(  # x_i's KV cache from context generation (the policy has not moved yet)
                models.policy,
                prepared.context_cache,
                rollout.completion_ids,
                rollout.completion_mask,
                models.temperature,
                models.logits_chunk_size,
            )
        if self.policy_context == "context_frozen":
            return score_after_frozen_prefix(
                models.policy,
                prepared.context_ids,
                prepared.context_mask,
                rollout.completion_ids,
                rollout.completion_mask,
                models.temperature,
                models.logits_chunk_size,
            )
        return score_completions(
            models.policy,
            prepared.context_ids,
            prepared.context_mask,
            rollout.completion_ids,
            rollout.completion_mask,
            temperature=models.temperature,
            logits_chunk_size=models.logits_chunk_size,
        ).logps
