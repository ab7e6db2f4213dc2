"""4-bit (bitsandbytes NF4) loading on CPU: layer types, log-prob fidelity, memory, and a QLoRA backward."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from gcpo_lightning.components.scoring.logprobs import score_completions  # noqa: E402
from gcpo_lightning.policy.loading import load_causal_lm  # noqa: E402
from gcpo_lightning.policy.quantization import (  # noqa: E402
    QuantizationConfig,
    as_quantization_config,
    count_4bit_linears,
    dequantized_weight,
    load_quantized,
    model_memory_bytes,
    require_bitsandbytes,
    validate_quantized_load,
)

HIDDEN = 128  # hidden 128 / intermediate 256: the linear layers dominate the memory, unlike at hidden 32


@pytest.fixture(scope="module")
def mid_model_dirs(make_tiny_llama, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two random Llamas (hidden 128, 2 layers) with different seeds: the model, and a yardstick."""
    root = tmp_path_factory.mktemp("llama128")
    return make_tiny_llama(root / "a", seed=0, hidden=HIDDEN), make_tiny_llama(root / "b", seed=1, hidden=HIDDEN)


@pytest.fixture(scope="module")
def full_and_4bit(mid_model_dirs: tuple[Path, Path]) -> tuple[Any, Any]:
    """The same checkpoint in fp32 and in NF4 (fp32 compute)."""
    return load_causal_lm(str(mid_model_dirs[0])).eval(), load_quantized(str(mid_model_dirs[0])).eval()


