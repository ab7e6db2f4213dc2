"""GRPO's causal graph: the fork ``q -> y_i`` alone, responses independent given the query."""

from __future__ import annotations

from gcpo_lightning.interfaces.containers import CausalGraph, PolicyModels, Rollout
from gcpo_lightning.interfaces.protocols import CausalGraphBuilder, Sampler


class IndependentResponses(CausalGraphBuilder):
    """No collider: each response is conditioned on the query only (GRPO's view of a group). Costs nothing."""

    needs_representations = False  # GRPO reads no hidden states or old log-probs

    def build(self, rollout: Rollout, models: PolicyModels, sampler: Sampler) -> CausalGraph:
        """The fork-only graph, carrying the candidates' representations ``rep(y_i)``."""
        return CausalGraph(group_size=rollout.group_size, representations=rollout.hidden)
