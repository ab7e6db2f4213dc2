"""Components as configs, so that a checkpoint rebuilds the system that was trained.

A component's config is ``{"class_path": ..., "init_args": {...}}``, the form LightningCLI reads. Its init args are
read back from the object with the convention scikit-learn's ``get_params`` uses: every ``__init__`` argument is
stored as an attribute of the same name (all built-in components do this). Functions become their import path.
The module saves these configs in its hyperparameters and names Lightning's own instantiator, so that
``GCPOModule.load_from_checkpoint`` re-creates every component through jsonargparse, with its init args.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
"""Lightning's trusted instantiator: rebuilds a module from hyperparameters holding ``class_path`` configs."""

_PLAIN = (str, int, float, bool, type(None))


class NotConfigurable(ValueError):
    """A component whose init args cannot be read back from its attributes."""


def class_path(cls: type) -> str:
    """``module.QualName`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def to_config(value: Any, where: str) -> Any:
    """``value`` as YAML-able data: plain values, lists, dicts, import paths and ``class_path`` configs."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [to_config(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): to_config(v, f"{where}.{k}") for k, v in value.items()}
    if inspect.isfunction(value) or inspect.isbuiltin(value):
        if "<" in value.__qualname__:
            raise NotConfigurable(f"{where}: {value!r} is a local function or lambda; use a module-level function")
        return f"{value.__module__}.{value.__qualname__}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_config(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
    return component_config(value, where)


def component_config(obj: Any, where: str = "component") -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a component object (a jsonargparse lazy instance included)."""
    lazy_type = getattr(obj, "_lazy_class_type", None)
    if lazy_type is not None:  # jsonargparse.lazy_instance: not initialised yet, its kwargs are known
        init_args = dict(getattr(obj, "_lazy_kwargs", {}))
        return {"class_path": class_path(lazy_type), "init_args": to_config(init_args, where)}
    cls = type(obj)
    init_args = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not hasattr(obj, name):
            raise NotConfigurable(
                f"{where}: {cls.__name__} has no attribute {name!r} for its __init__ argument of that name; store "
                f"every __init__ argument as an attribute of the same name so checkpoints can rebuild it"
            )
        init_args[name] = to_config(getattr(obj, name), f"{where}.{name}")
    return {"class_path": class_path(cls), "init_args": init_args}


def read_hparams(checkpoint_path: Any) -> dict[str, Any]:
    """The hyperparameters saved in a Lightning checkpoint file (``{}`` for a distributed-checkpoint folder)."""
    import torch

    if isinstance(checkpoint_path, (str, Path)) and Path(checkpoint_path).is_dir():
        return {}
    is_path = isinstance(checkpoint_path, (str, Path))  # a file is mapped, not read: only the hparams are needed
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=is_path)
    return dict(checkpoint.get("hyper_parameters", {}))


class RebuildsComponents:
    """Mixin for a LightningModule (listed before it) whose init arguments include components.

    ``save_component_configs`` (called in ``__init__`` after ``save_hyperparameters``) stores each component's
    config; ``load_from_checkpoint`` then rebuilds the same components.
    """

    hparams: Any

    def save_component_configs(self, components: Sequence[str]) -> None:
        """Store every component as its ``class_path`` config in the hyperparameters, with Lightning's
        instantiator, so that ``load_from_checkpoint`` rebuilds the same system (not the defaults). A component
        that cannot be described (a lambda, an object without its init args as attributes) is listed under
        ``_not_rebuildable`` instead, and :meth:`load_from_checkpoint` asks for it by name."""
        not_rebuildable = {}
        for name in components:
            try:
                self.hparams[name] = to_config(getattr(self, name), name)
            except NotConfigurable as err:
                self.hparams.pop(name, None)
                not_rebuildable[name] = str(err)
        self.hparams["_not_rebuildable"] = not_rebuildable
        self.hparams["_instantiator"] = INSTANTIATOR
        self.hparams.pop("_class_path", None)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """The trained module, with the components it was trained with (their classes and init args).

        Components the checkpoint could not describe must be given by keyword (e.g. ``reward_funcs=[my_fn]``).
        """
        hparams = read_hparams(checkpoint_path)
        missing = {k: v for k, v in hparams.get("_not_rebuildable", {}).items() if k not in kwargs}
        if missing:
            raise ValueError(
                f"{cls.__name__}.load_from_checkpoint({checkpoint_path}): the checkpoint cannot rebuild "
                + "; ".join(f"{k} ({v})" for k, v in missing.items())
                + f"; pass {', '.join(f'{k}=...' for k in missing)} to load_from_checkpoint"
            )
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]
