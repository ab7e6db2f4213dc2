"""gcpo_lightning: GRPO and GCPO (Group Causal Policy Optimization) post-training with PyTorch Lightning.

The package is layered (``docs/architecture.md``); each layer imports only the layers below it:

- ``cli``, ``module``: the command line and the LightningModule that wires the components;
- ``training``, ``evaluation``: callbacks, checks, distributed helpers, metrics;
- ``data``: datamodules, sources, presets and the shipped tasks;
- ``components`` (one subpackage per slot), ``rewards``: the swappable parts of a step;
- ``policy``: loading, LoRA, 4-bit quantization, FSDP2 sharding of the models;
- ``interfaces``: the typed containers and Protocols the components exchange;
- ``functional``: the paper's maths as pure tensor functions (imports only torch);
- ``reporting``: the ``report`` command, plots and a summary of finished runs (no torch, no Lightning).

The public names below are imported lazily, so ``import gcpo_lightning`` is cheap and importing one layer never
pulls in the layers above it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC: dict[str, str] = {
    "PolicyBuilder": "policy.builder",
    "SequenceMean": "components.aggregation",
    "TokenMean": "components.aggregation",
    "ConstantNormalizer": "components.aggregation",
    "Cosine": "components.adjusters.similarity",
    "Euclidean": "components.adjusters.similarity",
    "Gaussian": "components.adjusters.similarity",
    "KVCacheLoop": "components.sampling.backends",
    "HFGenerate": "components.sampling.backends",
    "StaticCacheLoop": "components.sampling.backends",
    "Advantages": "interfaces.containers",
    "ArithmeticDataModule": "data.datamodules",
    "CausalAdvantage": "components.adjusters.causal",
    "CausalGraph": "interfaces.containers",
    "CausalGraphBuilder": "interfaces.protocols",
    "CausalProjectedKL": "components.penalties.causal_kl",
    "CheckpointOnSigterm": "training.callbacks",
    "CodeExecution": "rewards.code",
    "ColliderGraphBuilder": "components.graphs.collider",
    "GCPOModule": "module",
    "GroupNormalizedAdvantage": "components.adjusters.group_normalized",
    "GroupSampler": "components.sampling.group_sampler",
    "HFExport": "training.callbacks",
    "HFPromptDataModule": "data.datamodules",
    "IndependentResponses": "components.graphs.independent",
    "MathAccuracy": "rewards.math",
    "Penalty": "interfaces.containers",
    "PolicyModels": "interfaces.containers",
    "ProjectedKL": "interfaces.protocols",
    "ReferenceKL": "components.penalties.reference_kl",
    "RewardAdjuster": "interfaces.protocols",
    "RewardFn": "interfaces.protocols",
    "Rollout": "interfaces.containers",
    "Sampler": "interfaces.protocols",
    "Scores": "interfaces.containers",
    "TagFormat": "rewards.math",
    "WordProblemDataModule": "data.datamodules",
    "arithmetic_accuracy": "rewards.arithmetic",
}
"""Public name -> the module (below ``gcpo_lightning``) that defines it."""

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'gcpo_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gcpo_lightning.{_PUBLIC[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


if TYPE_CHECKING:
    from gcpo_lightning.components.adjusters.causal import CausalAdvantage
    from gcpo_lightning.components.adjusters.group_normalized import GroupNormalizedAdvantage
    from gcpo_lightning.components.adjusters.similarity import Cosine, Euclidean, Gaussian
    from gcpo_lightning.components.aggregation import ConstantNormalizer, SequenceMean, TokenMean
    from gcpo_lightning.components.graphs.collider import ColliderGraphBuilder
    from gcpo_lightning.components.graphs.independent import IndependentResponses
    from gcpo_lightning.components.penalties.causal_kl import CausalProjectedKL
    from gcpo_lightning.components.penalties.reference_kl import ReferenceKL
    from gcpo_lightning.components.sampling.backends import HFGenerate, KVCacheLoop, StaticCacheLoop
    from gcpo_lightning.components.sampling.group_sampler import GroupSampler
    from gcpo_lightning.data.datamodules import ArithmeticDataModule, HFPromptDataModule, WordProblemDataModule
    from gcpo_lightning.interfaces.containers import Advantages, CausalGraph, Penalty, PolicyModels, Rollout, Scores
    from gcpo_lightning.interfaces.protocols import CausalGraphBuilder, ProjectedKL, RewardAdjuster, RewardFn, Sampler
    from gcpo_lightning.module import GCPOModule
    from gcpo_lightning.policy.builder import PolicyBuilder
    from gcpo_lightning.rewards.arithmetic import arithmetic_accuracy
    from gcpo_lightning.rewards.code import CodeExecution
    from gcpo_lightning.rewards.math import MathAccuracy, TagFormat
    from gcpo_lightning.training.callbacks import CheckpointOnSigterm, HFExport
