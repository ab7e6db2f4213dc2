"""Scoring completions under a model: per-token log-probs, entropies, final hidden states, packed prefixes."""

from gcpo_lightning.components.scoring.logprobs import score_completions, score_in_batches

__all__ = ["score_completions", "score_in_batches"]
