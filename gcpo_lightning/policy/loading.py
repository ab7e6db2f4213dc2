"""Loading the policy and its tokenizer, from the shipped assets, a local folder or the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets"
SHIPPED = {"tiny-arith": ASSETS / "tiny-arith"}
"""Models shipped inside the package, usable by name without any download."""


def resolve_model_path(name_or_path: str) -> str:
    """A shipped model's folder, the converted SmolLM2 cache, or the name/path unchanged for ``from_pretrained``."""
    if name_or_path in SHIPPED:
        return str(SHIPPED[name_or_path])
    if name_or_path == "smollm2-135m-instruct":
        from gcpo_lightning.policy.smollm2 import local_smollm2

        return str(local_smollm2())
    return name_or_path


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer with left padding (for batched generation) and a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, model_kwargs: dict[str, Any] | None = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` on a resolved name, with optional keyword arguments.

    ``model_kwargs`` pass straight through (e.g. ``dtype: bfloat16``, ``attn_implementation: sdpa``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(model_kwargs or {})
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), **kwargs)


def render_prompt(tokenizer: Any, text: str, use_chat_template: bool | None, system_prompt: str | None) -> str:
    """The text fed to the model: ``text`` as is, or wrapped in the tokenizer's chat template.

    ``use_chat_template=None`` uses the template when the tokenizer has one.
    """
    use = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else use_chat_template
    if not use:
        return text
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
