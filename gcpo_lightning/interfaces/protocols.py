"""The component interfaces: one small Protocol per variation point, one verb each.

Built-in components inherit these Protocols (and nothing else), so that LightningCLI accepts short class names
in YAML and checks signatures at parse time. Your own component only needs the same methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

from gcpo_lightning.interfaces.containers import (
    Advantages,
    CausalGraph,
    Penalty,
    PenaltyInputs,
    PolicyModels,
    Rollout,
    Scores,
)

RewardFn = Callable[..., Sequence[float | None]]
"""A reward function: ``fn(prompts=[...], completions=[...], **columns) -> one float per completion``.

``columns`` are the data row's other fields (e.g. ``answer``), each repeated once per completion, as in TRL.
``None`` marks a completion the function does not score. Plain functions work.
"""


@runtime_checkable
class Sampler(Protocol):
    """Generates groups of completions and scores them under the rollout policy (old log-probs, ``rep(y)``).

    A sampler may also define ``sleep()``: the module calls it once a step's generation phases are over, before
    the update, for a sampler that holds memory the update can use (``VLLMSampler``'s sleep mode); the next
    ``sample`` must work after it. See :func:`release_sampler_memory`.
    """

    temperature: float
    max_completion_length: int

    def sample(
        self, models: PolicyModels, prompts: list[str], num_generations: int, greedy: bool = False, score: bool = True
    ) -> Rollout:
        """``num_generations`` completions per prompt, group-major; ``score`` fills old log-probs and hidden states."""
        ...


def release_sampler_memory(sampler: Sampler) -> None:
    """Call ``sampler.sleep()`` where the sampler defines it (the generation phases of a step are over)."""
    sleep = getattr(sampler, "sleep", None)
    if callable(sleep):
        sleep()


@runtime_checkable
class CausalGraphBuilder(Protocol):
    """Builds each group's causal structure (integrated outputs, conditioning contexts and representations)."""

    def build(self, rollout: Rollout, models: PolicyModels, sampler: Sampler) -> CausalGraph:
        """The graph of every group in ``rollout``; runs without gradients."""
        ...


@runtime_checkable
class RewardAdjuster(Protocol):
    """Turns rewards into per-completion advantages (GRPO's normalisation, GCPO's causal weighting)."""

    def adjust(
        self, rewards: Tensor, rollout: Rollout, graph: CausalGraph, batch_rewards: Tensor | None = None
    ) -> Advantages:
        """``[N]`` rewards to ``[N]`` advantages.

        Groups never span ranks (each rank samples whole groups), so group statistics are local. ``batch_rewards``
        holds the rewards of the whole step gathered from every data-parallel rank (``[W*N]``, this rank's
        included) for batch-level statistics; ``None`` means ``rewards`` is the whole batch.
        """
        ...


@runtime_checkable
class ProjectedKL(Protocol):
    """The per-token penalty: the reference KL, and GCPO's causally projected KL."""

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen reference model must be built (False skips building one)."""
        ...

    def prepare(self, rollout: Rollout, graph: CausalGraph, models: PolicyModels) -> PenaltyInputs:
        """No-grad work done once per rollout (e.g. reference log-probs); every tensor has leading dim ``N``."""
        ...

    def penalty(self, scores: Scores, rollout: Rollout, prepared: PenaltyInputs, models: PolicyModels) -> Penalty:
        """The weighted per-token penalty ``[N, T]`` for the (mini-batch) ``rollout`` under the current policy."""
        ...
