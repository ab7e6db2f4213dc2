"""Shared fixtures: tiny random Llama models with the character tokenizer, saved to disk and loaded back.

Nothing is downloaded: models are built in-process and loaded through the real ``from_pretrained`` path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gcpo_lightning.policy.char_tokenizer import build_char_tokenizer


def save_tiny_llama(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random ``LlamaForCausalLM`` of a few thousand parameters plus the char tokenizer, saved in ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Llama (hidden 32, 2 layers) with the char tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
