"""The ``graph_builder`` slot: each group's causal structure (GRPO's fork, GCPO's collider, Sec. 3)."""

from gcpo_lightning.components.graphs.collider import ColliderGraphBuilder
from gcpo_lightning.components.graphs.independent import IndependentResponses

__all__ = ["ColliderGraphBuilder", "IndependentResponses"]
