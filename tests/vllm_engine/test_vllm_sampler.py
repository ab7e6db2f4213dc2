"""``VLLMSampler`` against the HF path on the shipped tiny-arith model: the rollout contract, greedy equality,
weight pushes, and the first-token distribution at T=1 and under top-k / top-p."""

from __future__ import annotations

import math

import pytest
import torch

from gcpo_lightning.components.sampling.backends import HFGenerate
from gcpo_lightning.components.sampling.decoding import filter_logits
from gcpo_lightning.components.sampling.group_sampler import GroupSampler
from gcpo_lightning.components.sampling.vllm_sampler import VLLMSampler, engine_model
from gcpo_lightning.functional.losses import importance_weights

# The kit's KVCacheLoop passes ``cache=`` (transformers >= 5.20); .venv-vllm has vLLM's transformers < 5.20, where
# that keyword is ignored, so the HF reference here is Hugging Face ``generate`` (docs/vllm.md).
HF = GroupSampler(temperature=0.0, max_completion_length=24, backend=HFGenerate())


@pytest.fixture(scope="module")
def sampler(keep_alive) -> VLLMSampler:
    """One engine on tiny-arith for the tests of this file (the greedy test, last, changes the weights)."""
    return keep_alive(VLLMSampler(temperature=1.0, max_completion_length=24))


def test_rollout_follows_the_group_sampler_conventions(tiny_arith, questions, sampler) -> None:
    G = 4
    rollout = sampler.sample(tiny_arith, questions, G)
    reference = GroupSampler(max_completion_length=24, backend=HFGenerate()).sample(tiny_arith, questions, G)
    N, T = rollout.completion_ids.shape
    assert N == len(questions) * G and T <= 24
    assert torch.equal(rollout.prompt_ids, reference.prompt_ids)  # same left-padded, group-major prompts
    assert torch.equal(rollout.prompt_mask, reference.prompt_mask)
    pad, eos = tiny_arith.tokenizer.pad_token_id, tiny_arith.tokenizer.eos_token_id
    for ids, mask, truncated in zip(rollout.completion_ids, rollout.completion_mask, rollout.truncated):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # 1 up to and including the first EOS
        assert (ids[n:] == pad).all()
        assert bool(truncated) == (ids[n - 1] != eos)
    assert rollout.old_logps is not None and rollout.old_logps.shape == (N, T)
    assert rollout.hidden is not None and rollout.hidden.shape == (N, tiny_arith.policy.config.hidden_size)
    assert len(rollout.completions) == N and len(set(rollout.completions)) > 1  # sampled, not greedy


