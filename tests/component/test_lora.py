"""LoRA via peft: only the adapter trains, the adapter-off reference is the base exactly, merged export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("peft")

from gcpo_lightning.components.penalties.reference_kl import reference_logps  # noqa: E402
from gcpo_lightning.components.scoring.logprobs import score_completions, score_in_batches  # noqa: E402
from gcpo_lightning.interfaces.containers import PolicyModels, Rollout  # noqa: E402
from gcpo_lightning.policy.loading import load_causal_lm, load_tokenizer  # noqa: E402
from gcpo_lightning.policy.lora import (
    DisabledAdapterReference,
    # noqa: E402     DisabledAdapterReference,
    LoRAConfig,
    adapter_disabled,
    apply_lora,
    as_lora_config,
    available_target_modules,
    export_merged,
    is_lora,
    trainable_parameter_names,
)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def batch(seed: int = 0, n: int = 4, p: int = 6, t: int = 8) -> tuple[torch.Tensor, ...]:
    """Prompt/completion ids with some left padding in the prompts and right padding in the completions."""
    g = torch.Generator().manual_seed(seed)
    prompt, completion = torch.randint(4, 100, (n, p), generator=g), torch.randint(4, 100, (n, t), generator=g)
    pmask, cmask = torch.ones_like(prompt), torch.ones_like(completion)
    pmask[0, :2] = 0
    cmask[1, -3:] = 0
    return prompt, pmask, completion, cmask


def train_steps(model: Any, steps: int = 2, lr: float = 1e-2) -> None:
    """A few AdamW steps maximizing the batch's completion log-probs."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        scores = score_completions(model, *batch())
        (-(scores.logps * batch()[3]).sum() / batch()[3].sum()).backward()
        opt.step()
        opt.zero_grad()


@torch.no_grad()
def logits(model: Any) -> torch.Tensor:
    """``[N, L, V]`` eval-mode logits over the batch."""
    prompt, pmask, completion, cmask = batch()
    was_training = model.training
    model.eval()
    out = model(input_ids=torch.cat([prompt, completion], 1), attention_mask=torch.cat([pmask, cmask], 1)).logits
    model.train(was_training)
    return out


