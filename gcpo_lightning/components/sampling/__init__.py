"""The ``sampler`` slot: groups of completions and their scores under the rollout policy."""

from gcpo_lightning.components.sampling.group_sampler import GroupSampler
from gcpo_lightning.components.sampling.vllm_sampler import VLLMSampler  # vLLM itself is imported when first used

__all__ = ["GroupSampler", "VLLMSampler"]
