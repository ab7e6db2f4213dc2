"""Data modules, sources, presets and the shipped tasks: prompt rows with their answer columns."""

from gcpo_lightning.data.datamodules import (
    ArithmeticDataModule,
    DataError,
    HFPromptDataModule,
    RowsDataModule,
    WordProblemDataModule,
)

__all__ = ["ArithmeticDataModule", "DataError", "HFPromptDataModule", "RowsDataModule", "WordProblemDataModule"]
