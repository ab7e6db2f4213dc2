"""Sampled evaluation inside the module: validate/test report pass@k, mean@k, majority@k and write per-problem
results, on a tiny model end to end (and from the command line)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from gcpo_lightning import ArithmeticDataModule
from gcpo_lightning.cli import main
from gcpo_lightning.evaluation.records import read_problem_results
from gcpo_lightning.functional.pass_at_k import pass_at_k_tensor
from gcpo_lightning.rewards.arithmetic import arithmetic_accuracy


def even_length(completions, **_):
    """Right when the completion has an even number of characters: about half the samples of a random model."""
    return [float(len(c) % 2 == 0) for c in completions]


even_length.answer_key = lambda c: str(len(c) % 4)  # votes: equal keys always share their correctness


def always_right_on_first_problem(completions, answer, **_):
    """Correct for every sample whose row's answer is that of the first held-out problem: pass@k is known."""
    return [1.0 if a == answer[0] else 0.0 for a in answer]


def test_validate_reports_sampled_metrics_and_writes_each_problem(make_module, tiny_model_dir, tmp_path):
    L.seed_everything(0)  # the strict pass@1 < pass@2 < pass@4 below holds for these samples, whatever ran before
    module = make_module(
        tiny_model_dir,
        reward_funcs=[even_length],
        eval_num_samples=4,
        eval_pass_at=[1, 2, 4],
        eval_results_path=str(tmp_path / "eval" / "{stage}_{step}.jsonl"),
    )
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    dm = ArithmeticDataModule(num_train=16, num_val=6, val_batch_size=4)
    metrics = trainer.validate(module, dm)[0]
    assert {"val/accuracy", "val/pass@2", "val/pass@4", "val/mean@4", "val/majority@4", "val/reward"} <= metrics.keys()
    assert metrics["val/accuracy"] == metrics["val/pass@1"] == metrics["val/mean@4"]
    assert 0 < metrics["val/pass@1"] < metrics["val/pass@2"] < metrics["val/pass@4"] <= 1
    records = read_problem_results(tmp_path / "eval" / "val_0.jsonl")
    assert [r.index for r in records] == list(range(6))  # two batches, one file, every problem once
    for r in records:  # every record is consistent with its own samples
        assert len(r.completions) == 4 and len(r.extracted) == 4
        assert r.pass_at["pass@2"] == pytest.approx(pass_at_k_tensor(torch.tensor([r.correct]), 2).item())
        assert r.majority == r.correct[r.extracted.index(max(r.extracted, key=r.extracted.count))]
    mean = sum(sum(r.correct) / 4 for r in records) / 6
    assert metrics["val/pass@1"] == pytest.approx(mean)
    assert metrics["val/majority@4"] == pytest.approx(sum(r.majority for r in records) / 6)


def test_pass_at_k_of_known_correctness(make_module, tiny_model_dir):
    # the reward marks every sample of the first problem of each batch right: with 2 problems per batch and
    # 2 batches, half the problems are always solved -> pass@1 = pass@k = 0.5 exactly
    module = make_module(tiny_model_dir, reward_funcs=[always_right_on_first_problem], eval_num_samples=3)
    dm = ArithmeticDataModule(num_train=16, num_val=4, val_batch_size=2)
    metrics = L.Trainer(logger=False, enable_progress_bar=False).validate(module, dm)[0]
    assert metrics["val/pass@1"] == pytest.approx(0.5) and metrics["val/pass@3"] == pytest.approx(0.5)
    assert "val/majority@3" not in metrics  # this reward has no answer_key: no vote


def test_greedy_single_sample_is_deterministic(make_module, tiny_model_dir):
    module = make_module(tiny_model_dir, reward_funcs=[arithmetic_accuracy])
    dm = ArithmeticDataModule(num_train=16, num_val=4, val_batch_size=4)
    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    torch.manual_seed(0)
    a = trainer.validate(module, dm)[0]
    torch.manual_seed(1)
    assert trainer.validate(module, dm)[0] == a


def test_bad_eval_settings_fail_in_init(make_module, tiny_model_dir):
    with pytest.raises(ValueError, match="eval_pass_at"):
        make_module(tiny_model_dir, eval_num_samples=2, eval_pass_at=[4])


def test_test_subcommand_from_the_command_line(tmp_path):
    main(
        [
            "test",
            "--config",
            "configs/grpo.yaml",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            "--data.num_val",
            "4",
            "--model.eval_num_samples",
            "2",
            "--model.eval_results_path",
            str(tmp_path / "{stage}.jsonl"),
        ]
    )
    lines = (tmp_path / "test.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"pass_at", "completions", "correct"} <= json.loads(lines[0]).keys()


def test_code_reward_trains_and_reports_sandbox_outcomes(make_module, fit, tiny_model_dir, tmp_path):
    from importlib.resources import files

    from gcpo_lightning import HFPromptDataModule
    from gcpo_lightning.rewards.code import CodeExecution

    sample = str(files("gcpo_lightning") / "assets" / "samples" / "humaneval_sample.jsonl")
    module = make_module(
        tiny_model_dir, reward_funcs=[CodeExecution(timeout_s=5.0, max_workers=2)], log_completions_every_n_steps=0
    )
    dm = HFPromptDataModule(path=sample, preset="humaneval", val_size=2, batch_size=2, val_batch_size=2)
    trainer = fit(module, tmp_path, steps=1, dm=dm)
    outcomes = {
        k: v
        for k, v in trainer.logged_metrics.items()
        if k.startswith("rewards/code_execution/") and k.rsplit("/", 1)[-1] not in ("mean", "std")
    }
    assert outcomes and sum(float(v) for v in outcomes.values()) == pytest.approx(1.0)
    assert float(trainer.logged_metrics["rewards/code_execution/mean"]) == float(
        outcomes.get("rewards/code_execution/passed", 0.0)
    )  # random code never passes; every outcome is a 0 with a reason
