"""A LoRA policy: the engine is built from, and pushed, the merged weights (``policy.lora.merged_state_dict``)."""

from __future__ import annotations

import torch

from gcpo_lightning.components.sampling.backends import HFGenerate
from gcpo_lightning.components.sampling.group_sampler import GroupSampler
from gcpo_lightning.components.sampling.vllm_sampler import VLLMSampler
from gcpo_lightning.interfaces.containers import PolicyModels
from gcpo_lightning.policy.builder import PolicyBuilder
from gcpo_lightning.policy.lora import LoRAConfig

HF = GroupSampler(temperature=0.0, max_completion_length=24, backend=HFGenerate())  # see test_vllm_sampler.py


def test_lora_policy_generates_and_pushes_its_merged_weights(questions, keep_alive) -> None:
    lora = LoRAConfig(r=4, target_modules="all-linear", init_weights=False)  # B != 0: the adapter changes outputs
    built = PolicyBuilder(model_name_or_path="tiny-arith", use_chat_template=False, lora=lora).build(False, "cpu")
    models = PolicyModels(keep_alive(built.policy), built.tokenizer, None, 1.0)
    sampler = keep_alive(VLLMSampler(max_completion_length=24))
    before = sampler.sample(models, questions, 2, greedy=True, score=False)
    assert before.completions == HF.sample(models, questions, 2, greedy=True, score=False).completions
    with built.policy.disable_adapter():  # the base alone answers differently: the engine holds the merged model
        assert before.completions != HF.sample(models, questions, 2, greedy=True, score=False).completions
    torch.manual_seed(1)
    with torch.no_grad():  # an optimiser step moves only the adapters
        for p in built.policy.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    after = sampler.sample(models, questions, 2, greedy=True, score=False)
    assert sampler.weight_pushes == 1
    assert after.completions != before.completions
    assert after.completions == HF.sample(models, questions, 2, greedy=True, score=False).completions
