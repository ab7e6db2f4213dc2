"""``VLLMSampler``'s sleep mode on a real engine (CUDA only: vLLM's sleep mode does not exist on CPU).

The order of the engine calls is tested on CPU against a recording engine (``tests/component/test_sampler_sleep.py``);
this file checks, on a CUDA machine with vLLM, that sleeping frees GPU memory and that the woken engine generates
with the policy's current weights.
"""

from __future__ import annotations

import pytest
import torch

from gcpo_lightning.components.sampling.backends import HFGenerate
from gcpo_lightning.components.sampling.group_sampler import GroupSampler
from gcpo_lightning.components.sampling.vllm_sampler import VLLMSampler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's sleep mode needs CUDA")


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_gpu_memory_and_the_woken_engine_has_the_new_weights(keep_alive, questions, level) -> None:
    from gcpo_lightning.interfaces.containers import PolicyModels
    from gcpo_lightning.policy.builder import PolicyBuilder

    built = PolicyBuilder(model_name_or_path="tiny-arith", use_chat_template=False).build(False, "cuda")
    models = keep_alive(PolicyModels(built.policy, built.tokenizer, None, 1.0))
    sampler = keep_alive(VLLMSampler(temperature=0.0, max_completion_length=24, sleep_level=level))
    hf = GroupSampler(temperature=0.0, max_completion_length=24, backend=HFGenerate())
    before = sampler.sample(models, questions, 1, score=False)
    free_awake = torch.cuda.mem_get_info()[0]
    sampler.sleep()
    assert sampler.sleeping and torch.cuda.mem_get_info()[0] > free_awake  # the KV cache (at least) was given back
    torch.manual_seed(0)
    with torch.no_grad():  # an optimiser step while the engine sleeps
        for p in models.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = sampler.sample(models, questions, 1, score=False)
    assert not sampler.sleeping and after.completions != before.completions
    assert after.completions == hf.sample(models, questions, 1, greedy=True, score=False).completions
