"""FSDP2 sharding of the policy (``fully_shard``) and gathering its full parameters and state."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


_GATHERED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
"""The sharded models inside :func:`full_parameters`, with :func:`parameter_version` at its entry."""


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
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
        raise ValueError(
            f"shard_policy: cannot find the decoder layers of {type(model).__name__}: it declares no "
            f"_no_split_modules ({sorted(names)}); shard it yourself in configure_model"
        )
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
    (:func:`gcpo_lightning.components.scoring.logprobs.chunked_head_logps`) can use the LM head after the forward.
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
    _GATHERED[model] = state_version(model)  # read from the shards, before they are gathered
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        _GATHERED.pop(model, None)
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # the root keeps its params until backward


def is_gathered(model: nn.Module) -> bool:
    """Whether ``model`` is sharded and inside :func:`full_parameters` (its parameters are full tensors)."""
    return model in _GATHERED


def state_version(model: nn.Module) -> int:
    """The sum of the version counters of ``model``'s state-dict tensors (detached views share them). Under FSDP2
    these are the sharded parameters, the ones the optimiser updates; do not call it inside :func:`full_parameters`
    (the state-dict hook puts the shards back in the module)."""
    return sum(t._version for t in model.state_dict().values())


def parameter_version(model: nn.Module) -> int:
    """A number that changes whenever a parameter of ``model`` is modified in place (an optimiser step,
    ``load_state_dict``): the sum of their version counters. Under FSDP2 it is read from the sharded parameters
    (inside :func:`full_parameters`, where no update happens and the gathered copies count nothing, its value at the
    block's entry)."""
    if model in _GATHERED:
        return _GATHERED[model]
    if is_sharded(model):
        return state_version(model)
    return sum(p._version for p in model.parameters())


def gathered_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of every parameter (tied ones under each name) and persistent buffer, as a state dict
    names them, read from the live modules: no state-dict hook runs, so inside :func:`full_parameters` the module
    stays gathered and these are full tensors. A sharded model outside that block is an error."""
    if is_sharded(model) and not is_gathered(model):
        raise RuntimeError("gathered_weights: the model is FSDP2-sharded; call it inside full_parameters(model)")
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for pname, p in module.named_parameters(recurse=False):
            yield f"{prefix}{pname}", p.detach()
        for bname, b in module.named_buffers(recurse=False):
            if b is not None and bname not in module._non_persistent_buffers_set:
                yield f"{prefix}{bname}", b.detach()


def full_tensor(x: Tensor) -> Tensor:
    """A ``DTensor`` (e.g. a grad norm of sharded parameters) as a plain tensor; other tensors unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's full (unsharded) state dict on the CPU; collective when sharded, every rank must call it."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return cast(dict[str, Tensor], state)  # a module's state dict: tensors (the stub's value type is wider)
