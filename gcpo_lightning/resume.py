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
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffled (or ordered) indices for this rank, in an order fixed by ``(seed, epoch)``, that can resume.

    A ``DistributedSampler`` (so Lightning does not replace it): with one process it is a seeded shuffle. Lightning
    calls ``set_epoch`` at every epoch. ``consumed`` counts the indices handed out in the current epoch.
    """

    def __init__(self, dataset: Sequence[Any], shuffle: bool = True, seed: int = 0, drop_last: bool = True) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(dataset, num_replicas=dist.get_world_size() if distributed else 1,
                         rank=dist.get_rank() if distributed else 0, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.consumed = 0
        self._skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self._skip = self._skip, 0
        self.consumed = start
        for index in indices[start:]:
            self.consumed += 1
            yield index

    def set_epoch(self, epoch: int) -> None:
        """Start a new epoch's order (a restored position is kept when the epoch is the one it was saved in)."""
        if epoch != self.epoch:
            self._skip = 0
        super().set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """The epoch and the number of indices already handed out in it."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``; the world size and seed must match the run that saved it."""
        if state["num_replicas"] != self.num_replicas or state["seed"] != self.seed:
            raise ValueError(f"ResumableSampler: checkpoint was saved with {state['num_replicas']} data-parallel "
                             f"ranks and seed {state['seed']}, this run has {self.num_replicas} and {self.seed}; "
                             f"the data position cannot be restored")
        self.epoch, self._skip = state["epoch"], state["consumed"]


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position is saved in Lightning checkpoints.

    Batches are drawn in the main process (``num_workers=0``): prompt rows are tiny, and a worker's prefetch would
    make the saved position run ahead of the batches actually trained on.
    """

    def __init__(self, dataset: Sequence[Any], batch_size: int, shuffle: bool, seed: int, collate_fn: Any,
                 drop_last: bool = True) -> None:
        super().__init__(dataset, batch_size=batch_size, collate_fn=collate_fn, drop_last=drop_last,
                         sampler=ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False))

    def state_dict(self) -> dict[str, int]:
        """The sampler's position (consumed indices are always whole batches: no worker prefetches)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position."""
        self.sampler.load_state_dict(state)


def numpy_state() -> tuple[str, torch.Tensor, int, int, float]:
    """NumPy's global state with its key array as a tensor (checkpoints load with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
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
        raise ValueError(f"checkpoint holds random states for {len(states)} ranks; this run has a different world "
                         f"size, so the random streams cannot be restored exactly")
    set_rng_state(states[rank])
