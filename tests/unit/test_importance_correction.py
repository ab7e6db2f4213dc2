"""The sampler/trainer importance correction (TRL's ``vllm_importance_sampling_correction``) by hand.

One batch for every test: ``N = 2`` completions of ``T = 2`` tokens, the second row one token long (its last token
is padding). The current log-probs equal the old ones, so the PPO ratio is 1 (inside the clip) and the surrogate of
token ``t`` of row ``i`` is ``A_i``. The sampler's log-probs are set so that the token ratios ``pi_old / pi_sampler``
are ``[2, 4]`` in row 0 and ``[0.5, pad]`` in row 1, which makes the sequence ratios ``2 * 4 = 8`` and ``0.5``.
"""

from __future__ import annotations

import math

import pytest
import torch

from gcpo_lightning.functional.losses import importance_weights, policy_loss, sequence_mean, token_mean
from gcpo_lightning.interfaces.containers import ImportanceCorrection, Rollout

LN2 = math.log(2.0)
OLD = torch.tensor([[-1.0, -2.0], [-1.5, -9.0]])  # log pi_old [N, T]
SAMPLER = torch.tensor([[-1.0 - LN2, -2.0 - 2 * LN2], [-1.5 + LN2, 0.0]])  # log pi_sampler: ratios [2, 4], [0.5, -]
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # [N, T]
ADV = torch.tensor([1.0, -2.0])  # [N]
PENALTY = torch.tensor([[0.1, 0.2], [0.3, 0.4]])  # [N, T] an already weighted KL term, which is not reweighted


def loss_and_grad(weights: torch.Tensor | None, aggregate) -> tuple[float, torch.Tensor]:
    """The loss at ``logps = OLD`` and its gradient with respect to the current log-probs ``[N, T]``."""
    logps = OLD.clone().requires_grad_(True)
    loss, _ = policy_loss(logps, OLD, ADV, MASK, PENALTY, 0.2, 0.2, aggregate, 2, weights)
    loss.backward()
    assert logps.grad is not None
    return loss.item(), logps.grad


def rollout(correction: ImportanceCorrection | None, sampler_logps: torch.Tensor | None = SAMPLER) -> Rollout:
    """The hand-made batch as a rollout (the token ids do not matter here)."""
    ids = torch.zeros(2, 2, dtype=torch.long)
    return Rollout(
        prompts=["q"],
        completions=["a", "b"],
        prompt_ids=ids,
        prompt_mask=torch.ones_like(ids),
        completion_ids=ids,
        completion_mask=MASK.long(),
        group_size=2,
        old_logps=OLD,
        sampler_logps=sampler_logps,
        importance_correction=correction,
    )


def test_token_truncate_weights_the_policy_term_by_hand() -> None:
    # token_truncate with clip_max 3: w = [[2, min(4, 3)], [0.5, 1 (padding)]] = [[2, 3], [0.5, 1]].
    weights = rollout(ImportanceCorrection("token_truncate", None, 3.0)).sampler_weights(OLD)
    assert weights is not None
    torch.testing.assert_close(weights, torch.tensor([[2.0, 3.0], [0.5, 1.0]]))
    # per token -A_i * w_it + penalty_it:
    #   row 0: [-1*2 + 0.1, -1*3 + 0.2] = [-1.9, -2.8], mean -2.35
    #   row 1: [+2*0.5 + 0.3]           = [1.3],        mean  1.3
    # sequence_mean (GRPO): (-2.35 + 1.3) / 2 = -0.525.
    # d loss / d logp_it = -A_i * w_it * R_it / (|y_i| * N) at R = 1 (the penalty is a constant here):
    #   row 0: [-2 / 4, -3 / 4] = [-0.5, -0.75];  row 1: [1 / 2, 0 (padding)] = [0.5, 0].
    loss, grad = loss_and_grad(weights, sequence_mean)
    assert loss == pytest.approx(-0.525, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, -0.75], [0.5, 0.0]]))
    # Without weights: row 0 mean(-0.9, -0.8) = -0.85, row 1: 2.3, loss (-0.85 + 2.3) / 2 = 0.725.
    assert loss_and_grad(None, sequence_mean)[0] == pytest.approx(0.725, abs=1e-6)


def test_sequence_modes_weight_whole_completions_by_hand() -> None:
    # sequence ratios: row 0 exp(ln 2 + ln 4) = 8, row 1 exp(-ln 2) = 0.5 (the padding token adds nothing).
    # sequence_mask with clip_max 3: 8 is outside, so row 0 gets 0; sequence_truncate clamps it to 3.
    masked = rollout(ImportanceCorrection("sequence_mask", None, 3.0)).sampler_weights(OLD)
    truncated = rollout(ImportanceCorrection("sequence_truncate", None, 3.0)).sampler_weights(OLD)
    assert masked is not None and truncated is not None
    torch.testing.assert_close(masked, torch.tensor([[0.0], [0.5]]))  # [N, 1]
    torch.testing.assert_close(truncated, torch.tensor([[3.0], [0.5]]))
    # token_mean (DAPO) with the masked weights, per token -A_i * w_i + penalty_it:
    #   row 0: [0 + 0.1, 0 + 0.2], row 1: [2*0.5 + 0.3] = [1.3]; the sum over 3 tokens is 1.6, the loss 1.6 / 3.
    # The gradient -A_i * w_i / 3 is 0 on row 0 (the masked sequence learns nothing) and 2*0.5/3 = 1/3 on row 1.
    loss, grad = loss_and_grad(masked, token_mean)
    assert loss == pytest.approx(1.6 / 3, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0], [1 / 3, 0.0]]))


