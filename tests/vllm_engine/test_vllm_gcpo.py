"""GCPO end to end with ``VLLMSampler``, and what a resumed run with it guarantees.

Both fit ``configs/gcpo.yaml`` with ``configs/overlays/vllm.yaml`` from the command line, each in a process of its
own (one engine per process, as in training): the candidates, the integrated outputs and the contexts' samples all
come from the engine.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).parents[2]
SMALL = [
    "--trainer.enable_progress_bar=false",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.limit_val_batches=1",
    "--data.num_val=8",
    "--data.val_batch_size=8",
    "--data.batch_size=2",
    "--model.num_generations=4",
    "--model.sampler.init_args.max_completion_length=24",
    "--model.log_completions_every_n_steps=0",
    "--trainer.callbacks=[]",
]


def fit(run_cli_fit: Callable[..., None], tmp_path: Path, *extra: str) -> list[dict[str, str]]:
    """Run ``fit`` of GCPO with the vLLM overlay; the training rows of its ``metrics.csv`` (a rollout each)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    configs = ["--config", str(REPO / "configs/gcpo.yaml"), "--config", str(REPO / "configs/overlays/vllm.yaml")]
    run_cli_fit(tmp_path, *configs, *SMALL, f"--trainer.logger.init_args.save_dir={tmp_path}", *extra)
    rows: list[dict[str, str]] = []
    for path in sorted(tmp_path.glob("gcpo/version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(path.open()) if r.get("timing/weight_sync")]
    return rows


def assert_engine_held_the_policy(rows: list[dict[str, str]]) -> None:
    """Each rollout's vLLM log-probs are the policy's (float noise ~3e-5): the engine had the current weights."""
    for row in rows:
        assert float(row["sampling/sampling_logp_difference/max"]) < 1e-3, row["step"]
        assert abs(float(row["sampling/applied_importance_weight_mean"]) - 1) < 1e-2


def test_gcpo_fits_with_the_vllm_sampler(run_cli_fit, tmp_path: Path) -> None:
    rows = fit(
        run_cli_fit,
        tmp_path,
        "--trainer.max_steps=2",
        "--trainer.enable_checkpointing=false",
        "--model.num_iterations=1",
    )
    assert len(rows) == 2
    for row in rows:
        assert math.isfinite(float(row["loss"]))
        assert float(row["timing/context_generation"]) > 0  # GCPO's contexts were sampled (by the engine)
        assert math.isfinite(float(row["causal_weight/mean"]))  # U_i from the contexts' samples
        assert math.isfinite(float(row["causal_kl"]))  # the causal KL on x_i
    assert_engine_held_the_policy(rows)  # GCPO scores its rollout (old log-probs for p'_ref, z_i): compared here


def test_resume_with_the_vllm_sampler_pushes_the_restored_policy(run_cli_fit, tmp_path: Path) -> None:
    # What a resume guarantees with vLLM (docs/vllm.md): not the same samples (the engine's generator starts anew),
    # but the steps continue from the checkpoint and the new engine samples from the restored policy, which
    # differs from the shipped weights after two updates (so a missed push would show as a log-prob gap)
    first = fit(
        run_cli_fit,
        tmp_path / "first",
        "--trainer.max_steps=2",  # 1 rollout x 2 iterations
        "--trainer.val_check_interval=1",  # after the first batch (= 2 optimiser steps): writes the checkpoint
        "--model.num_iterations=2",
        "--trainer.enable_checkpointing=true",
    )
    (ckpt,) = (tmp_path / "first").rglob("*step=2.ckpt")
    resumed = fit(
        run_cli_fit,
        tmp_path / "resumed",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=1",  # its checkpoint names the step the run ended at
        "--model.num_iterations=2",
        "--trainer.enable_checkpointing=true",
        f"--ckpt_path={ckpt}",
    )
    assert len(first) == 1 and len(resumed) == 1  # a rollout each: the resumed run made only the second
    assert [p.name for p in (tmp_path / "resumed").rglob("*.ckpt")] == ["epoch=0-step=4.ckpt"]  # 2 + 2 steps
    assert_engine_held_the_policy(first + resumed)
