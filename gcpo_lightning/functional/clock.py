"""The wall clock that the ``timing/*`` metrics read: CUDA work queued before a reading is charged to its phase."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def wall_time() -> float:
    """``time.perf_counter()`` after the queued CUDA work has finished (when CUDA is in use).

    CUDA kernels run asynchronously: without the synchronisation a phase that only queues kernels (a backward pass,
    a reference forward) would look free and the next phase that waits on a result would be charged for it. Phases
    are long (a generation, a pass over the batch), so one synchronisation per reading costs nothing measurable.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@contextmanager
def timed(metrics: dict[str, float], name: str) -> Iterator[None]:
    """Add the :func:`wall_time` of the block to ``metrics[f"timing/{name}"]``."""
    start = wall_time()
    yield
    metrics[f"timing/{name}"] = metrics.get(f"timing/{name}", 0.0) + wall_time() - start