def test_vllm_logprobs_agree_with_the_policy_scores(tiny_arith, questions, sampler) -> None:
    """At T=1 without filters vLLM's processed log-probs are the policy's own: the mismatch is float noise."""
    rollout = sampler.sample(tiny_arith, questions, 4)
    real = rollout.completion_mask.bool()
    assert sampler.last_sampler_logps is not None and sampler.last_sampler_logps.shape == real.shape
    gap = (rollout.old_logps - sampler.last_sampler_logps)[real].abs()
    assert gap.max() < 1e-3, gap.max()
    assert rollout.metrics["sampling/sampling_logp_difference/max"] == pytest.approx(gap.max().item())
    assert sampler.last_importance_weights is not None
    assert rollout.metrics["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-3)


def test_greedy_equals_the_hf_policy_before_and_after_a_weight_push(tiny_arith, questions, sampler) -> None:
    pushes = sampler.weight_pushes
    before = sampler.sample(tiny_arith, questions, 2, greedy=True, score=False)
    assert before.completions == HF.sample(tiny_arith, questions, 2, greedy=True, score=False).completions
    torch.manual_seed(0)
    with torch.no_grad():  # an in-place update, as an optimiser step makes
        for p in tiny_arith.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = sampler.sample(tiny_arith, questions, 2, greedy=True, score=False)
    assert sampler.weight_pushes == pushes + 1
    assert after.completions != before.completions  # the engine's weights really changed
    assert after.completions == HF.sample(tiny_arith, questions, 2, greedy=True, score=False).completions
    embed = tiny_arith.policy.model.embed_tokens.weight  # [V, D]
    engine = dict(engine_model(sampler.llm).named_parameters())["model.embed_tokens.weight"]  # [V padded to 64k, D]
    assert torch.equal(engine[: embed.shape[0]], embed)
    sampler.sample(tiny_arith, questions, 2, greedy=True, score=False)
    assert sampler.weight_pushes == pushes + 1  # unchanged weights are not pushed again


@pytest.fixture(scope="module")
def spread_sampler(keep_alive) -> VLLMSampler:
    return keep_alive(VLLMSampler(max_completion_length=1))


def chi_square_critical(dof: int, z: float = 3.09) -> float:
    """The chi-square quantile at ``Phi(z)`` (3.09: p = 0.001) by Wilson-Hilferty, accurate to ~1 % for dof >= 3."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 8, 1.0), (1.3, 0, 0.8)], ids=["T1", "topk", "topp"]
)
def test_first_token_distribution_matches_the_hf_path(spread_llama, spread_sampler, temperature, top_k, top_p) -> None:
    """The first sampled token's frequencies against the exact distribution the HF path samples from.

    The HF sampler draws from ``softmax(filter_logits(logits / T))`` (decoding.next_tokens). With ``n`` draws, the
    Pearson statistic ``sum (O - E)^2 / E`` over bins with ``E >= 5`` (the rest pooled in one bin) is chi-square
    with ``bins - 1`` degrees of freedom; it is compared with its 0.999 quantile, so a correct sampler fails one
    run in a thousand, while a wrong temperature (e.g. T=1 instead of 0.7) moves several bins by many sigmas.
    Tokens outside the filtered support must never be drawn.
    """
    n, models = 4000, spread_llama
    prompt = "Problem: 4+5+2-9\nSolution:"
    ids = models.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = models.policy(torch.tensor([ids])).logits[0, -1].float()  # [V]
    probs = filter_logits((logits / temperature).unsqueeze(0), top_p, top_k).softmax(-1)[0]  # [V]
    sampler = spread_sampler  # the engine does not depend on these settings: they go into each request
    sampler.temperature, sampler.top_k, sampler.top_p = temperature, top_k, top_p
    rollout = sampler.sample(models, [prompt], n, score=False)
    counts = torch.bincount(rollout.completion_ids[:, 0], minlength=probs.numel()).double()  # [V]
    assert counts[probs == 0].sum() == 0, "a token outside the top-k / top-p set was sampled"
    expected = probs.double() * n
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    wanted = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = wanted > 0
    stat = ((observed[keep] - wanted[keep]) ** 2 / wanted[keep]).sum().item()
    dof = int(keep.sum()) - 1
    assert dof >= 4, "the prompt's first-token distribution is too peaked to test"
    assert stat < chi_square_critical(dof), (stat, dof)


def test_importance_weights_modes_by_hand() -> None:
    old = torch.tensor([[0.0, -1.0, -9.0]])  # log pi_old
    sampled = torch.tensor([[0.0, -2.0, -1.0]])  # log pi_vllm
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the last token is padding: ratio 1
    # token ratios exp(0) = 1, exp(1) = e, padding 1; the sequence ratio exp(0 + 1) = e
    e = math.e
    assert torch.allclose(
        importance_weights(old, sampled, mask, "token_truncate", None, 2.0), torch.tensor([[1, 2, 1.0]])
    )
    assert torch.allclose(importance_weights(old, sampled, mask, "token_mask", None, 2.0), torch.tensor([[1, 0, 1.0]]))
    assert torch.allclose(importance_weights(old, sampled, mask, "sequence_truncate", None, 3.0), torch.tensor([[e]]))
    assert torch.allclose(importance_weights(old, sampled, mask, "sequence_mask", None, 2.0), torch.tensor([[0.0]]))
    with pytest.raises(ValueError, match="mode"):
        importance_weights(old, sampled, mask, "token_clip")


def test_top_k_weights_are_the_kept_mass_and_reach_the_loss(spread_llama, spread_sampler) -> None:
    """Under top-k vLLM's processed log-probs are over the ``k`` kept tokens, the policy's over the vocabulary, so a
    first token's weight ``pi_old / pi_vllm`` is ``p / (p / kept) = kept``, the top-k mass, whichever token was
    drawn. The rollout carries vLLM's log-probs and the correction, and the loss's weights are those numbers."""
    models, prompt, k, n = spread_llama, "Problem: 4+5+2-9\nSolution:", 8, 16
    ids = models.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = models.policy(torch.tensor([ids])).logits[0, -1].float().softmax(-1)  # [V] at T = 1
    kept = probs.topk(k).values.sum().item()
    assert kept < 0.9, "the top-k must drop visible mass for the test to mean anything"
    sampler = spread_sampler
    sampler.temperature, sampler.top_k, sampler.top_p = 1.0, k, 1.0
    rollout = sampler.sample(models, [prompt], n)  # scored: old_logps from the policy
    assert rollout.importance_correction == sampler.correction and rollout.sampler_logps is not None
    weights = rollout.sampler_weights(rollout.old_logps)  # what micro_batch_loss applies
    assert weights is not None and sampler.last_importance_weights is not None
    torch.testing.assert_close(weights, sampler.last_importance_weights)
    torch.testing.assert_close(weights[:, 0], torch.full((n,), kept), atol=1e-3, rtol=1e-3)
    assert rollout.metrics["sampling/importance_sampling_ratio/mean"] == pytest.approx(kept, abs=1e-3)
