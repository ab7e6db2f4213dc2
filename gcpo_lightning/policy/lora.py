"""LoRA adapters (via ``peft``) on the policy, QLoRA on a 4-bit base, and the adapter-off reference.

With a LoRA policy the KL reference needs no second model: the base weights are frozen, so the policy with its
adapter disabled *is* the reference (:class:`DisabledAdapterReference`), bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from gcpo_lightning.policy.dataclass_args import as_dataclass
from gcpo_lightning.policy.quantization import dequantized_weight, is_quantized, set_cpu_packing

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BIASES = ("none", "all", "lora_only")


@dataclass
class LoRAConfig:
    """YAML-friendly LoRA settings (mapped onto ``peft.LoraConfig``).

    Args:
        r: the adapter rank.
        alpha: the scaling numerator; the update is ``alpha / r * B @ A``.
        dropout: dropout on the adapter's input.
        target_modules: leaf module names to adapt (e.g. ``q_proj``), or ``"all-linear"`` (every linear layer but
            the output head).
        bias: which biases train: ``none``, ``all`` or ``lora_only``.
        init_weights: peft's default init (``B = 0``: the adapted model starts equal to the base); ``False``
            draws ``B`` at random too (tests only).
        prepare_kbit: on a 4-bit base, run peft's ``prepare_model_for_kbit_training`` (fp32 norms/embeddings,
            input grads enabled for checkpointing).
        gradient_checkpointing: enable gradient checkpointing on a 4-bit base while preparing it.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    bias: str = "none"
    init_weights: bool = True
    prepare_kbit: bool = True
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` on a non-positive rank, a dropout outside [0, 1) or an unknown bias mode."""
        if self.r <= 0:
            raise ValueError(f"LoRAConfig: r must be > 0, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in BIASES:
            raise ValueError(f"LoRAConfig: bias must be one of {BIASES}, got {self.bias!r}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ValueError(
                f"LoRAConfig: target_modules must be a list of names or 'all-linear', got {self.target_modules!r}"
            )

    def to_peft(self) -> Any:
        """The equivalent ``peft.LoraConfig`` for a causal LM."""
        from peft import LoraConfig

        self.validate()
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        bias = cast(Literal["none", "all", "lora_only"], self.bias)  # one of BIASES: checked by validate()
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # peft annotates int; it uses alpha / r
            lora_dropout=self.dropout,
            target_modules=targets,
            bias=bias,
            init_lora_weights=self.init_weights,
            task_type="CAUSAL_LM",
        )


torch.serialization.add_safe_globals([LoRAConfig])  # saved in checkpoints' hyper-parameters; loads with weights_only


def as_lora_config(cfg: LoRAConfig | Mapping[str, Any] | None) -> LoRAConfig:
    """A :class:`LoRAConfig` from itself, a YAML mapping or ``None`` (the defaults).

    Args:
        cfg: the settings; mapping keys are :class:`LoRAConfig`'s fields.
    """
    return as_dataclass(LoRAConfig, cfg)


def require_peft() -> None:
    """Raise ``ImportError`` naming the pip package when peft is missing."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ImportError("LoRA needs peft: pip install 'peft>=0.17'")


def available_target_modules(model: nn.Module) -> list[str]:
    """Sorted leaf names of the layers LoRA can adapt (linear, embedding and GPT-2 ``Conv1D`` layers).

    Args:
        model: the base model.
    """
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, nn.Embedding, Conv1D)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kinds)})


def check_target_modules(model: nn.Module, target_modules: list[str] | str) -> None:
    """Raise ``ValueError`` naming the available layer names when a target matches no layer of ``model``.

    Args:
        model: the base model.
        target_modules: the requested leaf names, or ``"all-linear"``.
    """
    if isinstance(target_modules, str):
        return
    available = available_target_modules(model)
    missing = [t for t in target_modules if t not in available]
    if missing:
        raise ValueError(
            f"LoRA target_modules {missing} match no layer of {type(model).__name__}; "
            f"available layer names: {available} (or 'all-linear')"
        )


def apply_lora(model: nn.Module, cfg: LoRAConfig | Mapping[str, Any] | None = None) -> Any:
    """Wrap ``model`` in a ``peft.PeftModel`` with a fresh LoRA adapter; only the adapter trains.

    On a 4-bit base (QLoRA) bitsandbytes' CPU repacking is switched off (it breaks training, see
    ``gcpo_lightning.policy.quantization``) and, with ``prepare_kbit``, peft's ``prepare_model_for_kbit_training`` runs.

    Args:
        model: a Hugging Face causal LM, full precision or from
            :func:`~gcpo_lightning.policy.quantization.load_quantized`.
        cfg: the LoRA settings.
    """
    require_peft()
    from peft import get_peft_model, prepare_model_for_kbit_training

    cfg = as_lora_config(cfg)
    cfg.validate()
    if is_lora(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    check_target_modules(model, cfg.target_modules)
    if is_quantized(model):
        set_cpu_packing(model, False)
        if cfg.prepare_kbit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return get_peft_model(model, cfg.to_peft())


def is_lora(model: Any) -> bool:
    """True when ``model`` is a ``peft.PeftModel`` or holds LoRA layers."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(model, PeftModel) or any(isinstance(m, LoraLayer) for m in model.modules())


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad`` (the adapter's only, after :func:`apply_lora`)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


@contextmanager
def adapter_disabled(model: Any) -> Iterator[Any]:
    """Run ``model`` with its LoRA adapters off (the frozen base weights): ``with adapter_disabled(policy): ...``.

    Args:
        model: a ``peft.PeftModel``.

    Raises:
        TypeError: ``model`` is not a ``PeftModel`` (a silent no-op would make the reference equal the policy).
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError(f"adapter_disabled needs a peft.PeftModel, got {type(model).__name__}")
    with model.disable_adapter():
        yield model


class DisabledAdapterReference:
    """The reference policy as a view of a LoRA policy with its adapters off: no second copy of the weights.

    Callable like a model, with ``training``/``train``/``eval`` forwarded to the policy (so
    ``score_in_batches`` restores the policy's mode) and ``to``/``requires_grad_`` as no-ops (the policy is
    placed and frozen by its owner).

    Args:
        policy: the ``peft.PeftModel`` being trained.
    """

    def __init__(self, policy: Any) -> None:
        if not hasattr(policy, "disable_adapter"):
            raise TypeError(f"DisabledAdapterReference needs a peft.PeftModel, got {type(policy).__name__}")
        self.policy = policy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The policy's forward with its adapters disabled."""
        with adapter_disabled(self.policy):
            return self.policy(*args, **kwargs)

    @property
    def training(self) -> bool:
        """The policy's mode."""
        return self.policy.training

    def train(self, mode: bool = True) -> DisabledAdapterReference:
        """Set the policy's mode."""
        self.policy.train(mode)
        return self

    def eval(self) -> DisabledAdapterReference:
        """Put the policy in eval mode."""
        return self.train(False)

    def to(self, *args: Any, **kwargs: Any) -> DisabledAdapterReference:
        """No-op: the reference lives wherever the policy does."""
        return self

    def requires_grad_(self, requires_grad: bool = True) -> DisabledAdapterReference:
        """No-op: the base weights are already frozen by :func:`apply_lora`."""
        return self


def _lora_delta(module: Any, dtype: torch.dtype) -> Tensor:
    """Sum of the active adapters' ``scale * B @ A`` of one LoRA layer, ``[out, in]``."""
    if any(module.use_dora.get(a, False) for a in module.active_adapters):
        raise NotImplementedError("export_merged: DoRA adapters are not supported")
    deltas = [module.get_delta_weight(a).to(dtype) for a in module.active_adapters if a in module.lora_A]
    return torch.stack(deltas).sum(0)


def merged_state_dict(model: Any, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The base model's state dict with every LoRA update folded in and 4-bit weights dequantized, on CPU.

    Built layer by layer from the live model, which is left untouched (no deep copy, adapters not merged in
    place, so the adapter-off reference stays bit-exact). A 4-bit base is dequantized to ``dtype``: the export
    reproduces the function that was trained (the adapter was fit to the quantized weights).

    Args:
        model: a ``peft.PeftModel``.
        dtype: the floating dtype of the result (default: the input embedding's dtype).
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    dtype = dtype or base.get_input_embeddings().weight.dtype
    lora_names = [name for name, m in base.named_modules() if isinstance(m, LoraLayer)]
    inside = tuple(f"{name}." for name in lora_names)
    out: dict[str, Tensor] = {}

    def put(key: str, t: Tensor) -> None:
        out[key] = (t.detach().to(dtype) if t.is_floating_point() else t.detach()).cpu().clone()

    for name, module in base.named_modules():
        prefix = f"{name}." if name else ""
        if name.startswith(inside):
            continue  # lora_A/B and base_layer: folded into their LoRA layer's entry below
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            put(f"{prefix}weight", dequantized_weight(layer, torch.float32) + _lora_delta(module, torch.float32))
            if getattr(layer, "bias", None) is not None:
                put(f"{prefix}bias", cast(Tensor, layer.bias))  # a linear layer's bias (checked not None)
            continue
        if getattr(getattr(module, "weight", None), "quant_state", None) is not None:
            put(f"{prefix}weight", dequantized_weight(module, torch.float32))
            if getattr(module, "bias", None) is not None:
                put(f"{prefix}bias", module.bias)
            continue
        for pname, p in module.named_parameters(recurse=False):
            put(f"{prefix}{pname}", p)
        for bname, b in module.named_buffers(recurse=False):
            if b is not None and bname not in module._non_persistent_buffers_set:
                put(f"{prefix}{bname}", b)
    return out


def export_merged(model: Any, tokenizer: Any, path: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """Write a plain Hugging Face folder (merged weights, no peft, no quantization) that ``from_pretrained`` loads.

    The weights come from :func:`merged_state_dict` (one CPU copy of the weights; the live model is untouched).
    To keep the adapter alone instead, use ``model.save_pretrained(path)`` (peft's adapter format).

    Args:
        model: a ``peft.PeftModel`` (full-precision or 4-bit base).
        tokenizer: saved alongside (``None`` to skip).
        path: the output folder.
        dtype: the saved dtype (a ``torch.dtype`` or its name; default: the input embedding's dtype).
    """
    from transformers import AutoModelForCausalLM

    if not is_lora(model) or not hasattr(model, "get_base_model"):
        raise TypeError(f"export_merged needs a peft.PeftModel, got {type(model).__name__}")
    base = model.get_base_model()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or base.get_input_embeddings().weight.dtype
    state = merged_state_dict(model, dtype)
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    merged = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = merged.load_state_dict(state, strict=False)
    tied = config.get_text_config().tie_word_embeddings
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"export_merged: state dict mismatch, missing {missing}, unexpected {unexpected}")
    merged.tie_weights()
    path = Path(path)
    merged.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
