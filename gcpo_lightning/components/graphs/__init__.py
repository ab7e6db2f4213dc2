"""The ``graph_builder`` slot: each group's causal structure (GRPO's fork, GCPO's collider, Sec. 3)."""

from gcpo_lightning.components.graphs.independent import IndependentResponses
from gcpo_lightning.components.graphs.collider import ColliderGraphBuilder

__all__ = ["ColliderGraphBuilder", "IndependentResponses"]
