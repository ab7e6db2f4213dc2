"""Run state the system keeps across checkpoints: every rank's random streams, and the count of skipped steps."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from gcpo_lightning.training.rng import all_rng_states, restore_rank_rng

# Lightning warns that with manual optimisation a step-interval checkpoint holds the weights *after* the step:
# that is what we want (weights, optimiser state and step counter agree; exact resume is tested).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


class RandomStateCheckpoint(L.Callback):
    """Saves every rank's random states (torch, CUDA, Python, NumPy) in checkpoints and restores them at
    ``on_train_start`` (restoring earlier would be consumed by set-up), so a resumed run continues the random
    streams exactly where the checkpoint left them. :class:`GCPOModule` adds it in ``configure_callbacks``.
    """

    def __init__(self) -> None:
        self.to_restore: list[dict[str, Any]] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Every rank's states under ``gcpo_rng_states`` (gathered: each rank restores its own)."""
        checkpoint["gcpo_rng_states"] = all_rng_states()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Keep the states for ``on_train_start``."""
        self.to_restore = checkpoint.get("gcpo_rng_states")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Restore this rank's states."""
        if self.to_restore is not None:
            restore_rank_rng(self.to_restore)
            self.to_restore = None


class SkipCounter:
    """Counts optimiser steps skipped for a non-finite loss or gradient, and stops a run of them.

    A skipped step still counts towards ``max_steps`` (so a run of bad steps cannot loop forever), and
    ``max_consecutive`` in a row stop training with an error.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0

    def skip(self, opt: Any, what: str, global_step: int) -> dict[str, float]:
        """Drop the gradients and step the optimiser as a no-op on the weights (Lightning's step counter advances)."""
        opt.zero_grad(set_to_none=True)
        opt.step()  # no parameter has a gradient, so nothing changes
        self.total += 1
        self.consecutive += 1
        rank_zero_info(
            f"GCPOModule: non-finite {what} at global step {global_step}; step skipped ({self.total} skipped so far)"
        )
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"GCPOModule: {self.consecutive} consecutive steps had a non-finite {what}; "
                f"stopping (raise max_consecutive_skips to tolerate more)"
            )
        return {}

    def reset(self) -> None:
        """A step went through."""
        self.consecutive = 0

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.total, "consecutive_skips": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total = state.get("skipped_steps", 0)
        self.consecutive = state.get("consecutive_skips", 0)