@pytest.fixture
def base_and_lora(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The tiny fp32 Llama, plain, and another load of it with a default (rank 4) attention LoRA."""
    base = load_causal_lm(str(tiny_model_dir)).eval()
    return base, apply_lora(load_causal_lm(str(tiny_model_dir)), LoRAConfig(r=4, alpha=8))


def test_config_from_yaml_mapping_and_errors() -> None:
    cfg = as_lora_config({"r": 16, "alpha": 32, "target_modules": "all-linear"})
    peft_cfg = cfg.to_peft()
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.target_modules) == (16, 32, "all-linear")
    assert set(LoRAConfig().to_peft().target_modules) == set(ATTENTION)
    with pytest.raises(ValueError, match="bias must be one of"):
        LoRAConfig(bias="some").validate()
    with pytest.raises(ValueError, match=r"unknown keys \['rank'\]"):
        as_lora_config({"rank": 4})


def test_unknown_target_module_names_the_available_ones(tiny_model_dir: Path) -> None:
    model = load_causal_lm(str(tiny_model_dir))
    with pytest.raises(ValueError, match=r"\['c_attn'\] match no layer.*'q_proj'") as err:
        apply_lora(model, LoRAConfig(target_modules=["q_proj", "c_attn"]))
    assert "down_proj" in str(err.value)
    assert {"q_proj", "gate_proj", "lm_head", "embed_tokens"} <= set(available_target_modules(model))


def test_only_adapter_parameters_train(base_and_lora: tuple[Any, Any]) -> None:
    _, policy = base_and_lora
    assert is_lora(policy)
    names = trainable_parameter_names(policy)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert len(names) == 2 * len(ATTENTION) * 2  # A and B, 4 projections, 2 layers
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    train_steps(policy, steps=1)
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)  # B starts at 0 and moves first


def test_disabled_adapter_is_the_base_model_after_training(base_and_lora: tuple[Any, Any]) -> None:
    base, policy = base_and_lora
    train_steps(policy)
    assert not torch.allclose(logits(policy), logits(base), atol=1e-4)  # the adapter did change the policy
    with adapter_disabled(policy):
        torch.testing.assert_close(logits(policy), logits(base), atol=0, rtol=0)
    torch.testing.assert_close(logits(policy), logits(policy))  # adapter back on afterwards
    assert not torch.allclose(logits(policy), logits(base), atol=1e-4)


def test_disabled_adapter_reference_in_the_kl(base_and_lora: tuple[Any, Any], tiny_model_dir: Path) -> None:
    """The view drops into ``PolicyModels.reference``: the KL's reference log-probs are the base model's."""
    base, policy = base_and_lora
    train_steps(policy)
    policy.train()
    prompt, pmask, completion, cmask = batch()
    rollout = Rollout(
        prompts=["q"],
        completions=[""] * 4,
        prompt_ids=prompt,
        prompt_mask=pmask,
        completion_ids=completion,
        completion_mask=cmask,
        group_size=4,
    )
    reference = DisabledAdapterReference(policy).eval().to("cpu").requires_grad_(False)
    models = PolicyModels(policy=policy, tokenizer=None, reference=reference)
    policy.train()
    ref = reference_logps(rollout, models)
    assert policy.training  # score_in_batches restored the policy's mode through the view
    torch.testing.assert_close(ref, score_in_batches(base, prompt, pmask, completion, cmask).logps, atol=0, rtol=0)
    with pytest.raises(TypeError, match="peft.PeftModel"):
        DisabledAdapterReference(base)


def test_merged_export_loads_and_matches(base_and_lora: tuple[Any, Any], tiny_model_dir: Path, tmp_path: Path) -> None:
    _, policy = base_and_lora
    train_steps(policy)
    out = export_merged(policy, load_tokenizer(str(tiny_model_dir)), tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    merged = load_causal_lm(str(out)).eval()
    assert not is_lora(merged)
    torch.testing.assert_close(logits(merged), logits(policy), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(merged), logits(base_and_lora[0]), atol=1e-4)  # the update is in there
    assert load_tokenizer(str(out)).pad_token_id == load_tokenizer(str(tiny_model_dir)).pad_token_id
    with adapter_disabled(policy):  # exporting left the live adapter unmerged
        torch.testing.assert_close(logits(policy), logits(base_and_lora[0]), atol=0, rtol=0)


def test_all_linear_skips_the_output_head(tiny_model_dir: Path) -> None:
    policy = apply_lora(load_causal_lm(str(tiny_model_dir)), LoRAConfig(r=2, target_modules="all-linear"))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable_parameter_names(policy) if "lora_A" in n}
    assert adapted == {*ATTENTION, "gate_proj", "up_proj", "down_proj"}


def test_qlora_merged_export_matches_the_4bit_policy(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A 4-bit base is dequantized into the export: it reproduces the trained QLoRA policy."""
    pytest.importorskip("bitsandbytes")
    from gcpo_lightning.policy.quantization import count_4bit_linears, load_quantized

    policy = apply_lora(load_quantized(str(tiny_model_dir)), LoRAConfig(r=4))
    assert count_4bit_linears(policy) == 14
    train_steps(policy)
    merged = load_causal_lm(str(export_merged(policy, None, tmp_path / "merged"))).eval()
    assert count_4bit_linears(merged) == 0
    assert not hasattr(merged.config, "quantization_config")
    torch.testing.assert_close(logits(merged), logits(policy), atol=1e-5, rtol=1e-5)
    with adapter_disabled(policy):
        assert not torch.allclose(logits(merged), logits(policy), atol=1e-4)  # the update is in there
