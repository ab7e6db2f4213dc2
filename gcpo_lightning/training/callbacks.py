"""Lightning callbacks: export the policy as a Hugging Face folder, and save a checkpoint when SIGTERM arrives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gcpo_lightning.policy.sharding import full_parameters, full_state_dict


def export_policy(module: Any, path: str | Path) -> Path:
    """Write ``module.policy`` and its tokenizer with ``save_pretrained``; ``from_pretrained(path)`` loads them.

    Under FSDP the full weights are gathered first (every rank must call this; rank 0 writes). A LoRA policy is
    written merged into its base model (a plain model, no PEFT needed to load it).
    """
    path = Path(path)
    policy, rank_zero = module.policy, module.trainer is None or module.trainer.is_global_zero
    if hasattr(policy, "merge_and_unload"):  # LoRA: merge the adapters into a copy of the base weights
        from gcpo_lightning.policy.lora import export_merged

        with full_parameters(policy):  # FSDP: every rank gathers; rank 0 then reads plain tensors
            if rank_zero:
                export_merged(policy, module.tokenizer, path)
    else:
        state = full_state_dict(policy)  # collective under FSDP
        if rank_zero:
            policy.save_pretrained(path, state_dict=state)
            module.tokenizer.save_pretrained(path)
    rank_zero_info(f"policy exported to {path} (load it with from_pretrained)")
    return path


class HFExport(L.Callback):
    """Export the trained policy as a Hugging Face folder when training ends (and every ``every_n_steps``).

    Args:
        dirpath: the folder; ``None`` writes ``<log_dir>/hf_model`` (``step_<n>`` sub-folders for periodic exports).
        every_n_steps: also export every this many optimiser steps (0: only at the end).
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 0) -> None:
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps

    def folder(self, trainer: L.Trainer) -> Path:
        """Where the final export goes."""
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "hf_model"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Periodic exports."""
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0:
            export_policy(pl_module, self.folder(trainer) / f"step_{step}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The final export."""
        export_policy(pl_module, self.folder(trainer))


class CheckpointOnSigterm(L.Callback):
    """Save a full, resumable checkpoint when the run is terminated with SIGTERM (pre-emption, ``scancel``).

    Lightning finishes the current step when SIGTERM arrives and then raises ``SIGTERMException``; this callback
    saves the checkpoint at that step boundary, before the process exits. Resume with ``--ckpt_path <file>``.

    Args:
        dirpath: where ``sigterm.ckpt`` is written; ``None``: the first ``ModelCheckpoint``'s folder, else
            ``<log_dir>/checkpoints``.
        filename: the checkpoint's file name.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "sigterm.ckpt") -> None:
        self.dirpath = dirpath
        self.filename = filename

    def path(self, trainer: L.Trainer) -> Path:
        """The checkpoint file this callback writes."""
        if self.dirpath:
            return Path(self.dirpath) / self.filename
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        return Path(folder) / self.filename

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save on SIGTERM only (other exceptions leave the last regular checkpoint in place)."""
        if isinstance(exception, SIGTERMException):
            path = self.path(trainer)
            trainer.save_checkpoint(path)
            rank_zero_info(f"SIGTERM: checkpoint saved at step {trainer.global_step} to {path}")