def test_clip_min_and_mask_bounds() -> None:
    # token_mask in [0.6, 3]: 4 (too high) and 0.5 (too low) become 0; padding keeps 1; token_truncate clamps.
    w = importance_weights(OLD, SAMPLER, MASK, "token_mask", 0.6, 3.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    w = importance_weights(OLD, SAMPLER, MASK, "token_truncate", 0.6, None)
    torch.testing.assert_close(w, torch.tensor([[2.0, 4.0], [0.6, 1.0]]))


def test_weights_of_one_are_bit_identical_to_no_weights() -> None:
    """The weighted path with weights 1 changes no bit of the loss (multiplying by 1.0 is exact)."""
    ones = torch.ones(2, 2)
    assert loss_and_grad(ones, sequence_mean)[0] == loss_and_grad(None, sequence_mean)[0]
    assert torch.equal(loss_and_grad(ones, token_mean)[1], loss_and_grad(None, token_mean)[1])


def test_a_nan_sampler_logp_means_no_correction_as_in_trl() -> None:
    """A token the sampler gave no log-prob for (NaN) gets ratio 1, as TRL's ``nan_to_num``; others are kept."""
    sampler = SAMPLER.clone()
    sampler[0, 1] = math.nan
    w = rollout(ImportanceCorrection("token_truncate", None, 3.0), sampler).sampler_weights(OLD)
    assert w is not None
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0], [0.5, 1.0]]))


def test_select_carries_the_sampler_logps_and_the_correction() -> None:
    """A mini-/micro-batch's weights are the full batch's rows: token and sequence ratios need only their row."""
    for mode in ("token_truncate", "sequence_mask"):
        full = rollout(ImportanceCorrection(mode, None, 3.0))
        index = torch.tensor([1, 0])
        part = full.select(index)
        assert part.importance_correction == full.importance_correction
        assert part.sampler_logps is not None and torch.equal(part.sampler_logps, SAMPLER[index])
        w_full, w_part = full.sampler_weights(OLD), part.sampler_weights(OLD[index])
        assert w_full is not None and w_part is not None
        assert torch.equal(w_part, w_full[index])
        assert full.select(torch.tensor([0])).sampler_weights(OLD[:1]).shape == (1, 2 if mode[0] == "t" else 1)


def test_no_correction_no_weights() -> None:
    """A rollout without a correction (the HF sampler's) gives no weights, whatever its sampler log-probs."""
    assert rollout(None).sampler_weights(OLD) is None
    assert rollout(None, None).select(torch.tensor([0])).sampler_weights(OLD[:1]) is None


@pytest.mark.parametrize(
    ("sampler_logps", "message"),
    [
        (torch.zeros(2, 3), r"Rollout.sampler_logps has shape \(2, 3\), expected \(2, 2\)"),
        (torch.zeros(2, dtype=torch.float32), r"shape \(2,\), expected \(2, 2\)"),
        (torch.zeros(2, 2, dtype=torch.long), "floating-point"),
        (torch.tensor([[-1.0, -math.inf], [-1.0, 0.0]]), "1 infinite values at completion tokens"),
        (torch.tensor([[0.5, 0.2], [0.9, 0.0]]), r"values above 0 \(max 0.9\).*not probabilities"),
        (None, "Rollout.sampler_logps .*is missing"),
    ],
    ids=["width", "rank", "dtype", "inf", "probabilities", "missing"],
)
def test_bad_sampler_logps_are_named(sampler_logps, message) -> None:
    with pytest.raises(ValueError, match=message):
        rollout(ImportanceCorrection(), sampler_logps).sampler_weights(OLD)


def test_padding_values_are_not_checked() -> None:
    """Whatever sits at padding (here +inf) is masked: only completion tokens must be log-probabilities."""
    sampler = SAMPLER.clone()
    sampler[1, 1] = math.inf
    assert rollout(ImportanceCorrection(), sampler).sampler_weights(OLD) is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="token_clip"), "mode must be one of"),
        (dict(clip_min=2.0, clip_max=1.0), "clip_min 2.0 is above clip_max 1.0"),
    ],
)
def test_bad_settings_are_named(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ImportanceCorrection(**kwargs)


@pytest.mark.parametrize("on", [True, False])
def test_vllm_sampler_puts_its_logps_and_correction_on_the_rollout(on: bool) -> None:
    """Without an engine: vLLM's per-token log-prob lists become ``Rollout.sampler_logps`` ``[N, T]`` (0 at
    padding); the correction of the sampler's settings goes with them only when ``importance_sampling_correction``."""
    from gcpo_lightning.components.sampling.vllm_sampler import VLLMSampler

    sampler = VLLMSampler(
        importance_sampling_correction=on, importance_sampling_mode="sequence_mask", importance_sampling_clip_min=0.5
    )
    r = rollout(None, None)
    sampler._carry_logps(r, [[-0.1, -0.2], [-0.3]])
    assert r.sampler_logps is not None
    torch.testing.assert_close(r.sampler_logps, torch.tensor([[-0.1, -0.2], [-0.3, 0.0]]))
    assert r.importance_correction == (ImportanceCorrection("sequence_mask", 0.5, 3.0) if on else None)
    assert (r.sampler_weights(OLD) is not None) == on


def test_vllm_sampler_checks_its_correction_settings() -> None:
    from gcpo_lightning.components.sampling.vllm_sampler import VLLMSampler

    with pytest.raises(ValueError, match="clip_min 4.0 is above clip_max 3.0"):
        VLLMSampler(importance_sampling_clip_min=4.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        VLLMSampler(importance_sampling_mode="token_clip")
