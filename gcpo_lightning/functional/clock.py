"""The wall clock that the ``timing/*`` metrics read: CUDA work queued before a reading is charged to its phase."""

from __future__ import annotations

import time

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
