"""A table of sample completions with their rewards: a JSONL file, and the logger's own table where it has one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor

from gcpo_lightning.interfaces.containers import Rollout


def completions_table(rollout: Rollout, rewards: Tensor, step: int, n: int) -> list[dict[str, Any]]:
    """The first ``n`` completions of the rollout with their prompt and total reward."""
    return [
        {
            "step": step,
            "prompt": rollout.rows[i // rollout.group_size]["prompt"],
            "completion": rollout.completions[i],
            "reward": rewards[i].item(),
        }
        for i in range(min(n, len(rollout.completions)))
    ]


def write_completions(table: list[dict[str, Any]], log_dir: str | Path | None, logger: Any, step: int) -> None:
    """Append ``table`` to ``<log_dir>/completions.jsonl`` and hand it to W&B-style or TensorBoard loggers."""
    folder = Path(log_dir or ".")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "completions.jsonl", "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in table)
    if logger is not None and hasattr(logger, "log_table"):
        logger.log_table(key="completions", columns=list(table[0]), data=[list(r.values()) for r in table])
    elif logger is not None and hasattr(getattr(logger, "experiment", None), "add_text"):
        rows = "\n".join(f"| {r['prompt']!r} | {r['completion']!r} | {r['reward']:.2f} |" for r in table)
        logger.experiment.add_text("completions", "| prompt | completion | reward |\n|---|---|---|\n" + rows, step)


class CompletionsTable(L.Callback):
    """Every ``every_n_steps`` training steps, writes the first ``num_rows`` completions with their rewards to
    ``completions.jsonl`` in the log folder (and to the logger's table where it has one), on rank 0.

    Reads what ``training_step`` returns: ``{"rollout": Rollout, "rewards": [N] Tensor, "step": int}``.
    """

    def __init__(self, every_n_steps: int = 10, num_rows: int = 8) -> None:
        self.every_n_steps, self.num_rows = every_n_steps, num_rows

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Write the table when the step the module logged (``outputs["step"]``) is a multiple of ``every_n_steps``."""
        if not trainer.is_global_zero or not outputs or self.every_n_steps <= 0:
            return
        step = outputs["step"]
        if step % self.every_n_steps == 0:
            table = completions_table(outputs["rollout"], outputs["rewards"], step, self.num_rows)
            write_completions(table, trainer.log_dir, pl_module.logger, step)
