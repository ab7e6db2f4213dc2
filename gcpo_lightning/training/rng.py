"""Exact resumption: a data loader that remembers its position, and the random number generators' states.

Lightning's checkpoint holds the model, optimiser, scheduler and loop progress. For a resumed run to reproduce
the uninterrupted one exactly, two more things are saved:

* the data position: :class:`ResumableLoader` is a ``DataLoader`` with ``state_dict``/``load_state_dict``
  (Lightning stores the state of such loaders in the checkpoint and hands it back before iterating). Each epoch's
  order is a function of ``(seed, epoch)`` only, and a restored loader skips the samples already consumed;
* the global random generators (torch, CUDA, Python, NumPy) of every rank: :func:`rng_state` and
  :func:`set_rng_state`, saved by the module's ``on_save_checkpoint`` and restored at ``on_train_start``.
"""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist


def numpy_state() -> tuple[str, torch.Tensor, int, int, float]:
    """NumPy's global state with its key array as a tensor (checkpoints load with ``weights_only=True``)."""
    # the global generator is an MT19937, whose legacy state is this tuple (numpy's stub also allows a dict)
    state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    name, keys, pos, has_gauss, gauss = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def rng_state() -> dict[str, Any]:
    """This process's global random states: torch (CPU and CUDA), Python and NumPy."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": numpy_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def all_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (collective under ``torch.distributed``)."""
    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rank_rng(states: list[dict[str, Any]]) -> None:
    """Set this rank's generators from a list saved by :func:`all_rng_states`."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if len(states) != (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1):
        raise ValueError(
            f"checkpoint holds random states for {len(states)} ranks; this run has a different world "
            f"size, so the random streams cannot be restored exactly"
        )
    set_rng_state(states[rank])
