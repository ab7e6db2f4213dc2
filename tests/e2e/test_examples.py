"""The examples run on a tiny random model: they train (weights move), log what they claim, and reach user code."""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from gcpo_lightning.policy.loading import load_causal_lm

REPO = Path(__file__).parents[2]
EXAMPLES = REPO / "examples"
SMALL = ["--steps", "2", "--batch-size", "2", "--max-completion-length", "8"]


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put ``examples/`` on ``sys.path``, as running ``python examples/<file>.py`` does."""
    monkeypatch.syspath_prepend(str(EXAMPLES))


def example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (``examples/`` must be on ``sys.path``)."""
    return importlib.import_module(name)


def metric_rows(log_dir: Path) -> list[dict[str, str]]:
    """The rows of a CSV logger's ``metrics.csv``."""
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def logged(rows: list[dict[str, str]]) -> set[str]:
    """Metric names with at least one value."""
    return {k for row in rows for k, v in row.items() if v != ""}


def changed_parameters(model_dir: Path, policy: torch.nn.Module) -> list[str]:
    """Names of the parameters that differ from the saved model's."""
    before = load_causal_lm(str(model_dir)).state_dict()
    return [k for k, v in policy.state_dict().items() if not torch.equal(before[k], v)]


@pytest.mark.parametrize(
    ("method", "extra", "expected"),
    [
        ("gcpo", [], {"causal_kl", "causal_weight/mean", "timing/integration", "kl"}),
        ("grpo", ["--extra-reward", "my_rewards.brevity_reward"], {"rewards/brevity_reward/mean", "kl"}),
    ],
)
def test_plain_python(examples, tiny_model_dir, tmp_path, capsys, method, extra, expected):
    argv = [
        "--method",
        method,
        "--model",
        str(tiny_model_dir),
        "--log-dir",
        str(tmp_path),
        "--num-generations",
        "4",
        "--num-val",
        "4",
        "--weight-decay",
        "0",
        *SMALL,
        *extra,
    ]
    result = example("plain_python").main(argv)
    assert changed_parameters(tiny_model_dir, result.module.policy), "no parameter changed"
    rows = metric_rows(result.log_dir)
    assert expected | {"loss", "val/accuracy"} <= logged(rows), expected - logged(rows)
    assert any(r["step"] == "0" and r["val/accuracy"] for r in rows), "the baseline is logged at step 0"
    # the two accuracies returned and printed are the logged held-out accuracy at step 0 and after the last step
    accuracies = [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]
    assert [result.accuracy_before, result.accuracy_after] == pytest.approx(accuracies)
    printed = f"held-out accuracy: {accuracies[0]:.3f} before, {accuracies[1]:.3f} after 2 steps"
    assert printed in capsys.readouterr().out


@pytest.mark.slow
def test_custom_reward_through_the_cli(examples, tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")]))}
    command = [
        sys.executable,
        "-m",
        "gcpo_lightning",
        "fit",
        "--config",
        str(REPO / "configs/grpo.yaml"),
        "--config",
        str(EXAMPLES / "custom_reward.yaml"),
        "--model.policy_builder.model_name_or_path",
        str(tiny_model_dir),
        "--model.num_generations",
        "2",
        "--model.sampler.init_args.max_completion_length",
        "8",
        "--model.log_completions_every_n_steps",
        "1",
        "--trainer.max_steps",
        "1",
        "--trainer.val_check_interval",
        "1",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--data.init_args.num_train",
        "64",
        "--data.init_args.num_val",
        "4",
        "--data.init_args.batch_size",
        "2",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log_dir = tmp_path / "custom_reward" / "version_0"
    rows = metric_rows(log_dir)
    brevity = [float(r["rewards/brevity_reward/mean"]) for r in rows if r.get("rewards/brevity_reward/mean")]
    # one step of 2 prompts x 2 completions, all four in completions.jsonl: the logged mean is
    # the user's function recomputed on them, 1 - len(c.strip()) / 64 floored at 0
    table = [json.loads(line) for line in (log_dir / "completions.jsonl").read_text().splitlines()]
    assert len(brevity) == 1 and len(table) == 4, "the user's function was not called"
    expected = example("my_rewards").brevity_reward([r["completion"] for r in table])
    assert brevity[0] == pytest.approx(sum(expected) / 4, rel=1e-5)
    assert any(r.get("rewards/AnswerInRange/mean") for r in rows), "the user's callable class was not called"
    config = (log_dir / "config.yaml").read_text()
    assert "my_rewards.AnswerInRange" in config and "low: -50" in config


@pytest.mark.parametrize("adjuster", ["group", "causal"])
def test_custom_module(examples, tiny_model_dir, tmp_path, adjuster):
    argv = [
        "--model",
        str(tiny_model_dir),
        "--log-dir",
        str(tmp_path),
        "--adjuster",
        adjuster,
        "--extra-reward",
        "my_rewards.brevity_reward",
        "--num-val",
        "4",
        *SMALL,
    ]
    result = example("custom_module").main(argv)
    assert changed_parameters(tiny_model_dir, result.module.policy), "no parameter changed"
    rows = metric_rows(result.log_dir)
    assert {"train/loss", "train/reward", "train/advantage_abs", "val/accuracy"} <= logged(rows)
    assert max(float(r["train/advantage_abs"]) for r in rows if r["train/advantage_abs"]) > 0, "no learning signal"
    assert result.module.trainer.global_step == 2
