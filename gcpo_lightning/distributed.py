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

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """Every FSDP2-sharded submodule of ``model`` (empty when it is not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` has been passed through ``fully_shard``."""
    return bool(fsdp_modules(model))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (the modules its ``_no_split_modules`` names)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"shard_policy: cannot find the decoder layers of {type(model).__name__}: it declares no "
                         f"_no_split_modules ({sorted(names)}); shard it yourself in configure_model")
    return layers


def shard_policy(
    model: nn.Module,
    mesh: Any,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """``fully_shard`` each decoder layer and then the root over the ``data_parallel`` dimension of ``mesh``.

    Args:
        model: the policy (a Hugging Face causal LM), on its device.
        mesh: the ``DeviceMesh`` Lightning's ``ModelParallelStrategy`` hands to ``configure_model``.
        param_dtype: dtype of the all-gathered parameters in forward/backward (e.g. ``torch.bfloat16``); ``None``
            keeps the stored dtype. Parameters and optimiser state stay in their stored dtype.
        reduce_dtype: dtype of the gradient reduce-scatter (``None``: ``param_dtype``).

    Each layer frees its gathered parameters after its forward (ZeRO-3); the root (embeddings, final norm, LM
    head) keeps them from forward to backward, as FSDP2 does by default, so the chunked log-prob head
    (:func:`gcpo_lightning.scoring.chunked_head_logps`) can use the LM head after the forward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    return model


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """All-gather every shard once and keep the full parameters until the block ends (no-op when not sharded).

    Inside the block forward passes run no collectives, so ranks may run different numbers of them (generation).
    """
    modules = fsdp_modules(model)
    if not modules:
        yield
        return
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # the root keeps its params until backward


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


def full_tensor(x: Tensor) -> Tensor:
    """A ``DTensor`` (e.g. a grad norm of sharded parameters) as a plain tensor; other tensors unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's full (unsharded) state dict on the CPU; collective when sharded, every rank must call it."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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
            raise ValueError(f"GCPOModule: ModelParallelStrategy needs tensor_parallel_size=1 and "
                             f"data_parallel_size=<number of processes> (FSDP only), got tensor_parallel_size={tp}")
    elif isinstance(strategy, ParallelStrategy) and strategy.num_processes * getattr(strategy, "num_nodes", 1) > 1:
        raise ValueError(f"GCPOModule: {type(strategy).__name__} is not supported; use "
                         f"lightning.pytorch.strategies.ModelParallelStrategy (FSDP2) with "
                         f"data_parallel_size=<number of processes> and tensor_parallel_size=1 (configs/fsdp.yaml)")


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
