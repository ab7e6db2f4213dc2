"""A sampler that reports its own log-probs (as ``VLLMSampler`` does) changes the update as TRL's correction says.

The policy-gradient term of each token is weighted by ``pi_old / pi_sampler``; the KL penalty is not. The sampler
here is ``GroupSampler`` with a fake "engine": its log-probs are the policy's minus ``log(factor)``, so every token
ratio is ``factor``. On the tiny random model, in-process, through ``GCPOModule.compute_loss`` and a ``Trainer`` fit.
"""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch

from gcpo_lightning import GroupSampler, ReferenceKL
from gcpo_lightning.components.scoring.logprobs import score_completions
from gcpo_lightning.interfaces.containers import CausalGraph, ImportanceCorrection, PolicyModels, Rollout

G = 4
PROMPTS = ["Problem: 1+2\nSolution:", "Problem: 3+4+5\nSolution:"]
ADVANTAGES = torch.tensor([1.0, -0.5, 0.25, -0.75, -1.0, 0.5, 0.8, -0.3])  # [N] fixed, so only the weights vary


class OffsetSampler(GroupSampler):
    """``GroupSampler`` whose sampler log-probs are the policy's minus ``log(factor)``: token ratios ``factor``.

    Args:
        factor: ``pi_old / pi_sampler`` of every completion token, or one per completion (at least 1, so that the
            log-probs stay <= 0).
        mode: the correction's mode (TRL's ``vllm_importance_sampling_mode``).
        clip_max: its upper bound.
        correct: attach the correction (off: the log-probs are carried but not applied, as
            ``VLLMSampler(importance_sampling_correction=False)``).
        kwargs: ``GroupSampler``'s arguments.
    """

    def __init__(
        self,
        factor: float | list[float] = 2.0,
        mode: str = "token_truncate",
        clip_max: float | None = 3.0,
        correct: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.factor, self.correction, self.correct = factor, ImportanceCorrection(mode, None, clip_max), correct

    def sample(
        self, models: PolicyModels, prompts: list[str], num_generations: int, greedy: bool = False, score: bool = True
    ) -> Rollout:
        rollout = super().sample(models, prompts, num_generations, greedy, score)
        with torch.no_grad():
            logps = score_completions(models.policy, *rollout.scoring_inputs(), temperature=models.temperature).logps
        log_factor = torch.tensor(self.factor).log().reshape(-1, 1)  # [N, 1] or [1, 1]
        rollout.sampler_logps = (logps - log_factor) * rollout.completion_mask  # [N, T]
        rollout.importance_correction = self.correction if self.correct else None
        return rollout


def setup(make_module, tiny_model_dir, score: bool, kl: ReferenceKL | None = None, **kwargs):
    """A module with an :class:`OffsetSampler` (``kwargs``) and a policy moved off the reference, a rollout of
    ``PROMPTS`` and its reference log-probs."""
    sampler = OffsetSampler(max_completion_length=8, **kwargs)
    module = make_module(tiny_model_dir, sampler=sampler, kl=kl or ReferenceKL(beta=0.04))
    module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy off the reference, so that the KL has a gradient
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rollout = module.sampler.sample(module.models(), PROMPTS, G, score=score)
    assert (rollout.old_logps is not None) == score
    prepared = module.kl.prepare(rollout, CausalGraph(group_size=G), module.models())
    return module, rollout, prepared


def gradient(module, rollout: Rollout, prepared, advantages: torch.Tensor = ADVANTAGES) -> tuple[torch.Tensor, dict]:
    """The flattened gradient of ``compute_loss`` (accumulated over the module's micro-batches), and the last stats."""
    module.policy.zero_grad(set_to_none=True)
    stats: dict = {}
    for index, weight in module.loss.micro_batches(rollout.completion_mask, module.micro_batch_size):
        mb, adv = rollout.select(index), advantages[index]
        loss, stats = module.compute_loss(mb, adv, prepared.select(index), module.models())
        (loss * weight).backward()
    return torch.cat([p.grad.flatten() for p in module.policy.parameters()]), stats


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("score", [False, True], ids=["one_step_unscored", "scored"])
def test_token_weights_double_the_policy_gradient_not_the_kl(make_module, tiny_model_dir, score):
    """Weights 2 everywhere: ``grad = 2 * grad_pg + grad_kl``, i.e. the plain gradient plus the policy term's.

    Unscored (one on-policy step) the weights come from the update's own detached pass; scored, from
    ``Rollout.old_logps``. Both are ``exp(log 2)`` up to float noise.
    """
    module, rollout, prepared = setup(make_module, tiny_model_dir, score)
    corrected, stats = gradient(module, rollout, prepared)
    plain, plain_stats = gradient(module, replace(rollout, importance_correction=None), prepared)
    kl, module.kl = module.kl, ReferenceKL(beta=0.0)
    policy_term, _ = gradient(module, replace(rollout, importance_correction=None), prepared)
    module.kl = kl
    assert stats["sampling/applied_importance_weight_mean"] == pytest.approx(2.0, abs=1e-5)
    assert "sampling/applied_importance_weight_mean" not in plain_stats
    assert (plain - policy_term).abs().max() > 1e-4, "the KL term must contribute for the test to mean anything"
    torch.testing.assert_close(corrected, plain + policy_term, atol=1e-6, rtol=1e-4)
    assert (corrected - plain).abs().max() > 100 * 1e-6


FACTORS = [1.05, 1.2, 1.1, 1.25, 1.0, 1.15, 1.3, 1.02]  # per completion; 1.15**8 = 3.06 is the closest to 3


def test_sequence_mask_survives_micro_batching(make_module, tiny_model_dir):
    """``sequence_mask`` at 3 with token ratios ``f_i``: completions with ``f_i**L_i > 3`` get weight 0.

    Micro-batches of 2 rows (``select``) accumulate to the full batch's gradient, which equals the gradient
    without the correction and with each advantage scaled by its sequence weight (beta = 0).
    """
    kwargs = dict(factor=FACTORS, mode="sequence_mask", clip_max=3.0)
    full, rollout, prepared = setup(make_module, tiny_model_dir, False, kl=ReferenceKL(beta=0.0), **kwargs)
    micro = make_module(tiny_model_dir, sampler=full.sampler, kl=full.kl, micro_batch_size=2)
    micro.configure_model()
    micro.policy.load_state_dict(full.policy.state_dict())
    ratios = torch.tensor(FACTORS).double() ** rollout.completion_mask.sum(-1)  # [N] f_i ** L_i
    masked = ratios > 3
    assert masked.any() and not masked.all() and ((ratios - 3).abs() > 0.05).all(), ratios
    g_full, _ = gradient(full, rollout, prepared)
    g_micro, _ = gradient(micro, rollout, prepared)
    torch.testing.assert_close(g_micro, g_full, atol=1e-6, rtol=1e-4)
    # By hand: at R = 1 the surrogate's gradient is linear in A, and w >= 0, so weighting row i by w_i is scaling
    # A_i by w_i: w_i = 0 for the masked rows and f_i**L_i for the others, with the correction dropped.
    weights = torch.where(masked, 0.0, ratios).float()  # [N]
    by_hand, _ = gradient(full, replace(rollout, importance_correction=None), prepared, ADVANTAGES * weights)
    torch.testing.assert_close(g_full, by_hand, atol=1e-6, rtol=1e-4)


def one_step_delta(make_module, fit, tiny_model_dir, tmp_path, correct: bool):
    """The parameter change of one SGD step (beta 0, no clipping) with an :class:`OffsetSampler` (factor 2)."""
    L.seed_everything(0)
    module = make_module(
        tiny_model_dir,
        sampler=OffsetSampler(max_completion_length=8, correct=correct),
        kl=ReferenceKL(beta=0.0),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        max_grad_norm=None,
    )
    module.configure_model()
    before = torch.cat([p.detach().flatten().clone() for p in module.policy.parameters()])
    trainer = fit(module, tmp_path, steps=1)
    return torch.cat([p.detach().flatten() for p in module.policy.parameters()]) - before, trainer


def test_fit_step_with_weights_two_moves_twice_as_far(make_module, fit, logged_rows, tiny_model_dir, tmp_path):
    """Through ``Trainer.fit`` (``update_policy``): weights 2 and no KL double the SGD step; the weight is logged."""
    plain, _ = one_step_delta(make_module, fit, tiny_model_dir, tmp_path / "plain", correct=False)
    corrected, trainer = one_step_delta(make_module, fit, tiny_model_dir, tmp_path / "corrected", correct=True)
    assert plain.abs().max() > 1e-4
    torch.testing.assert_close(corrected, 2 * plain, atol=1e-6, rtol=1e-4)
    rows = logged_rows(trainer)
    name = "sampling/applied_importance_weight_mean"
    logged = [float(r[name]) for r in rows if r.get(name)]
    assert logged and logged[0] == pytest.approx(2.0, abs=1e-5)
