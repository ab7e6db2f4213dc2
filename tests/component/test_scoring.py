"""Teacher-forced scoring agrees with generation and with a plain full-vocabulary computation."""

from __future__ import annotations

import torch

from gcpo_lightning.components.sampling.group_sampler import GroupSampler, completion_mask_from_eos
from gcpo_lightning.components.scoring.logprobs import (
    final_token_hidden,
    position_ids_from_mask,
    score_completions,
    selective_log_softmax,
)
from gcpo_lightning.interfaces.containers import PolicyModels
from gcpo_lightning.policy.loading import load_causal_lm, load_tokenizer


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    torch.testing.assert_close(position_ids_from_mask(mask), torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]))


def test_selective_log_softmax_chunking_matches_full():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 3, 11), torch.randint(0, 11, (5, 3))
    full = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    for chunk in (1, 2, 16):
        logps, ent = selective_log_softmax(logits, targets, chunk)
        torch.testing.assert_close(logps, full)
        torch.testing.assert_close(ent, entropy)


def test_final_token_hidden_picks_last_attended_position():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(final_token_hidden(hidden, mask), torch.tensor([[2.0], [7.0]]))


def test_completion_mask_includes_first_eos_only():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    mask, truncated = completion_mask_from_eos(ids, [2])
    torch.testing.assert_close(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    assert truncated.tolist() == [False, True]


def test_old_logps_match_generation_scores(tiny_model_dir):
    """Scoring with explicit positions reproduces the log-probs ``generate`` sampled from (left padding included)."""
    model, tok = load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    prompts = ["Problem: 1+2\nSolution:", "Problem: 3+4+5-6\nSolution:"]  # different lengths -> left padding
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(
        **enc,
        max_new_tokens=6,
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    completion = out.sequences[:, enc["input_ids"].shape[1] :]  # [2, T]
    gen_logps = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    mask, _ = completion_mask_from_eos(completion, [tok.eos_token_id])
    scores = score_completions(model, enc["input_ids"], enc["attention_mask"], completion, mask, temperature=0.7)
    torch.testing.assert_close(scores.logps * mask, gen_logps * mask, atol=1e-4, rtol=0)


def test_sampler_shapes_and_groups(tiny_model_dir):
    model, tok = load_causal_lm(str(tiny_model_dir)).train(), load_tokenizer(str(tiny_model_dir))
    sampler = GroupSampler(max_completion_length=5, generation_batch_size=3)
    rollout = sampler.sample(PolicyModels(model, tok), ["Problem: 1+2\nSolution:", "Problem: 4\nSolution:"], 4)
    assert rollout.completion_ids.shape[0] == 8 and rollout.completion_ids.shape[1] <= 5
    assert rollout.old_logps.shape == rollout.completion_ids.shape
    assert rollout.hidden.shape == (8, model.config.hidden_size)
    assert len(rollout.completions) == 8 and rollout.group_size == 4
    # group-major: completions 0..3 share prompt 0
    assert torch.equal(rollout.prompt_ids[0], rollout.prompt_ids[3]) and not torch.equal(
        rollout.prompt_ids[3], rollout.prompt_ids[4]
    )
    assert model.training, "the sampler restores train mode"
    assert set(rollout.metrics) == {"timing/generation", "timing/scoring"}


def test_greedy_is_deterministic(tiny_model_dir):
    model, tok = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    sampler = GroupSampler(max_completion_length=6)
    a = sampler.sample(PolicyModels(model, tok), ["Problem: 1+2\nSolution:"], 2, greedy=True, score=False)
    assert a.completions[0] == a.completions[1] and a.old_logps is None


def random_batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    prompt_ids, completion_ids = torch.randint(3, 30, (5, 6), generator=g), torch.randint(3, 30, (5, 7), generator=g)
    prompt_mask, completion_mask = torch.ones_like(prompt_ids), torch.ones_like(completion_ids)
    prompt_mask[0, :2] = 0  # left padding
    completion_mask[1, 4:] = 0  # an early EOS
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_chunked_head_equals_full_logits_with_gradients(tiny_model_dir, monkeypatch):
    import gcpo_lightning.components.scoring.logprobs as scoring

    model = load_causal_lm(str(tiny_model_dir))
    batch = random_batch()
    full = score_completions(model, *batch, temperature=0.7, with_hidden=True)
    full.logps.sum().backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    for fallback in (False, True):  # the final-norm hook, and output_hidden_states when no norm is found
        if fallback:
            monkeypatch.setattr(scoring, "final_norm", lambda model: None)
        model.zero_grad()
        chunked = score_completions(model, *batch, temperature=0.7, with_hidden=True, logits_chunk_size=2)
        chunked.logps.sum().backward()
        # equal up to float rounding: the LM head's matmul runs on other shapes (bitwise with one BLAS thread)
        torch.testing.assert_close(chunked.logps, full.logps, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(chunked.entropy, full.entropy, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(chunked.hidden, full.hidden, rtol=0, atol=0)  # the same forward: bitwise
        for a, b in zip(full_grads, (p.grad for p in model.parameters())):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_final_norm_hook_captures_what_the_lm_head_reads(tiny_model_dir):
    from gcpo_lightning.components.scoring.logprobs import final_states, lm_head

    model = load_causal_lm(str(tiny_model_dir))
    ids = torch.randint(3, 30, (2, 8))
    with torch.no_grad(), final_states(model) as captured:
        logits = model(input_ids=ids).logits  # [2, 8, V]
    torch.testing.assert_close(lm_head(model)(captured["states"]), logits)
