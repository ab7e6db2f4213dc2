"""The ``kl`` slot: the per-token penalty (reference KL Eq. 7, causally projected KL Eq. 12-13)."""

from gcpo_lightning.components.penalties.causal_kl import CausalProjectedKL
from gcpo_lightning.components.penalties.reference_kl import ReferenceKL

__all__ = ["CausalProjectedKL", "ReferenceKL"]
