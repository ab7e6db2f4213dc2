"""The random model of the GPU anchor benchmark (``benchmarks/gpu_anchor.py``): its numbers mean something only if
its tokenizer gives back every sampled id, so that GCPO's textual contexts are as long as the candidates they hold."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_anchor  # noqa: E402

from gcpo_lightning.policy.loading import load_tokenizer  # noqa: E402


def test_sampled_ids_decode_to_text_that_encodes_back_to_them_also_inside_a_context(tmp_path):
    path = gpu_anchor.save_random_qwen(tmp_path, tiny=True)
    tok = load_tokenizer(str(path))
    assert len(tok) == gpu_anchor.VOCAB and tok.eos_token_id == 2 and tok.pad_token_id == 0
    torch.manual_seed(0)
    ids = torch.randint(4, gpu_anchor.VOCAB, (4, 64))  # any id but the specials, as a random model samples them
    texts = tok.batch_decode(ids)
    assert tok(texts, add_special_tokens=False)["input_ids"] == ids.tolist()
    # a context holds the question and the other candidates as text: each candidate keeps its 64 tokens
    frame = "Problem: 12+3-4\nSolution:\n\nCandidate 1:\n{}\nCandidate 2:\n{}\nCombined:"
    empty = tok(frame.format("", ""), add_special_tokens=False)["input_ids"]
    full = tok(frame.format(texts[0], texts[1]), add_special_tokens=False)["input_ids"]
    assert len(full) == len(empty) + 128


def test_the_model_has_grouped_query_attention_and_the_reward_is_a_deterministic_uniform_hash(tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gpu_anchor.save_random_qwen(tmp_path, tiny=True))
    assert config.num_key_value_heads < config.num_attention_heads and config.attention_bias
    completions = [f"w{i}" for i in range(2000)]
    rewards = gpu_anchor.hash_reward(["q"] * 2000, completions)
    assert rewards == gpu_anchor.hash_reward(["q"] * 2000, completions)
    assert all(0 <= r < 1 for r in rewards) and 0.45 < sum(rewards) / 2000 < 0.55
