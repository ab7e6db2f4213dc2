"""The contracts between components: typed containers (``containers``) and one Protocol per slot (``protocols``)."""

from gcpo_lightning.interfaces.containers import Advantages, CausalGraph, Penalty, PolicyModels, Rollout, Scores
from gcpo_lightning.interfaces.protocols import CausalGraphBuilder, ProjectedKL, RewardAdjuster, RewardFn, Sampler

__all__ = [
    "Advantages",
    "CausalGraph",
    "CausalGraphBuilder",
    "Penalty",
    "PolicyModels",
    "ProjectedKL",
    "RewardAdjuster",
    "RewardFn",
    "Rollout",
    "Sampler",
    "Scores",
]
