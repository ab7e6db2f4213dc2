"""The system end to end on a tiny random model: it learns, logs, and refuses bad settings early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from custom_components import raising_reward, short_reward

from gcpo_lightning import CausalAdvantage, ColliderGraphBuilder, ReferenceKL
from gcpo_lightning.policy.loading import load_causal_lm
from gcpo_lightning.rewards.base import RewardError

EXPECTED_METRICS = {
    "reward",
    "accuracy",
    "reward_std",
    "frac_reward_zero_std",
    "loss",
    "kl",
    "entropy",
    "grad_norm",
    "advantages/mean",
    "advantages/std",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "completions/mean_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "rewards/length_reward/mean",
    "timing/generation",
    "timing/scoring",
    "timing/rewards",
    "timing/reference",
    "timing/update",
    "val/accuracy",
}


def test_fit_learns_and_logs(make_module, fit, logged_rows, tiny_model_dir, tmp_path):
    before = load_causal_lm(str(tiny_model_dir)).state_dict()
    module = make_module(tiny_model_dir, num_iterations=2, mini_batch_size=4)
    trainer = fit(module, tmp_path)
    after = module.policy.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no parameter changed"
    assert module.reference is not None and all(
        torch.equal(before[k], v) for k, v in module.reference.state_dict().items()
    ), "the reference must stay frozen"
    rows = logged_rows(trainer)
    logged = {k for row in rows for k, v in row.items() if v != ""}
    assert EXPECTED_METRICS <= logged, EXPECTED_METRICS - logged
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any(r["step"] == "0" and r.get("val/accuracy") for r in rows), "the baseline is logged at step 0"
    # completions.jsonl: every training step (log_completions_every_n_steps=1) writes the first 8 completions (the
    # default num_completions_to_log; here all 2 prompts x 4), under the optimiser step reached. 8 completions in
    # mini-batches of 4, twice (num_iterations=2), are 4 optimiser steps, so the first training batch already passes
    # max_steps=2 (optimiser steps): one table, at step 4. Each row has its prompt and its total reward, with the one
    # reward function (weight 1) length_reward: len(completion) / 10 + (sum of code points mod 10) / 100.
    table = [json.loads(line) for line in (Path(trainer.logger.log_dir) / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in table] == [4] * 8
    expected = lambda c: len(c) / 10 + (sum(map(ord, c)) % 10) / 100  # noqa: E731
    assert all(r["reward"] == pytest.approx(expected(r["completion"])) for r in table)
    assert all(r["prompt"].startswith("Problem: ") for r in table)
    assert len({r["completion"] for r in table}) > 1, "completions of a sampled random model differ"


@pytest.mark.parametrize("micro_batch_size, expected", [(None, 4.0), (3, 3.0), (64, 4.0)])
def test_logged_micro_batch_rows_are_the_rows_a_pass_reads(
    make_module, fit, logged_rows, tiny_model_dir, tmp_path, micro_batch_size, expected
):
    """``update/micro_batch_rows``: mini-batches of 4 completions (2 prompts x G = 4 in mini-batches of 4), so a pass
    reads 4 rows without micro-batches or with micro-batches larger than that, and 3 with micro-batches of 3."""
    module = make_module(tiny_model_dir, mini_batch_size=4, micro_batch_size=micro_batch_size)
    rows = logged_rows(fit(module, tmp_path, steps=1))
    assert {float(r["update/micro_batch_rows"]) for r in rows if r.get("update/micro_batch_rows")} == {expected}


def test_no_reference_is_built_when_beta_is_zero(make_module, fit, tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, kl=ReferenceKL(beta=0.0))
    fit(module, tmp_path, steps=1)
    assert module.reference is None


def test_non_finite_loss_is_skipped_and_counted(make_module, fit, logged_rows, tiny_model_dir, tmp_path, monkeypatch):
    import gcpo_lightning.training.update as module_lib

    real = module_lib.policy_loss

    def nan_loss(*args, **kwargs):
        loss, ratio = real(*args, **kwargs)
        return loss * float("nan"), ratio

    monkeypatch.setattr(module_lib, "policy_loss", nan_loss)
    before = load_causal_lm(str(tiny_model_dir)).state_dict()
    module = make_module(tiny_model_dir)
    trainer = fit(module, tmp_path, steps=2)
    assert module.skips.total == 2
    assert all(torch.equal(before[k], v) for k, v in module.policy.state_dict().items())
    assert max(float(r["skipped_steps"]) for r in logged_rows(trainer) if r.get("skipped_steps")) == 2.0


def test_too_many_consecutive_skips_stop_training(make_module, fit, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "gcpo_lightning.training.update.policy_loss", lambda *a, **k: (torch.tensor(float("nan")), None)
    )
    module = make_module(tiny_model_dir, max_consecutive_skips=2)
    with pytest.raises(FloatingPointError, match="2 consecutive steps had a non-finite loss"):
        fit(module, tmp_path, steps=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_generations=1), "num_generations must be >= 2"),
        (dict(num_generations=4, mini_batch_size=6), "multiple of num_generations"),
        (dict(num_iterations=0), "num_iterations"),
        (dict(reward_weights=[1.0, 2.0]), "reward_weights has 2 entries for 1 functions"),
        (dict(loss="ppo"), "loss must be a LossAggregation"),
        (dict(epsilon=0.0), "epsilon"),
        (
            dict(graph_builder=ColliderGraphBuilder(num_context_samples=0), adjuster=CausalAdvantage()),
            "num_context_samples: 0 leaves no context samples, but the adjuster CausalAdvantage reads",
        ),
    ],
)
def test_bad_settings_fail_in_init(make_module, tiny_model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(tiny_model_dir, **kwargs)


def test_rollout_batch_not_divisible_by_mini_batch(make_module, fit, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("gcpo_lightning.policy.builder.load_causal_lm", _no_model_load)
    module = make_module(tiny_model_dir, num_generations=4, mini_batch_size=8)
    with pytest.raises(ValueError, match="not divisible by mini_batch_size"):
        fit(module, tmp_path, batch_size=3)


def _no_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the bad input was reported")


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (raising_reward, "'raising_reward' raised KeyError"),
        (short_reward, "'short_reward' returned 1 values for 2 completions"),
    ],
)
def test_bad_reward_function_is_named_before_the_model_loads(
    make_module, fit, tiny_model_dir, tmp_path, fn, message, monkeypatch
):
    monkeypatch.setattr("gcpo_lightning.policy.builder.load_causal_lm", _no_model_load)
    module = make_module(tiny_model_dir, reward_funcs=[fn])
    with pytest.raises(RewardError, match=message):
        fit(module, tmp_path, steps=1)


def test_reward_metric_names_stay_distinct():
    from gcpo_lightning.training.metrics import unique_names

    assert unique_names(["acc", "fmt", "acc"]) == ["acc_0", "fmt", "acc_2"]
    assert unique_names(["acc", "fmt"]) == ["acc", "fmt"]


def test_rollout_is_rescored_only_when_needed(make_module, tiny_model_dir):
    from gcpo_lightning.training.checks import needs_rollout_scores

    grpo = make_module(tiny_model_dir)  # one on-policy step, GRPO components: old log-probs = detached new ones
    assert not needs_rollout_scores(grpo, num_prompts=2)
    assert needs_rollout_scores(make_module(tiny_model_dir, num_iterations=2), 2)
    assert needs_rollout_scores(make_module(tiny_model_dir, mini_batch_size=4), 2)  # 2 optimiser steps
    assert needs_rollout_scores(make_module(tiny_model_dir, adjuster=CausalAdvantage()), 2)  # reads rep(y)
