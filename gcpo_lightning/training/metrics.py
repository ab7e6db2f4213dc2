"""What a training step reports: phase timings, reward spread, completion lengths, each reward function."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchmetrics import MeanMetric

from gcpo_lightning.functional.advantages import frac_zero_std
from gcpo_lightning.interfaces.containers import Rollout
from gcpo_lightning.rewards.base import reward_name


def unique_names(names: list[str]) -> list[str]:
    """``names`` with ``_<index>`` appended to every name that occurs more than once."""
    return [f"{n}_{k}" if names.count(n) > 1 else n for k, n in enumerate(names)]


def rollout_metrics(rollout: Rollout, rewards: Tensor, per_func: Tensor, reward_names: list[str]) -> dict[str, float]:
    """Reward spread and per-function means over the whole step, and this rank's completion lengths.

    Args:
        rollout: this rank's rollout (lengths and truncation are reported for it).
        rewards: ``[W*N]`` total rewards of every rank, group-major.
        per_func: ``[W*N, F]`` each reward function's values.
        reward_names: the ``F`` functions' names.
    """
    lengths = rollout.completion_mask.sum(1).float()  # [N]
    metrics = {
        "reward_std": rewards.std().item(),
        "frac_reward_zero_std": frac_zero_std(rewards, rollout.group_size),
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": rollout.truncated.float().mean().item() if rollout.truncated is not None else 0.0,
    }
    for k, name in enumerate(unique_names(reward_names)):
        metrics[f"rewards/{name}/mean"] = per_func[:, k].mean().item()
        metrics[f"rewards/{name}/std"] = per_func[:, k].std().item()
    return metrics


def reward_fn_metrics(funcs: list[Any], reward_names: list[str]) -> dict[str, float]:
    """What reward functions report about their last call through an optional ``metrics() -> dict`` method
    (e.g. ``CodeExecution``: the share of each sandbox outcome), as ``rewards/<name>/<key>``. This rank's only."""
    out = {}
    for fn, name in zip(funcs, unique_names(reward_names)):
        report = getattr(fn, "metrics", None)
        if callable(report):
            out.update({f"rewards/{name}/{key}": float(value) for key, value in report().items()})
    return out


WALL_CLOCK_PREFIXES = ("timing/", "tokens_per_s/")
"""Metrics measured in wall-clock time: they differ between otherwise identical runs (e.g. a resumed one)."""


class StepLogger(nn.Module):
    """Logs a training step: ``reward`` and ``accuracy`` on the progress bar, and every other metric per step.

    A child ``nn.Module`` of the system, so its running means follow the module's device.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reward, self.accuracy = MeanMetric(), MeanMetric()

    def log(self, module: Any, rollout: Rollout, rewards: Tensor, per_func: Tensor, metrics: dict[str, float]) -> None:
        """Log the step on ``module`` (a GCPOModule; rewards of all ranks: ``[W*N]`` and ``[W*N, F]``)."""
        funcs = module.reward_funcs
        self.reward(rewards)
        self.accuracy(per_func[:, module.accuracy_reward])
        module.log("reward", self.reward, prog_bar=True, on_step=True, on_epoch=False)
        module.log("accuracy", self.accuracy, prog_bar=True, on_step=True, on_epoch=False)
        names = [reward_name(fn) for fn in funcs]
        metrics.update(rollout_metrics(rollout, rewards, per_func, names))
        tokens = float(rollout.completion_mask.sum()) * module.num_iterations  # completion tokens the update scored
        if metrics.get("timing/update"):
            metrics["tokens_per_s/update"] = tokens / metrics["timing/update"]
        metrics.update(reward_fn_metrics(funcs, names))
        module.log_dict(metrics, on_step=True, on_epoch=False)
