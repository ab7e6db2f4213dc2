"""gcpo_lightning: GRPO and GCPO (Group Causal Policy Optimization) post-training with PyTorch Lightning."""

from gcpo_lightning.advantages import GroupNormalizedAdvantage
from gcpo_lightning.causal_advantage import CausalAdvantage
from gcpo_lightning.causal_kl import CausalProjectedKL
from gcpo_lightning.collider import ColliderGraphBuilder
from gcpo_lightning.containers import Advantages, CausalGraph, Penalty, PolicyModels, Rollout, Scores
from gcpo_lightning.data import ArithmeticDataModule, HFPromptDataModule
from gcpo_lightning.graph import IndependentResponses
from gcpo_lightning.kl import ReferenceKL
from gcpo_lightning.module import GCPOModule
from gcpo_lightning.protocols import CausalGraphBuilder, ProjectedKL, RewardAdjuster, RewardFn, Sampler
from gcpo_lightning.sampling import GroupSampler

__all__ = [
    "Advantages",
    "ArithmeticDataModule",
    "CausalAdvantage",
    "CausalGraph",
    "CausalGraphBuilder",
    "CausalProjectedKL",
    "ColliderGraphBuilder",
    "GCPOModule",
    "GroupNormalizedAdvantage",
    "GroupSampler",
    "HFPromptDataModule",
    "IndependentResponses",
    "Penalty",
    "PolicyModels",
    "ProjectedKL",
    "ReferenceKL",
    "RewardAdjuster",
    "RewardFn",
    "Rollout",
    "Sampler",
    "Scores",
]
