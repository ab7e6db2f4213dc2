"""A table of sample completions with their rewards: a JSONL file, and the logger's own table where it has one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from gcpo_lightning.interfaces.containers import Rollout


def completions_table(rollout: Rollout, rewards: Tensor, step: int, n: int) -> list[dict[str, Any]]:
    """The first ``n`` completions of the rollout with their prompt and total reward."""
    return [
        {"step": step, "prompt": rollout.rows[i // rollout.group_size]["prompt"], "completion": rollout.completions[i],
         "reward": rewards[i].item()}
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
