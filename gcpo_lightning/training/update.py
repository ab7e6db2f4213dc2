"""Step 6 of the algorithm, one optimiser step: micro-batch accumulation, rank weighting, clipping, skips.

The loss of a micro-batch is the module's ``compute_loss`` (paper Eq. 10, 12); this function accumulates it over
the micro-batches of a mini-batch with the weights the ``loss`` component declares, so the accumulated gradient is
the mini-batch's (and, with ``token_weighted`` losses, the global token mean's across ranks).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor
from torch.nn.utils import clip_grad_norm_

from gcpo_lightning.components.scoring.logprobs import score_completions
from gcpo_lightning.functional.batching import mini_batches
from gcpo_lightning.functional.losses import clip_fractions, masked_mean, policy_loss
from gcpo_lightning.interfaces.containers import Advantages, PenaltyInputs, PolicyModels, Rollout
from gcpo_lightning.policy.sharding import full_tensor
from gcpo_lightning.training.distributed import max_across_ranks, rank_share


def micro_batch_loss(
    m: Any, mb: Rollout, adv: Tensor, prepared: PenaltyInputs, models: PolicyModels
) -> tuple[Tensor, dict[str, float]]:
    """``-J`` of module ``m`` on a micro-batch under the current policy (paper Eq. 10, 12), and its statistics.

    A rollout with an importance correction (``VLLMSampler``) has its policy term weighted by ``pi_old /
    pi_sampler`` (TRL's ``vllm_importance_sampling_correction``); ``pi_old`` is the update's own detached pass when
    the rollout was not scored (one on-policy step), as TRL's old log-probs then equal it."""
    scores = score_completions(
        m.built_policy, *mb.scoring_inputs(), temperature=models.temperature, logits_chunk_size=models.logits_chunk_size
    )
    penalty = m.kl.penalty(scores, mb, prepared, models)  # 6b
    old_logps = scores.logps.detach() if mb.old_logps is None else mb.old_logps  # on-policy: pi_old = pi_theta
    weights = mb.sampler_weights(old_logps)  # [n, T] / [n, 1] pi_old / pi_sampler (vLLM); None: no correction
    mask, clip = mb.completion_mask.float(), (m.epsilon, m.epsilon_high)
    loss, ratio = policy_loss(
        scores.logps,
        old_logps,
        adv,
        mask,
        penalty.per_token,
        *clip,
        m.loss,  # 6a, 6c
        m.sampler.max_completion_length,
        weights,
    )
    if not torch.isfinite(loss):
        return loss, {}
    clips = clip_fractions(ratio.detach(), adv, mask, *clip)
    entropy = masked_mean(scores.entropy, mask) if scores.entropy is not None else float("nan")
    stats = {"loss": loss.item(), "entropy": entropy, **penalty.metrics, **weight_stats(weights, mask)}
    return loss, {**stats, **{f"clip_ratio/{k}_mean": v.item() for k, v in clips.items()}}


def weight_stats(weights: Tensor | None, mask: Tensor) -> dict[str, float]:
    """The mean sampler/trainer correction weight the loss applied over the completion tokens (none: ``{}``)."""
    if weights is None:
        return {}
    return {"sampling/applied_importance_weight_mean": masked_mean(weights.expand_as(mask), mask)}


def micro_batch_rows(m: Any, mb: Rollout, prepared: PenaltyInputs) -> int | None:
    """Rows per forward/backward pass: ``m.micro_batch_size``, cut so that rows x the padded length of the longest
    sequence read (prompt + completion; context ``x_i`` + completion for the causal KL's pass) stay within
    ``m.micro_batch_tokens``. The longest length is taken over all ranks, so every rank runs as many passes (FSDP)."""
    if m.micro_batch_tokens is None:
        return m.micro_batch_size
    T = mb.completion_ids.shape[1]
    length = mb.prompt_ids.shape[1] + T  # [n, P] and [n, T] are padded to the rollout's longest
    if prepared.context_ids is not None:
        length = max(length, prepared.context_ids.shape[1] + T)  # [n, Px] x_i
    length = max_across_ranks(length, mb.completion_ids.device)
    rows = max(1, m.micro_batch_tokens // length)
    return rows if m.micro_batch_size is None else min(rows, m.micro_batch_size)


def optimisation_step(m: Any, mb: Rollout, adv: Tensor, prepared: PenaltyInputs, models: PolicyModels) -> dict:
    """One optimiser step of module ``m`` on a mini-batch; a non-finite loss or gradient skips the step."""
    opt = cast(LightningOptimizer, m.optimizers())
    opt.zero_grad(set_to_none=True)
    stats: dict[str, float] = {}
    share = rank_share(mb.completion_mask.sum()) if m.loss.token_weighted else 1.0  # this rank's token share
    rows = micro_batch_rows(m, mb, prepared)
    n = len(mb.completions)
    stats["update/micro_batch_rows"] = float(min(rows or n, n))  # the rows a pass reads, at most the mini-batch
    for index, weight in m.loss.micro_batches(mb.completion_mask, rows):
        loss, micro_stats = m.compute_loss(mb.select(index), adv[index], prepared.select(index), models)
        if not torch.isfinite(loss):
            return m.skips.skip(opt, "loss", m.global_step)
        m.manual_backward(loss * weight * share)
        for k, v in micro_stats.items():
            stats[k] = stats.get(k, 0.0) + weight * v
    grad_norm = full_tensor(clip_grad_norm_(m.built_policy.parameters(), m.max_grad_norm or float("inf")))
    if not torch.isfinite(grad_norm):
        return m.skips.skip(opt, "gradient", m.global_step)
    opt.step()
    m.skips.reset()
    scheduler = cast(Any, m.lr_schedulers())
    if scheduler is not None:
        scheduler.step()
    return {**stats, "grad_norm": grad_norm.item()}


def update_policy(
    m: Any, rollout: Rollout, advantages: Advantages, prepared: PenaltyInputs, models: PolicyModels
) -> dict:
    """Step 6: ``m.num_iterations`` passes of clipped-surrogate steps against the rollout's old log-probs."""
    stats: dict[str, list[float]] = {}
    for _ in range(m.num_iterations):
        for index in mini_batches(len(rollout.completions), m.num_generations, m.mini_batch_size, m.device):
            step = optimisation_step(m, rollout.select(index), advantages.values[index], prepared.select(index), models)
            prepared = prepared.after_update()  # the policy has moved: drop what was cached under its old weights
            for k, v in step.items():
                stats.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in stats.items()}