def sequences(seed: int = 0, n: int = 6, p: int = 8, t: int = 12) -> tuple[torch.Tensor, ...]:
    """Random prompt/completion token ids (no padding) inside the char vocabulary."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, 100, (n, p), generator=g)
    completion = torch.randint(4, 100, (n, t), generator=g)
    return prompt, torch.ones_like(prompt), completion, torch.ones_like(completion)


@torch.no_grad()
def logps(model: Any, seed: int = 0) -> torch.Tensor:
    """``[N, T]`` completion log-probs under ``model``."""
    return score_completions(model, *sequences(seed)).logps


# ----- configuration and validation ----------------------------------------------------------------------------


def test_config_maps_onto_bitsandbytes_config() -> None:
    quant = as_quantization_config({"quant_type": "fp4", "compute_dtype": "bfloat16", "double_quant": False})
    bnb_cfg = quant.to_bnb()
    assert bnb_cfg.load_in_4bit and bnb_cfg.bnb_4bit_quant_type == "fp4"
    assert bnb_cfg.bnb_4bit_compute_dtype == torch.bfloat16 and not bnb_cfg.bnb_4bit_use_double_quant
    assert QuantizationConfig().to_bnb().llm_int8_skip_modules == ["lm_head"]


@pytest.mark.parametrize(
    ("kwargs", "model_kwargs", "match"),
    [
        ({"quant_type": "int4"}, None, "quant_type must be one of"),
        ({"compute_dtype": "float8"}, None, "compute_dtype must be one of"),
        ({}, {"load_in_8bit": True}, r"must not set \['load_in_8bit'\]"),
        ({}, {"device_map": {"": "disk"}}, "offloaded to disk"),
    ],
)
def test_invalid_settings_fail_before_loading(kwargs: dict, model_kwargs: dict | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_quantized_load(QuantizationConfig(**kwargs), model_kwargs)


def test_unknown_yaml_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown keys \['bits'\]"):
        as_quantization_config({"bits": 4})


def test_missing_bitsandbytes_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install 'bitsandbytes"):
        require_bitsandbytes()


# ----- the loaded 4-bit model ------------------------------------------------------------------------------------


def test_linear_layers_are_4bit_and_lm_head_is_kept(full_and_4bit: tuple[Any, Any]) -> None:
    _, quant = full_and_4bit
    assert count_4bit_linears(quant) == 7 * 2  # q, k, v, o, gate, up, down in each of 2 layers
    assert isinstance(quant.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(quant.lm_head, bnb.nn.Linear4bit)  # skip_modules=["lm_head"] (tied to the embedding)
    assert quant.model.layers[0].mlp.down_proj.weight.quant_state.quant_type == "nf4"


def test_memory_is_smaller(full_and_4bit: tuple[Any, Any]) -> None:
    full, quant = full_and_4bit
    full_bytes, quant_bytes = model_memory_bytes(full), model_memory_bytes(quant)
    linear_params = sum(
        m.weight.numel() for m in full.modules() if isinstance(m, torch.nn.Linear) and m is not full.lm_head
    )
    print(
        f"\nfp32 {full_bytes} B, nf4 {quant_bytes} B ({quant_bytes / full_bytes:.3f}x); "
        f"{linear_params} quantized weights: {4 * linear_params} B -> {linear_params // 2} B packed + scales"
    )
    saved = full_bytes - quant_bytes
    # each quantized weight goes from 4 bytes to 0.5 byte plus ~1/64 byte of (double-quantized) scales
    assert 3.4 * linear_params < saved < 3.5 * linear_params
    assert full_bytes == full.get_memory_footprint()  # plain model: our count agrees with transformers'


def test_4bit_forward_is_the_dequantized_model(full_and_4bit: tuple[Any, Any], mid_model_dirs: tuple) -> None:
    """The 4-bit kernels compute exactly the fp32 model whose weights are the dequantized NF4 weights."""
    _, quant = full_and_4bit
    dequant = load_causal_lm(str(mid_model_dirs[0])).eval()
    modules = dict(quant.named_modules())
    with torch.no_grad():
        for name, m in dequant.named_modules():
            if isinstance(modules.get(name), bnb.nn.Linear4bit):
                m.weight.copy_(dequantized_weight(modules[name]))
    torch.testing.assert_close(logps(quant), logps(dequant), atol=1e-5, rtol=0)


def test_4bit_logps_are_close_to_full_precision(full_and_4bit: tuple[Any, Any], mid_model_dirs: tuple) -> None:
    """NF4 moves log-probs far less than swapping in another random model of the same shape does.

    Measured (hidden 128, 6x12 tokens): mean |dlogp| ~0.03 for NF4 vs ~0.25 between two seeds; the log-probs
    themselves spread with std ~0.25 (random models are near-uniform over the 100 tokens).
    """
    full, quant = full_and_4bit
    other = load_causal_lm(str(mid_model_dirs[1])).eval()
    ref = logps(full)
    quant_err = (logps(quant) - ref).abs().mean().item()
    seed_gap = (logps(other) - ref).abs().mean().item()
    print(f"\nmean |dlogp|: nf4 vs fp32 {quant_err:.4f}, seed 1 vs seed 0 {seed_gap:.4f}")
    assert quant_err < 0.05
    assert quant_err < 0.25 * seed_gap
    corr = torch.corrcoef(torch.stack([logps(quant).flatten(), ref.flatten()]))[0, 1].item()
    assert corr > 0.97


def test_eval_and_train_forwards_agree_at_any_width(tiny_model_dir: Path) -> None:
    """bitsandbytes' CPU repacking is off: no-grad eval scoring equals the train-mode forward, even at hidden 32."""
    quant = load_quantized(str(tiny_model_dir))
    train_logps = score_completions(quant.train(), *sequences()).logps.detach()
    torch.testing.assert_close(logps(quant.eval()), train_logps, atol=0, rtol=0)


def test_backward_through_lora_on_4bit(full_and_4bit: tuple[Any, Any], mid_model_dirs: tuple) -> None:
    """QLoRA on CPU: the adapter gets gradients and keeps learning after a no-grad eval (reference) pass."""
    pytest.importorskip("peft")
    from gcpo_lightning.policy.lora import LoRAConfig, adapter_disabled, apply_lora

    policy = apply_lora(load_quantized(str(mid_model_dirs[0])), LoRAConfig(r=4, target_modules="all-linear"))
    assert isinstance(policy.get_base_model().model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    prompt, pmask, completion, cmask = sequences()
    losses = []
    for _ in range(3):
        policy.train()
        loss = -score_completions(policy, prompt, pmask, completion, cmask).logps.mean()
        loss.backward()
        grads = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        policy.eval()
        with torch.no_grad(), adapter_disabled(policy):
            reference = score_completions(policy, prompt, pmask, completion, cmask).logps
    assert losses[2] < losses[1] < losses[0]  # still learning after the eval passes
    torch.testing.assert_close(reference, logps(full_and_4bit[1]), atol=0, rtol=0)
