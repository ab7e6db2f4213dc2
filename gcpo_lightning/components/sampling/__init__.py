"""The ``sampler`` slot: groups of completions and their scores under the rollout policy."""

from gcpo_lightning.components.sampling.group_sampler import GroupSampler

__all__ = ["GroupSampler"]
