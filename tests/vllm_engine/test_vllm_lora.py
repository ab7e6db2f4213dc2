"""A LoRA policy: the engine is built from, and pushed, the merged weights (``policy.lora.merged_state_dict``)."""

from __future__ import annotations

import torch

from gcpo_lightning.components.sampling.backends import HFGenerate
from gcpo_lightning.components.sampling.group_sampler import GroupSampler
from gcpo_lightning.components.sampling.vllm_sampler import VLLMSampler
from gcpo_lightning.components.scoring.logprobs import position_ids_from_mask
from gcpo_lightning.interfaces.containers import PolicyModels, Rollout
from gcpo_lightning.policy.builder import PolicyBuilder
from gcpo_lightning.policy.lora import LoRAConfig

HF = GroupSampler(temperature=0.0, max_completion_length=24, backend=HFGenerate())  # see test_vllm_sampler.py
TIE = 1e-3  # nats: two tokens this close are a tie that float rounding (threads, kernels) may break either way


@torch.no_grad()
def greedy_gap(models: PolicyModels, rollout: Rollout) -> float:
    """How far the engine's greedy tokens fall below the HF policy's best token, teacher-forced (nats, the largest
    over all real completion tokens): 0 when the policy would choose every one of them.

    Exact text equality would fail on a near tie, which a LoRA policy with random adapters has plenty of.
    """
    ids, mask = rollout.input_ids(), rollout.attention_mask()  # [N, P+T] twice
    logits = models.policy(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits.float()  # [N, P+T, V]
    P = rollout.prompt_ids.shape[1]
    logp = logits[:, P - 1 : -1].log_softmax(-1)  # [N, T, V] predicting each completion token
    chosen = logp.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)  # [N, T]
    gap = (logp.max(-1).values - chosen) * rollout.completion_mask  # [N, T]
    return float(gap.max())


def test_lora_policy_generates_and_pushes_its_merged_weights(questions, keep_alive) -> None:
    lora = LoRAConfig(r=4, target_modules="all-linear", init_weights=False)  # B != 0: the adapter changes outputs
    built = PolicyBuilder(model_name_or_path="tiny-arith", use_chat_template=False, lora=lora).build(False, "cpu")
    models = PolicyModels(keep_alive(built.policy), built.tokenizer, None, 1.0)
    sampler = keep_alive(VLLMSampler(max_completion_length=24))
    before = sampler.sample(models, questions, 2, greedy=True, score=False)
    assert greedy_gap(models, before) < TIE  # the policy with its adapters chooses what the engine chose
    with built.policy.disable_adapter():  # the base alone answers differently: the engine holds the merged model
        assert before.completions != HF.sample(models, questions, 2, greedy=True, score=False).completions
        assert greedy_gap(models, before) > 100 * TIE
    torch.manual_seed(1)
    with torch.no_grad():  # an optimiser step moves only the adapters
        for p in built.policy.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    after = sampler.sample(models, questions, 2, greedy=True, score=False)
    assert sampler.weight_pushes == 1
    assert after.completions != before.completions
    assert greedy_gap(models, after) < TIE  # the pushed weights are the moved adapters, merged
    assert greedy_gap(models, before) > 100 * TIE
