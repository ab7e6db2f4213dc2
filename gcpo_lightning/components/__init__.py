"""The swappable components of a step, one subpackage per slot of :class:`GCPOModule`.

Importing this package imports every built-in component, so that LightningCLI resolves their short class names
(``--model.loss TokenMean``, ``similarity: Gaussian``, ``backend: HFGenerate``)."""

from gcpo_lightning.components.adjusters.causal import CausalAdvantage
from gcpo_lightning.components.adjusters.group_normalized import GroupNormalizedAdvantage
from gcpo_lightning.components.adjusters.similarity import Cosine, Euclidean, Gaussian, Similarity
from gcpo_lightning.components.aggregation import ConstantNormalizer, LossAggregation, SequenceMean, TokenMean
from gcpo_lightning.components.graphs.collider import ColliderGraphBuilder
from gcpo_lightning.components.graphs.independent import IndependentResponses
from gcpo_lightning.components.penalties.causal_kl import CausalProjectedKL
from gcpo_lightning.components.penalties.reference_kl import ReferenceKL
from gcpo_lightning.components.sampling.backends import GenerationBackend, HFGenerate, KVCacheLoop, StaticCacheLoop
from gcpo_lightning.components.sampling.group_sampler import GroupSampler
from gcpo_lightning.components.sampling.vllm_sampler import VLLMSampler

__all__ = [
    "CausalAdvantage",
    "CausalProjectedKL",
    "ColliderGraphBuilder",
    "ConstantNormalizer",
    "Cosine",
    "Euclidean",
    "Gaussian",
    "GenerationBackend",
    "GroupNormalizedAdvantage",
    "GroupSampler",
    "HFGenerate",
    "IndependentResponses",
    "KVCacheLoop",
    "LossAggregation",
    "ReferenceKL",
    "SequenceMean",
    "Similarity",
    "StaticCacheLoop",
    "TokenMean",
    "VLLMSampler",
]
