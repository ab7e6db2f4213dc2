"""The ``loss`` slot: how per-token losses become one number (TRL's ``loss_type``), as small components.

Each aggregation also declares how it weighs tokens across micro-batches and data-parallel ranks, so that
gradient accumulation and data parallelism give the gradient of the loss over the whole step:

- :class:`SequenceMean` (TRL ``grpo``, the paper): mean over each completion's tokens, then over completions;
  micro-batches and ranks weigh by their share of completions (equal, as groups are never split).
- :class:`TokenMean` (TRL ``dapo``): mean over every token of the step; micro-batches and ranks weigh by their
  share of tokens (``token_weighted``).
- :class:`ConstantNormalizer` (TRL ``dr_grpo``): sum over tokens divided by ``N * max_completion_length``.
"""

from __future__ import annotations

from torch import Tensor

from gcpo_lightning.functional.batching import micro_batches
from gcpo_lightning.functional.losses import constant_normalizer, sequence_mean, token_mean


class LossAggregation:
    """Base class: aggregate ``[N, T]`` per-token losses under a ``[N, T]`` mask into a scalar."""

    name: str = "custom"
    """TRL's ``loss_type`` name of the aggregation (logged and shown in errors)."""

    token_weighted: bool = False
    """Weigh micro-batches and ranks by their share of completion tokens instead of completions."""

    def __call__(self, per_token: Tensor, mask: Tensor, max_completion_length: int) -> Tensor:
        """The aggregated loss of one (micro-)batch."""
        raise NotImplementedError

    def micro_batches(self, completion_mask: Tensor, size: int | None) -> list[tuple[Tensor, float]]:
        """Chunks of ``size`` completions with the weights that make their summed losses the mini-batch's."""
        return micro_batches(completion_mask, size, self.token_weighted)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SequenceMean(LossAggregation):
    """GRPO / the paper (Eq. 10): ``mean_i mean_t``; every completion weighs the same whatever its length."""

    name = "grpo"

    def __call__(self, per_token: Tensor, mask: Tensor, max_completion_length: int) -> Tensor:
        return sequence_mean(per_token, mask, max_completion_length)


class TokenMean(LossAggregation):
    """DAPO: the mean over every completion token of the step, so long completions weigh more."""

    name = "dapo"
    token_weighted = True

    def __call__(self, per_token: Tensor, mask: Tensor, max_completion_length: int) -> Tensor:
        return token_mean(per_token, mask, max_completion_length)


class ConstantNormalizer(LossAggregation):
    """Dr. GRPO: the token sum over the constant ``N * max_completion_length`` (no length bias)."""

    name = "dr_grpo"

    def __call__(self, per_token: Tensor, mask: Tensor, max_completion_length: int) -> Tensor:
        return constant_normalizer(per_token, mask, max_completion_length)


AGGREGATIONS: dict[str, type[LossAggregation]] = {c.name: c for c in (SequenceMean, TokenMean, ConstantNormalizer)}
"""The built-in aggregations by TRL's ``loss_type`` name."""
