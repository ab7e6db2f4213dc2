"""The reference KL penalty (paper Eq. 7): ``beta * k3(pi_ref / pi_theta)`` per token."""

from __future__ import annotations

import torch
from torch import Tensor

from gcpo_lightning.components.scoring.logprobs import score_in_batches
from gcpo_lightning.functional.losses import k3, masked_mean
from gcpo_lightning.interfaces.containers import CausalGraph, Penalty, PenaltyInputs, PolicyModels, Rollout, Scores
from gcpo_lightning.interfaces.protocols import ProjectedKL


def reference_logps(rollout: Rollout, models: PolicyModels, batch_size: int = 64) -> Tensor:
    """``log pi_ref(y_t | q, y_<t)`` for every completion token, ``[N, T]``, temperature applied, no grad."""
    if models.reference is None:
        raise ValueError("reference_logps: models.reference is None; a reference model is needed to score against")
    return score_in_batches(
        models.reference,
        rollout.prompt_ids,
        rollout.prompt_mask,
        rollout.completion_ids,
        rollout.completion_mask,
        models.temperature,
        batch_size=batch_size,
        logits_chunk_size=models.logits_chunk_size,
    ).logps


class ReferenceKL(ProjectedKL):
    """``beta * KL(pi_theta || pi_ref)`` estimated per token with k3 (GRPO's penalty, paper Eq. 7).

    Args:
        beta: the KL weight (TRL's ``beta``). With 0 no reference model is built and nothing is computed.
        batch_size: rows per no-grad reference forward pass.
    """

    needs_representations = False  # reads the reference's log-probs only

    def __init__(self, beta: float = 0.04, batch_size: int = 64) -> None:
        if beta < 0:
            raise ValueError(f"ReferenceKL: beta must be >= 0, got {beta}")
        self.beta = beta
        self.batch_size = batch_size

    @property
    def needs_reference(self) -> bool:
        """A reference model is needed only when ``beta > 0``."""
        return self.beta > 0

    def prepare(self, rollout: Rollout, graph: CausalGraph, models: PolicyModels) -> PenaltyInputs:
        """Reference log-probs of the rollout (none when ``beta == 0``)."""
        if not self.needs_reference:
            return PenaltyInputs()
        return PenaltyInputs(ref_logps=reference_logps(rollout, models, self.batch_size))

    def penalty(self, scores: Scores, rollout: Rollout, prepared: PenaltyInputs, models: PolicyModels) -> Penalty:
        """``beta * k3(pi_ref / pi_theta)`` per token, and the mean KL for logging."""
        if not self.needs_reference:
            return Penalty(per_token=torch.zeros_like(scores.logps))
        if prepared.ref_logps is None:
            raise ValueError("ReferenceKL.penalty: prepared.ref_logps is None; pass what ReferenceKL.prepare returned")
        kl = k3(prepared.ref_logps - scores.logps)  # [N, T]
        return Penalty(per_token=self.beta * kl, metrics={"kl": masked_mean(kl.detach(), rollout.completion_mask)})
