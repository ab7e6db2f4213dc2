"""Settings dataclasses given as themselves, as a YAML mapping, or left out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def as_dataclass(cls: type[T], value: T | Mapping[str, Any] | None) -> T:
    """``value`` as a ``cls``: itself, built from a mapping of its fields, or the defaults for ``None``.

    A mapping key that is not a field is an error naming the known fields.
    """
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    mapping = cast(Mapping[str, Any], value)  # neither a ``cls`` nor ``None``: a mapping of its fields
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(known)}")
    return cls(**mapping)
