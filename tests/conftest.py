"""Shared fixtures for every tier (``unit/``, ``component/``, ``e2e/``; see ``tests/README.md``).

Nothing is downloaded: models are built in-process and loaded through the real ``from_pretrained`` path.

* ``tiny_model_dir``: a tiny random Llama with the character tokenizer, saved once per session;
  ``make_tiny_llama``: the factory behind it (other sizes and seeds).
* ``own_random_stream``: for tests that seed torch's generator (``pytest.mark.usefixtures``).
* ``make_module`` / ``fit`` / ``logged_rows``: a ``GCPOModule`` with small defaults, a short ``Trainer.fit`` with a
  CSV logger, and the rows that logger wrote.
* ``run_fit`` / ``fit_metrics`` / ``fit_script``: ``tests/support/distributed_fit.py`` run as its own process (one
  rank or two gloo ranks) and the metrics it wrote.

``save_tiny_llama`` stays a plain function: ``benchmarks/`` imports it from here.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gcpo_lightning.policy.char_tokenizer import build_char_tokenizer

TESTS = Path(__file__).parent
TIERS = ("unit", "component", "e2e")
FIT_SCRIPT = TESTS / "support" / "distributed_fit.py"


SLOW_SECONDS = 10.0
"""What a test marked ``slow`` without ``seconds=`` is assumed to cost when the modules are ordered."""

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core (pyproject's addopts): one torch thread each
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its tier, read from its folder (``tests/<tier>/...`` gets ``pytest.mark.<tier>``), and
    put the costliest modules first.

    Under ``-n auto --dist loadscope --no-loadscope-reorder`` (``addopts`` in pyproject.toml) each module goes whole
    to one worker, in this order: starting the longest ones (the vLLM tier, resume, FSDP2) first keeps the two workers
    busy to the end instead of leaving one module of several minutes for last. A module's cost is the sum of its
    tests' ``slow(seconds=N)`` (``slow`` alone counts :data:`SLOW_SECONDS`); ties keep the collected order, and the
    order of tests inside a module never changes.
    """
    for item in items:
        try:
            tier = item.path.relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
    cost: dict[Path, float] = {}
    for item in items:
        marker = item.get_closest_marker("slow")
        seconds = float(marker.kwargs.get("seconds", SLOW_SECONDS)) if marker else 0.0
        cost[item.path] = cost.get(item.path, 0.0) + seconds
    items.sort(key=lambda item: -cost[item.path])  # stable: the collected order within a module and among equals


def save_tiny_llama(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, kv_heads: int = 4) -> Path:
    """A random ``LlamaForCausalLM`` of a few thousand parameters plus the char tokenizer, saved in ``path``
    (4 attention heads; ``kv_heads < 4``: grouped-query attention, as Qwen and Llama 3 have)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_tiny_llama() -> Callable[..., Path]:
    """``save_tiny_llama(path, seed=0, hidden=32, layers=2, kv_heads=4)``: other sizes and seeds than
    ``tiny_model_dir``."""
    return save_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Llama (hidden 32, 2 layers) with the char tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def own_random_stream():
    """Fork torch's random state around a test that seeds it, so later tests see the stream they would without it."""
    with torch.random.fork_rng():
        yield


# ----- a GCPOModule and a short fit, in-process ---------------------------------------------------------------

BUILDER_ARGS = {
    "model_kwargs",
    "gradient_checkpointing",
    "lora",
    "quantization",
    "reference_quantization",
    "fsdp_param_dtype",
    "use_chat_template",
    "system_prompt",
    "logits_chunk_size",
}


def _no_decay(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)


def _make_module(model_dir: Path, **kwargs):
    """``GCPOModule`` on ``model_dir``: length reward, 8-token completions, k3 KL 0.04, G = 4, AdamW lr 1e-2.

    ``PolicyBuilder`` arguments (``lora``, ``logits_chunk_size``, ...) may be given directly; every other keyword
    overrides a module argument.
    """
    from custom_components import length_reward

    from gcpo_lightning import GCPOModule, GroupSampler, ReferenceKL
    from gcpo_lightning.policy.builder import PolicyBuilder

    builder = {k: kwargs.pop(k) for k in list(kwargs) if k in BUILDER_ARGS}
    defaults = dict(
        policy_builder=PolicyBuilder(str(model_dir), **builder),
        reward_funcs=[length_reward],
        sampler=GroupSampler(max_completion_length=8),
        kl=ReferenceKL(beta=0.04),
        num_generations=4,
        optimizer=_no_decay,
        log_completions_every_n_steps=1,
    )
    defaults.update(kwargs)
    return GCPOModule(**defaults)


def _fit(module, tmp_path: Path, steps: int = 2, batch_size: int = 2, dm=None):
    """``steps`` training steps with a CSV logger in ``tmp_path``, validation before (step 0) and at the end."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from gcpo_lightning import ArithmeticDataModule

    trainer = L.Trainer(
        max_steps=steps,
        logger=CSVLogger(tmp_path),
        num_sanity_val_steps=-1,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    dm = dm or ArithmeticDataModule(batch_size=batch_size, num_train=64, num_val=4, val_batch_size=4)
    trainer.fit(module, dm)
    return trainer


def _logged_rows(trainer) -> list[dict[str, str]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def make_module() -> Callable:
    """``make_module(model_dir, **overrides) -> GCPOModule`` (small defaults, see ``_make_module``)."""
    return _make_module


@pytest.fixture(scope="session")
def fit() -> Callable:
    """``fit(module, tmp_path, steps=2, batch_size=2, dm=None) -> Trainer``."""
    return _fit


@pytest.fixture(scope="session")
def logged_rows() -> Callable:
    """``logged_rows(trainer)``: the rows of the trainer's CSV logger's ``metrics.csv``."""
    return _logged_rows


# ----- tests/support/distributed_fit.py as its own process ----------------------------------------------------


def _fit_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run_fit(model: Path, out: Path, *args: str, timeout: int = 600) -> Path:
    """Run the driver to completion; fail with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, str(FIT_SCRIPT), "--model", str(model), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_fit_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _fit_metrics(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"metrics_rank{rank}.json").read_text())


@pytest.fixture(scope="session")
def run_fit() -> Callable[..., Path]:
    """``run_fit(model, out, *args, timeout=600) -> out``: ``tests/support/distributed_fit.py`` to completion."""
    return _run_fit


@pytest.fixture(scope="session")
def fit_metrics() -> Callable[..., dict]:
    """``fit_metrics(out, rank=0)``: what the driver's rank wrote to ``metrics_rank<r>.json``."""
    return _fit_metrics


@pytest.fixture(scope="session")
def fit_script() -> tuple[Path, dict[str, str]]:
    """The driver's path and the environment it runs in, for tests that launch it themselves."""
    return FIT_SCRIPT, _fit_env()
