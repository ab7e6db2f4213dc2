"""A data loader that resumes mid-epoch: its sampler's position is saved in the checkpoint."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffled (or ordered) indices for this rank, in an order fixed by ``(seed, epoch)``, that can resume.

    A ``DistributedSampler`` (so Lightning does not replace it): with one process it is a seeded shuffle. Lightning
    calls ``set_epoch`` at every epoch. ``consumed`` counts the indices handed out in the current epoch.
    """

    def __init__(self, dataset: Sequence[Any], shuffle: bool = True, seed: int = 0, drop_last: bool = True) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,  # type: ignore[arg-type]  # torch's stub wants a Dataset; any Sequence works
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
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
            raise ValueError(
                f"ResumableSampler: checkpoint was saved with {state['num_replicas']} data-parallel "
                f"ranks and seed {state['seed']}, this run has {self.num_replicas} and {self.seed}; "
                f"the data position cannot be restored"
            )
        self.epoch, self._skip = state["epoch"], state["consumed"]


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position is saved in Lightning checkpoints.

    Batches are drawn in the main process (``num_workers=0``): prompt rows are tiny, and a worker's prefetch would
    make the saved position run ahead of the batches actually trained on.
    """

    def __init__(
        self, dataset: Sequence[Any], batch_size: int, shuffle: bool, seed: int, collate_fn: Any, drop_last: bool = True
    ) -> None:
        super().__init__(
            dataset,  # type: ignore[arg-type]  # torch's stub wants a Dataset; any Sequence works
            batch_size=batch_size,
            collate_fn=collate_fn,
            drop_last=drop_last,
            sampler=ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False),
        )

    def state_dict(self) -> dict[str, int]:
        """The sampler's position (consumed indices are always whole batches: no worker prefetches)."""
        return cast(ResumableSampler, self.sampler).state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position."""
        cast(ResumableSampler, self.sampler).load_state_dict(state)
