"""4-bit (bitsandbytes NF4/FP4) loading of the policy or the frozen reference, and memory accounting.

Quantization happens at load time inside ``from_pretrained`` (transformers' bitsandbytes quantizer), outside
Lightning's precision plugin: keep the trainer's precision to ``32-true`` or ``*-mixed`` (a ``*-true`` plugin
casts the module's dtype, which a bitsandbytes model refuses).

CPU note (bitsandbytes 0.50): on CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight in place at the first
eval-mode forward without grad (bf16 absmax, a different kernel). The repacking is lossy and irreversible, gives
log-probs that differ from a train-mode forward of the same layer, has no autograd (a LoRA trained after it
silently stops learning) and needs ``in_features % 64 == 0``. :func:`load_quantized` therefore switches it off
unless ``cpu_inference_packing=True`` (worth it only for a frozen reference with compatible shapes).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from gcpo_lightning.policy.dataclass_args import as_dataclass
from gcpo_lightning.policy.loading import load_causal_lm

if TYPE_CHECKING:
    from bitsandbytes.nn import Linear4bit, Params4bit

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
RESERVED_MODEL_KWARGS = ("quantization_config", "load_in_4bit", "load_in_8bit")


@dataclass
class QuantizationConfig:
    """YAML-friendly bitsandbytes 4-bit settings (mapped onto ``transformers.BitsAndBytesConfig``).

    Args:
        load_in_4bit: quantize the linear layers to 4 bits; ``False`` loads the model unquantized.
        quant_type: the 4-bit data type, ``nf4`` (normal float, QLoRA's choice) or ``fp4``.
        compute_dtype: the dtype the 4-bit weights are dequantized to for each matmul
            (``float32``, ``bfloat16`` or ``float16``).
        double_quant: also quantize the per-block scales (QLoRA's nested quantization, ~0.4 bit/param saved).
        skip_modules: module names kept in full precision (``lm_head`` by default; ``None`` lets transformers
            choose, which also keeps the output layer and tied weights).
        cpu_inference_packing: let bitsandbytes repack the weights for its AVX512-BF16 CPU inference kernel at
            the first no-grad eval forward (see the module docstring: never for a model that is trained).
    """

    load_in_4bit: bool = True
    quant_type: str = "nf4"
    compute_dtype: str = "float32"
    double_quant: bool = True
    skip_modules: list[str] | None = field(default_factory=lambda: ["lm_head"])
    cpu_inference_packing: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` on an unknown quant type or compute dtype."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"QuantizationConfig: quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"QuantizationConfig: compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}"
            )
        if isinstance(self.skip_modules, str):
            raise ValueError(f"QuantizationConfig: skip_modules must be a list of names, got {self.skip_modules!r}")

    def to_bnb(self) -> Any:
        """The equivalent ``transformers.BitsAndBytesConfig``."""
        from transformers import BitsAndBytesConfig

        self.validate()
        return BitsAndBytesConfig(
            load_in_4bit=self.load_in_4bit,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            bnb_4bit_use_double_quant=self.double_quant,
            llm_int8_skip_modules=None if self.skip_modules is None else list(self.skip_modules),
        )


# saved in checkpoints' hyper-parameters: allow-listed so that they load with weights_only
torch.serialization.add_safe_globals([QuantizationConfig])


def as_quantization_config(quant: QuantizationConfig | Mapping[str, Any] | None) -> QuantizationConfig:
    """A :class:`QuantizationConfig` from itself, a YAML mapping, or ``None`` (the defaults: NF4).

    Args:
        quant: the settings; mapping keys are :class:`QuantizationConfig`'s fields.
    """
    return as_dataclass(QuantizationConfig, quant)


def require_bitsandbytes() -> None:
    """Raise ``ImportError`` naming the pip package when bitsandbytes or accelerate is missing."""
    for module, pip_name in (("bitsandbytes", "bitsandbytes>=0.50"), ("accelerate", "accelerate>=1.10")):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"4-bit loading needs {module}: pip install '{pip_name}'")


def validate_quantized_load(quant: QuantizationConfig, model_kwargs: Mapping[str, Any] | None = None) -> None:
    """Check everything that can be checked before loading (dependencies, settings, clashing model kwargs).

    Args:
        quant: the 4-bit settings.
        model_kwargs: the ``from_pretrained`` keyword arguments that will be passed alongside.
    """
    quant.validate()
    if not quant.load_in_4bit:
        return
    require_bitsandbytes()
    clashing = [k for k in RESERVED_MODEL_KWARGS if k in (model_kwargs or {})]
    if clashing:
        raise ValueError(f"load_quantized: model_kwargs must not set {clashing}; use QuantizationConfig instead")
    device_map = (model_kwargs or {}).get("device_map")
    values = set(device_map.values()) if isinstance(device_map, Mapping) else {device_map}
    if "disk" in values:
        raise ValueError("load_quantized: 4-bit weights cannot be offloaded to disk (device_map has 'disk')")


def load_quantized(
    name_or_path: str,
    model_kwargs: Mapping[str, Any] | None = None,
    quant: QuantizationConfig | Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """A causal LM whose linear layers are bitsandbytes ``Linear4bit`` (via :func:`load_causal_lm`).

    Args:
        name_or_path: a shipped model name, a local folder or a Hub id (see ``resolve_model_path``).
        model_kwargs: extra ``from_pretrained`` arguments (``dtype`` sets the non-quantized parameters' dtype).
        quant: the 4-bit settings (defaults: NF4, fp32 compute, double quantization, ``lm_head`` kept).
        device: where to load (``device_map={"": device}``); ``None`` lets transformers choose (the current
            CUDA device, else CPU). A ``device_map`` in ``model_kwargs`` wins.
    """
    quant = as_quantization_config(quant)
    validate_quantized_load(quant, model_kwargs)
    kwargs = dict(model_kwargs or {})
    if not quant.load_in_4bit:
        return load_causal_lm(name_or_path, kwargs)
    kwargs["quantization_config"] = quant.to_bnb()
    if device is not None:
        kwargs.setdefault("device_map", {"": str(device)})
    model = load_causal_lm(name_or_path, kwargs)
    if count_4bit_linears(model) == 0:
        warnings.warn(f"load_quantized: no linear layer of {name_or_path} was quantized", stacklevel=2)
    set_cpu_packing(model, quant.cpu_inference_packing)
    return model


def linear4bit_modules(model: nn.Module) -> Iterator[tuple[str, Linear4bit]]:
    """``(name, module)`` of every bitsandbytes ``Linear4bit`` in ``model`` (none when bnb is not installed)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            yield name, module


def count_4bit_linears(model: nn.Module) -> int:
    """How many linear layers of ``model`` are bitsandbytes ``Linear4bit``."""
    return sum(1 for _ in linear4bit_modules(model))


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` has at least one 4-bit linear layer."""
    return count_4bit_linears(model) > 0


def set_cpu_packing(model: nn.Module, enabled: bool) -> int:
    """Allow or forbid bitsandbytes' CPU inference repacking on every ``Linear4bit``; returns the layer count.

    Forbidding it on a layer that was already repacked converts it back (lossy: its scales went through bf16),
    with a warning.

    Args:
        model: a model with 4-bit layers.
        enabled: ``True`` restores bitsandbytes' default (repack when the CPU has AVX512-BF16).
    """
    from bitsandbytes.functional import has_avx512bf16

    n = repacked = 0
    for _, module in linear4bit_modules(model):
        n += 1
        module.support_avx512bf16_for_cpu = enabled and has_avx512bf16()
        weight = cast("Params4bit", module.weight)  # a Linear4bit's weight (the stub keeps nn.Linear's Parameter)
        state = weight.quant_state
        if not enabled and state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            repacked += 1
    if repacked:
        warnings.warn(
            f"set_cpu_packing: {repacked} layers had been repacked for CPU inference; converted back "
            "(their scales were rounded to bf16 by the repacking)",
            stacklevel=2,
        )
    return n


def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """The dense ``[out, in]`` weight of a linear layer: dequantized for a ``Linear4bit``, a detached view else.

    Args:
        module: an ``nn.Linear`` or a bitsandbytes ``Linear4bit``.
        dtype: the result's dtype (default: the layer's compute dtype, or the weight's own dtype).
    """
    weight = cast(Tensor, module.weight)  # a Parameter, or a bitsandbytes Params4bit
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.detach() if dtype is None else weight.detach().to(dtype)
    if getattr(state, "packing_format_for_cpu", False):
        set_cpu_packing(module, False)
        weight = cast("Params4bit", module.weight)  # repacking replaced the weight's data and state
        state = weight.quant_state
    from bitsandbytes.functional import dequantize_4bit

    dense = dequantize_4bit(weight.data, state)
    return dense.to(dtype or getattr(module, "compute_dtype", None) or dense.dtype)


def _quant_state_tensors(state: Any) -> Iterator[Tensor]:
    """Every tensor a bitsandbytes ``QuantState`` holds (scales, code book, nested state)."""
    if state is None:
        return
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, Tensor):
            yield value
    yield from _quant_state_tensors(getattr(state, "state2", None))


def model_memory_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters, buffers and 4-bit quantization states, each storage counted once.

    A ``Params4bit`` is counted at its packed size (two weights per byte) plus its scales; tied weights once.

    Args:
        model: any ``nn.Module``.
    """
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: Tensor) -> None:
        nonlocal total
        if t.device.type == "meta":
            return
        key = (t.data_ptr(), t.numel() * t.element_size())
        if key not in seen:
            seen.add(key)
            total += key[1]

    for p in model.parameters():
        add(p)
        for t in _quant_state_tensors(getattr(p, "quant_state", None)):
            add(t)
    for b in model.buffers():
        add(b)
    return total


def describe_quantization(model: nn.Module) -> dict[str, Any]:
    """A small summary for logging: 4-bit layer count and memory in MiB.

    Args:
        model: the loaded model.
    """
    return {"linear4bit": count_4bit_linears(model), "memory_mib": model_memory_bytes(model) / 2**20}
