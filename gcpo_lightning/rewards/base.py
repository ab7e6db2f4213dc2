"""Reward functions and the code that calls them safely.

A reward function is any callable ``fn(prompts, completions, **columns) -> list[float | None]`` (see
:data:`gcpo_lightning.interfaces.protocols.RewardFn`); in YAML name a function by its import path, or a callable
class by ``class_path``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gcpo_lightning.interfaces.containers import Rollout
from gcpo_lightning.interfaces.protocols import RewardFn


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names the function."""


def reward_name(fn: RewardFn) -> str:
    """A readable name: the function's ``__name__`` or the callable's class name."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def call_reward(fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> list[float]:
    """Call one reward function and check what it returns: one finite number (or ``None`` -> 0.0) per completion."""
    name = reward_name(fn)
    try:
        values = fn(prompts=prompts, completions=completions, **columns)
    except Exception as err:  # noqa: BLE001 - re-raised with the function's name
        raise RewardError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err
    if not isinstance(values, Sequence | Tensor) or len(values) != len(completions):
        got = len(values) if hasattr(values, "__len__") else type(values).__name__
        raise RewardError(f"reward function {name!r} returned {got} values for {len(completions)} completions")
    return [_check_value(name, k, v) for k, v in enumerate(values)]


def _check_value(name: str, index: int, value: Any) -> float:
    if value is None:
        return 0.0
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise RewardError(f"reward function {name!r} returned {value!r} for completion {index}, not a number") from err
    if not math.isfinite(number):
        raise RewardError(f"reward function {name!r} returned {number} for completion {index}")
    return number


def compute_rewards(
    funcs: Sequence[RewardFn],
    weights: Sequence[float],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list[Any]],
) -> tuple[Tensor, Tensor]:
    """Weighted sum of every reward function.

    Returns:
        ``(total, per_function)``: ``[N]`` and ``[N, F]`` in fp32 on the CPU.
    """
    per_func = torch.tensor(
        [call_reward(fn, prompts, completions, columns) for fn in funcs], dtype=torch.float32
    ).T  # [N, F]
    total = per_func @ torch.tensor(list(weights), dtype=torch.float32)  # [N]
    return total, per_func


def rollout_rewards(funcs: Sequence[RewardFn], weights: Sequence[float], rollout: Rollout) -> tuple[Tensor, Tensor]:
    """``[N]`` total and ``[N, F]`` per-function rewards of a rollout: each function sees every completion with its
    prompt and its data row's other columns (repeated ``G`` times, as in TRL)."""
    columns = {k: v for k, v in rollout.row_columns().items() if k != "prompt"}
    prompts = [r["prompt"] for r in rollout.rows for _ in range(rollout.group_size)]
    return compute_rewards(list(funcs), list(weights), prompts, rollout.completions, columns)
