"""The command line: ``python -m gcpo_lightning {fit,validate,test} --config configs/gcpo.yaml``.

``python -m gcpo_lightning report RUN_DIR ...`` (plots and a summary of finished runs) is dispatched to
:mod:`gcpo_lightning.reporting` before LightningCLI is built.

A thin LightningCLI: the system is :class:`GCPOModule`, any ``LightningDataModule`` is accepted by
``class_path``, and every component inside the module is chosen by ``class_path``/``init_args``.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

import gcpo_lightning.components  # noqa: F401  (imports every built-in component: short class names in YAML)
from gcpo_lightning.data.datamodules import ArithmeticDataModule
from gcpo_lightning.data.sources import DataError, one_line
from gcpo_lightning.module import GCPOModule
from gcpo_lightning.policy.loading import ModelPathError

TRAINER_DEFAULTS: dict[str, Any] = {
    "num_sanity_val_steps": -1,  # the whole held-out set is scored before training: the step-0 baseline
    "log_every_n_steps": 1,
    "check_val_every_n_epoch": None,
    "val_check_interval": 50,
    "max_steps": 100,
}


LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
"""``ckpt_path`` values Lightning resolves itself (``registry:...`` too); they are not checked as paths."""


class CheckpointError(ValueError):
    """``ckpt_path`` names no Lightning checkpoint; the message names the path and what is wrong."""


def check_ckpt_path(ckpt_path: str | Path | None) -> None:
    """Raise a one-line :class:`CheckpointError` unless ``ckpt_path`` is a Lightning checkpoint; loads no model.

    Accepted: ``None``, Lightning's own names (``last``, ``best``, ``hpc``, ``registry[:...]``), a remote URL
    (left to Lightning), a folder holding a distributed checkpoint's ``.metadata`` (FSDP2 saves one folder per
    checkpoint), or a file that ``torch.load(..., weights_only=True)`` reads into a mapping with ``state_dict``
    and ``pytorch-lightning_version``. ``weights_only=True`` is how LightningCLI itself reads the checkpoint's
    hyper-parameters next, so a file it refuses would fail there anyway; it also runs no code from the file.
    """
    if ckpt_path is None:
        return
    text = str(ckpt_path)
    if text in LIGHTNING_CKPT_NAMES or text.startswith("registry:") or "://" in text:
        return
    where = f"ckpt_path {text!r}"
    path = Path(text)
    if not path.exists():
        hint = " (~ is not expanded here: write the full path)" if text.startswith("~") else ""
        raise CheckpointError(f"{where}: no such file or folder{hint}")
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise CheckpointError(
                f"{where}: a folder without a .metadata file, so not a distributed checkpoint "
                "(a single-process checkpoint is one .ckpt file)"
            )
        return
    import torch

    is_zip = zipfile.is_zipfile(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as err:  # any failure means: not a checkpoint
        if not is_zip:
            raise CheckpointError(
                f"{where}: not a checkpoint (not a file written by torch.save; torch.load: {type(err).__name__})"
            ) from err
        reason = str(err).split("WeightsUnpickler error:", 1)[-1]  # torch's own line, without its advice
        raise CheckpointError(
            f"{where}: torch.load(weights_only=True), as LightningCLI reads checkpoints, fails: "
            f"{type(err).__name__}: {one_line(reason, 160)}"
        ) from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{where}: holds a {type(ckpt).__name__}, not a Lightning checkpoint (a mapping)")
    missing = [key for key in ("state_dict", "pytorch-lightning_version") if key not in ckpt]
    if missing:
        raise CheckpointError(
            f"{where}: not a Lightning checkpoint: no {' or '.join(repr(k) for k in missing)} "
            "key (a bare state dict or exported weights belong in model_name_or_path's folder)"
        )


class GCPOCLI(LightningCLI):
    """LightningCLI with the kit's defaults: the arithmetic data module and per-step logging.

    ``ckpt_path`` is checked right after parsing (:func:`check_ckpt_path`), before LightningCLI reads it and
    before anything is instantiated.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Default the data module to the embedded task."""
        parser.set_defaults({"data": {"class_path": f"{ArithmeticDataModule.__module__}.ArithmeticDataModule"}})

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then check the subcommand's ``ckpt_path``."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_ckpt_path(self.config[subcommand].get("ckpt_path"))


INPUT_ERRORS: tuple[type[Exception], ...] = (CheckpointError, ModelPathError, DataError)
"""Errors in what the user gave (checkpoint, model path, data file); the command line prints them as one line."""


def main(args: list[str] | None = None, run: bool = True) -> GCPOCLI:
    """Build the CLI (and run the subcommand when ``run``).

    From the command line (``args=None``) a bad checkpoint, model path or data file ends the process with its
    one-line message (``error: ...``) instead of a traceback; called with ``args`` the exception propagates.
    ``report ...`` runs :func:`gcpo_lightning.reporting.command.main` instead and exits with its status.
    """
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["report"]:
        from gcpo_lightning.reporting.command import main as report  # matplotlib is imported for this command only

        raise SystemExit(report(argv[1:]))
    if args is None:
        try:
            return _build(None, run)
        except INPUT_ERRORS as err:
            raise SystemExit(f"error: {err}") from err
    return _build(args, run)


def _build(args: list[str] | None, run: bool) -> GCPOCLI:
    """The CLI with the kit's settings."""
    return GCPOCLI(
        GCPOModule,
        LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )
