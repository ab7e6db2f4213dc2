"""The lean decoding loop: same greedy output as ``generate``, exact log-probs, and correct filtering."""

from __future__ import annotations

import torch

from gcpo_lightning.components.sampling.decoding import decode, filter_logits
from gcpo_lightning.components.sampling.group_sampler import completion_mask_from_eos
from gcpo_lightning.components.scoring.logprobs import score_completions
from gcpo_lightning.policy.loading import load_causal_lm, load_tokenizer


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (
        torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
        and torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    )
    # top_p = 0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it -> keep the first two
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]
    # top_p = 0.5: the first token alone reaches it
    assert torch.isfinite(filter_logits(logits, top_p=0.5))[0].tolist() == [True, False, False, False]


def test_sampling_by_inverse_cdf_follows_the_filtered_distribution():
    from gcpo_lightning.components.sampling.decoding import next_tokens

    # softmax(log p) = p; top_k=3 drops the 0.1 token, leaving 0.4, 0.3, 0.2 renormalised to 4/9, 3/9, 2/9
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).expand(40000, -1)
    g = torch.Generator().manual_seed(0)
    tokens = next_tokens(logits, 1.0, 1.0, 3, False, torch.rand(40000, generator=g))
    freq = torch.bincount(tokens, minlength=4).float() / 40000
    # 4 sigma of a binomial frequency at n = 40000 is at most 0.01
    torch.testing.assert_close(freq, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]), atol=0.01, rtol=0)
    # the same draw gives the same token whatever the batch around it (what compaction relies on)
    u = torch.tensor([0.05, 0.5, 0.95])
    assert next_tokens(logits[:3], 1.0, 1.0, 0, False, u).tolist() == [0, 1, 3]
    assert next_tokens(logits[:1], 1.0, 1.0, 0, False, u[1:2]).tolist() == [1]


def test_greedy_matches_generate(tiny_model_dir):
    model, tok = load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    enc = tok(
        ["Problem: 1+2\nSolution:", "Problem: 3+4+5-6\nSolution:"],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    ours = decode(model, enc["input_ids"], enc["attention_mask"], 10, [tok.eos_token_id], tok.pad_token_id, greedy=True)
    ref = model.generate(
        **enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )[:, enc["input_ids"].shape[1] :]
    mask, _ = completion_mask_from_eos(ref, [tok.eos_token_id])
    assert torch.equal(ours[:, : ref.shape[1]] * mask, ref * mask)


def test_sampled_tokens_stop_at_eos_and_score_consistently(tiny_model_dir):
    model, tok = load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    enc = tok(["Problem: 1+2\nSolution:"] * 6, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    ids = decode(
        model, enc["input_ids"], enc["attention_mask"], 12, [tok.eos_token_id, 5], tok.pad_token_id, temperature=0.8
    )
    mask, _ = completion_mask_from_eos(ids, [tok.eos_token_id, 5])
    assert (ids[mask == 0] == tok.pad_token_id).all(), "padding after each row's EOS"
    scores = score_completions(model, enc["input_ids"], enc["attention_mask"], ids, mask, temperature=0.8)
    # independently: one plain forward over prompt + completion (equal prompts, no padding), the logits at
    # positions P-1 .. P+T-2 predict the completion's tokens; log_softmax(logits / 0.8) at the sampled token
    P = enc["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=torch.cat([enc["input_ids"], ids], 1)).logits[:, P - 1 : -1]
    expected = (logits / 0.8).log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(scores.logps * mask, expected * mask, atol=1e-5, rtol=1e-5)


def test_min_new_tokens_suppresses_early_eos(tiny_model_dir):
    model, tok = load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    enc = tok(["Problem: 1+2\nSolution:"] * 4, return_tensors="pt", add_special_tokens=False)
    # make EOS by far the most likely token: without a minimum every row stops at once
    eos = tok.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] += 50 * model.model.norm(torch.ones(model.config.hidden_size))
    ids = decode(model, enc["input_ids"], enc["attention_mask"], 8, [eos], tok.pad_token_id, greedy=True)
    assert ids.shape[1] == 1 and (ids[:, 0] == eos).all()
    ids = decode(model, enc["input_ids"], enc["attention_mask"], 8, [eos], tok.pad_token_id, min_new_tokens=5)
    assert ids.shape[1] >= 6 and not (ids[:, :5] == eos).any()


def test_sampler_generate_fallback_matches_the_loop_greedily(tiny_model_dir):
    from gcpo_lightning.components.sampling.backends import HFGenerate
    from gcpo_lightning.components.sampling.group_sampler import GroupSampler
    from gcpo_lightning.interfaces.containers import PolicyModels

    models = PolicyModels(load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)))
    prompts = ["Problem: 1+2\nSolution:", "Problem: 3+4+5-6\nSolution:"]
    loop = GroupSampler(max_completion_length=8).sample(models, prompts, 2, greedy=True)
    hf = GroupSampler(max_completion_length=8, backend=HFGenerate()).sample(models, prompts, 2, greedy=True)
    assert loop.completions == hf.completions
    torch.testing.assert_close(loop.old_logps * loop.completion_mask, hf.old_logps * hf.completion_mask)
