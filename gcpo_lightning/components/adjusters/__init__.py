"""The ``adjuster`` slot: rewards to advantages (GRPO's normalisation, GCPO's causal weighting, Eq. 8, 11)."""

from gcpo_lightning.components.adjusters.causal import CausalAdvantage
from gcpo_lightning.components.adjusters.group_normalized import GroupNormalizedAdvantage

__all__ = ["CausalAdvantage", "GroupNormalizedAdvantage"]
