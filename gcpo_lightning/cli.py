"""The command line: ``python -m gcpo_lightning {fit,validate,test} --config configs/gcpo.yaml``.

A thin LightningCLI: the system is :class:`GCPOModule`, any ``LightningDataModule`` is accepted by
``class_path``, and every component inside the module is chosen by ``class_path``/``init_args``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

import gcpo_lightning.components  # noqa: F401  (imports every built-in component: short class names in YAML)
from gcpo_lightning.data.datamodules import ArithmeticDataModule
from gcpo_lightning.module import GCPOModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "num_sanity_val_steps": -1,  # the whole held-out set is scored before training: the step-0 baseline
    "log_every_n_steps": 1,
    "check_val_every_n_epoch": None,
    "val_check_interval": 50,
    "max_steps": 100,
}


class GCPOCLI(LightningCLI):
    """LightningCLI with the kit's defaults: the arithmetic data module and per-step logging."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Default the data module to the embedded task."""
        parser.set_defaults({"data": {"class_path": f"{ArithmeticDataModule.__module__}.ArithmeticDataModule"}})


def main(args: list[str] | None = None, run: bool = True) -> GCPOCLI:
    """Build the CLI (and run the subcommand when ``run``)."""
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
