"""Tests for the character tokenizer and the shipped tiny model asset."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import gcpo_lightning
from gcpo_lightning.components.graphs.prompts import CONTEXT_TEMPLATE, INTEGRATION_TEMPLATE, render_candidates
from gcpo_lightning.data.tasks import ArithmeticTask
from gcpo_lightning.data.templates import PROMPT_TEMPLATE
from gcpo_lightning.policy.char_tokenizer import CHARACTERS, SPECIAL_TOKENS, build_char_tokenizer
from gcpo_lightning.rewards.arithmetic import is_correct

ASSET = Path(gcpo_lightning.__file__).parent / "assets" / "tiny-arith"


def _template_texts() -> list[str]:
    task = ArithmeticTask()
    rng = random.Random(0)
    q = task.sample_question(rng)
    cands = [task.worked_solution(q, 0.5, rng) for _ in range(4)]
    return [
        PROMPT_TEMPLATE.format(question=q) + cands[0],
        INTEGRATION_TEMPLATE.format(question=q, candidates=render_candidates(cands)) + cands[1],
        CONTEXT_TEMPLATE.format(question=q, others=render_candidates(cands, skip=2), integrated=cands[3]) + cands[2],
        "  leading and trailing spaces  \n\nblank lines\n",
        CHARACTERS,
    ]


def test_vocab_and_special_tokens() -> None:
    tok = build_char_tokenizer()
    assert len(tok) == len(SPECIAL_TOKENS) + len(CHARACTERS) == 100
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == SPECIAL_TOKENS[:3] + (SPECIAL_TOKENS[3],)
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok("ab")["input_ids"] == tok("ab", add_special_tokens=True)["input_ids"]  # nothing added
    assert tok("\u00e9")["input_ids"] == [tok.unk_token_id]


@pytest.mark.parametrize("text", _template_texts())
def test_one_token_per_char_and_exact_decode(text: str) -> None:
    tok = build_char_tokenizer()
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text


def test_round_trip_save_load(tmp_path: Path) -> None:
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    for text in _template_texts():
        ids = tok(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids
        assert loaded.decode(ids) == text
    batch = loaded(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0]  # left padding for generation


def test_shipped_asset_files() -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "training_info.json"):
        assert (ASSET / name).is_file(), name
    size = sum(p.stat().st_size for p in ASSET.iterdir())
    assert size < 10 * 2**20
    info = json.loads((ASSET / "training_info.json").read_text())
    assert "selected_metrics" in info and "group_metrics" in info


@pytest.mark.slow
def test_shipped_model_is_trained() -> None:
    """The shipped weights load from the package path and solve held-out questions well above chance."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(ASSET)
    model = AutoModelForCausalLM.from_pretrained(ASSET).eval()
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    heldout = ArithmeticTask().heldout(50)
    prompts = [PROMPT_TEMPLATE.format(question=q) for q, _ in heldout]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert tok.padding_side == "left"
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    correct = sum(is_correct(t, a) for t, (_, a) in zip(texts, heldout))
    assert correct / len(heldout) >= 0.15, texts[:5]
