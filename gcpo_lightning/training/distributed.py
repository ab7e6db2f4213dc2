"""FSDP2 sharding of the policy, full parameters for the rollout, and cross-rank helpers.

Lightning's ``ModelParallelStrategy`` builds a device mesh and calls ``configure_model``; the module shards the
policy there with :func:`shard_policy` (``torch.distributed.fsdp.fully_shard`` on every decoder layer, then on the
root). The same code runs on CUDA (NCCL) and on CPU (gloo, two processes in the tests).

Generation is a long sequence of small forward passes whose number differs between ranks (each rank stops when
its own completions end). Under FSDP every forward would all-gather every layer, and an unequal number of
collectives would hang. :func:`full_parameters` therefore all-gathers the parameters once, keeps them for the
whole no-grad rollout phase (sampling, the causal graph, reference and causal log-probs), and reshards them
before the update. The rollout phase then holds one full copy of the policy per rank, as in verl's
"hybrid engine"; the optimiser state, gradients and the update's activations stay sharded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Number of processes in the default group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_across_ranks(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks in rank order.  ``[N, ...] -> [W*N, ...]``."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def max_across_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` of all ranks (``value`` itself on one process)."""
    if world_size() == 1:
        return value
    x = torch.tensor([value], device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


def check_strategy(strategy: Any) -> None:
    """Refuse strategies the module cannot run correctly, before any model is loaded.

    Several processes need ``ModelParallelStrategy`` (FSDP2) with pure data parallelism: DDP would see one forward
    followed by several backward passes (micro-batches) and FSDP1 would all-gather at every generated token, with a
    different number of tokens per rank (a hang).
    """
    from lightning.pytorch.strategies import ModelParallelStrategy, ParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        tp = strategy._tensor_parallel_size  # noqa: SLF001 - only readable here before the mesh exists
        if tp not in (1, "auto") or (tp == "auto" and strategy.num_processes > 1):
            raise ValueError(
                f"GCPOModule: ModelParallelStrategy needs tensor_parallel_size=1 and "
                f"data_parallel_size=<number of processes> (FSDP only), got tensor_parallel_size={tp}"
            )
    elif isinstance(strategy, ParallelStrategy):
        # Lightning's parallel strategies (DDP, FSDP, ...) define num_processes; the ParallelStrategy base does not
        processes = strategy.num_processes  # type: ignore[attr-defined]
        if processes * getattr(strategy, "num_nodes", 1) > 1:
            raise ValueError(
                f"GCPOModule: {type(strategy).__name__} is not supported; use "
                f"lightning.pytorch.strategies.ModelParallelStrategy (FSDP2) with "
                f"data_parallel_size=<number of processes> and tensor_parallel_size=1 (configs/fsdp.yaml)"
            )


def rank_share(local: Tensor) -> float:
    """``W * local / sum_ranks(local)``: turns a per-rank mean into this rank's part of the global mean.

    Data-parallel training averages gradients over the ``W`` ranks. A loss that is a mean over a rank's own tokens
    (DAPO's token mean) then weighs every rank equally, whatever its token count; scaling it by this factor makes
    the averaged gradient the mean over every token of the step.  1.0 on one process.
    """
    if world_size() == 1:
        return 1.0
    total = local.detach().float().clone()
    dist.all_reduce(total)
    return (local.detach().float() * world_size() / total.clamp(min=1)).item()
