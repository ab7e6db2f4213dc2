"""How the models of a run are built: the policy (full, LoRA or QLoRA), its tokenizer and the frozen reference.

:class:`PolicyBuilder` is the component :class:`~gcpo_lightning.module.GCPOModule` injects for model construction;
subclass it (and name the subclass by ``class_path`` in YAML) to build models another way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from gcpo_lightning.policy.loading import load_causal_lm, load_tokenizer, render_prompt
from gcpo_lightning.policy.lora import DisabledAdapterReference, LoRAConfig, apply_lora
from gcpo_lightning.policy.quantization import QuantizationConfig, load_quantized
from gcpo_lightning.policy.sharding import shard_policy

ParamDtype = Literal["bfloat16", "float16", "float32"]


@dataclass
class BuiltModels:
    """What :meth:`PolicyBuilder.build` returns."""

    policy: nn.Module  # trainable, in train mode (sharded under FSDP2)
    tokenizer: Any  # left padding, with a pad token
    reference: Any | None  # frozen, eval mode; None when the penalty needs none


class PolicyBuilder:
    """Builds the policy, its tokenizer and (when needed) the frozen reference, once, in ``configure_model``.

    Args:
        model_name_or_path: the policy: a shipped model (``tiny-arith``), ``smollm2-135m-instruct``, a local
            folder or a Hugging Face Hub name, loaded with ``from_pretrained``.
        model_kwargs: keyword arguments for ``from_pretrained`` (e.g. ``dtype``, ``attn_implementation``).
        gradient_checkpointing: recompute each decoder layer's activations in backward (less memory, ~30% slower).
        lora: train LoRA adapters (PEFT) instead of the full policy; the reference is then the same model with
            its adapters disabled (no second copy in memory).
        quantization: load the policy's base in 4-bit (QLoRA; requires ``lora``).
        reference_quantization: load the frozen reference in 4-bit NF4 (bitsandbytes), ~4x less memory than
            bf16; ignored with ``lora`` (whose reference is the policy's own base).
        fsdp_param_dtype: under ``ModelParallelStrategy`` (FSDP2), the dtype parameters are all-gathered in for
            forward/backward (``bfloat16`` for mixed precision; ``None`` keeps the stored dtype). Gradients are
            reduced in ``float32``.
        use_chat_template: wrap prompts in the tokenizer's chat template (``None``: when it has one).
        system_prompt: system message used with the chat template.
        logits_chunk_size: compute log-probs from the final hidden states this many completions at a time (in the
            update each chunk's logits are recomputed in backward), so no ``[N, T, V]`` logits tensor is ever
            alive, in any scoring pass; ``None``: the model's own logits for each scoring batch.
    """

    def __init__(
        self,
        model_name_or_path: str = "tiny-arith",
        model_kwargs: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        lora: LoRAConfig | None = None,
        quantization: QuantizationConfig | None = None,
        reference_quantization: QuantizationConfig | None = None,
        fsdp_param_dtype: ParamDtype | None = None,
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
        logits_chunk_size: int | None = None,
    ) -> None:
        self.model_name_or_path = model_name_or_path
        self.model_kwargs = model_kwargs or {}
        self.gradient_checkpointing = gradient_checkpointing
        self.lora, self.quantization, self.reference_quantization = lora, quantization, reference_quantization
        self.fsdp_param_dtype = fsdp_param_dtype
        self.use_chat_template, self.system_prompt = use_chat_template, system_prompt
        self.logits_chunk_size = logits_chunk_size
        errors = self.errors()
        if errors:
            raise ValueError("PolicyBuilder: " + "; ".join(errors))

    def errors(self) -> list[str]:
        """Every problem with the settings, each naming the setting."""
        errors = []
        if self.quantization is not None and self.lora is None:
            errors.append(
                "quantization (a 4-bit policy) needs lora: 4-bit weights cannot be trained directly "
                "(use reference_quantization for a 4-bit reference)"
            )
        if self.logits_chunk_size is not None and self.logits_chunk_size < 1:
            errors.append(f"logits_chunk_size must be >= 1, got {self.logits_chunk_size}")
        return errors

    @property
    def saves_adapters_only(self) -> bool:
        """QLoRA: checkpoints hold the adapters only; the 4-bit base is rebuilt from ``model_name_or_path``."""
        return self.quantization is not None

    def checkpoint_state(self, state_dict: dict[str, Any], policy: nn.Module) -> dict[str, Any]:
        """The module state to save: with QLoRA, the policy's trainable adapters only (``policy.`` keys)."""
        if not self.saves_adapters_only:
            return state_dict
        keep = trainable_keys(policy)
        return {k: v for k, v in state_dict.items() if not k.startswith("policy.") or k in keep}

    def check_checkpoint(self, state_dict: dict[str, Any], policy: nn.Module) -> None:
        """With QLoRA, raise if the checkpoint lacks adapter weights the policy trains."""
        missing = sorted(trainable_keys(policy) - state_dict.keys()) if self.saves_adapters_only else []
        if missing:
            raise KeyError(f"GCPOModule: the checkpoint lacks {len(missing)} adapter weights, e.g. {missing[:3]}")

    def build(self, needs_reference: bool, device: torch.device | str, mesh: Any = None) -> BuiltModels:
        """Load the tokenizer and policy (LoRA, gradient checkpointing, FSDP2 over ``mesh``) and the reference."""
        tokenizer = load_tokenizer(self.model_name_or_path)
        policy = self.load(self.quantization)
        if self.gradient_checkpointing:
            policy.activation_checkpointing_enable({"use_reentrant": False})  # type: ignore[operator]  # transformers' gradient checkpointing
        if self.lora is not None:
            policy = apply_lora(policy, self.lora)
        if mesh is not None:  # ModelParallelStrategy (FSDP2)
            dtype = getattr(torch, self.fsdp_param_dtype) if self.fsdp_param_dtype else None
            shard_policy(policy.to(device), mesh, param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
        return BuiltModels(
            policy=policy.train(), tokenizer=tokenizer, reference=self.reference(policy, needs_reference)
        )

    def reference(self, policy: nn.Module, needed: bool) -> Any | None:
        """The frozen reference: the LoRA policy with adapters off, or a second (optionally 4-bit) copy."""
        if not needed:
            return None
        if self.lora is not None:
            return DisabledAdapterReference(policy)
        return self.load(self.reference_quantization).eval().requires_grad_(False)

    def load(self, quantization: QuantizationConfig | None) -> nn.Module:
        """The model from ``model_name_or_path``, in 4-bit when ``quantization`` is given."""
        if quantization is None:
            return load_causal_lm(self.model_name_or_path, self.model_kwargs)
        return load_quantized(self.model_name_or_path, self.model_kwargs, quantization)

    def render(self, tokenizer: Any, text: str) -> str:
        """``text`` as fed to the model (chat template applied where used)."""
        return render_prompt(tokenizer, text, self.use_chat_template, self.system_prompt)


def trainable_keys(policy: nn.Module) -> set[str]:
    """The module state-dict keys (``policy.`` prefix) of the policy's trainable parameters."""
    return {f"policy.{n}" for n, p in policy.named_parameters() if p.requires_grad}
