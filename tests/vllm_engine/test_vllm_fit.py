"""GRPO end to end with ``VLLMSampler``: configs/grpo_vllm.yaml (configs/grpo.yaml with the sampler swapped) fits a
few steps on tiny-arith from the command line, in a process of its own (one engine per process, as in training)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).parents[2]
ROLLOUTS = 2
ITERATIONS = 2  # updates per rollout: the rollout is then scored, so vLLM's log-probs are compared with it


def test_grpo_fits_with_the_vllm_sampler(run_cli_fit, tmp_path: Path) -> None:
    run_cli_fit(
        tmp_path,
        "--config",
        str(REPO / "configs/grpo_vllm.yaml"),
        f"--trainer.max_steps={ROLLOUTS * ITERATIONS}",  # optimiser steps
        "--trainer.val_check_interval=2",  # a validation after a weight push: greedy, through the engine
        "--trainer.num_sanity_val_steps=1",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.num_val=16",
        "--data.val_batch_size=16",
        "--data.batch_size=4",
        "--model.num_generations=4",
        "--model.sampler.init_args.max_completion_length=32",
        "--model.log_completions_every_n_steps=0",
        f"--model.num_iterations={ITERATIONS}",
    )
    (metrics_file,) = tmp_path.glob("grpo_vllm/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics_file.open()) if r.get("timing/weight_sync")]
    assert len(rows) == ROLLOUTS
    for row in rows:
        assert math.isfinite(float(row["loss"]))
        assert abs(float(row["sampling/importance_sampling_ratio/mean"]) - 1) < 1e-2  # engine == policy weights
        assert abs(float(row["sampling/applied_importance_weight_mean"]) - 1) < 1e-2  # the loss applied them
    # a push happens before every step after the first: the engine held the updated policy whenever it sampled
    assert max(float(r["sampling/sampling_logp_difference/max"]) for r in rows) < 1e-3  # float noise: ~3e-5
    exported = load_file(next(tmp_path.glob("grpo_vllm/version_*/hf_model/model.safetensors")))
    shipped = load_file(REPO / "gcpo_lightning/assets/tiny-arith/model.safetensors")
    assert any(not torch.equal(exported[k], shipped[k]) for k in shipped)  # training changed the policy
