"""Checkpoints resume exactly on one process (full, LoRA, QLoRA, 4-bit reference), and SIGTERM saves a checkpoint
first; each run is ``tests/support/distributed_fit.py`` with one device, in its own process (the data position and
RNG state are unit-tested in unit/test_resumable_loader.py)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow(seconds=50)  # each of the four
@pytest.mark.parametrize(
    "options",
    [[], ["--lora"], ["--lora", "--qlora"], ["--reference-4bit"]],
    ids=["full", "lora", "qlora", "4bit-reference"],
)
def test_resume_equals_uninterrupted_run(run_fit, fit_metrics, tiny_model_dir, tmp_path, options):
    full = run_fit(tiny_model_dir, tmp_path / "full", "--devices", "1", "--max-steps", "4", *options)
    first = run_fit(
        tiny_model_dir, tmp_path / "first", "--devices", "1", "--max-steps", "2", "--save-at", "2", *options
    )
    ckpt = torch.load(first / "ckpt" / "step=2.ckpt", weights_only=True)
    assert not any(k.startswith("_reference") or ".reference" in k for k in ckpt["state_dict"])
    if "--qlora" in options:  # only the adapters: the 4-bit base is rebuilt from the model path
        assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"] if k.startswith("policy."))
    assert {"optimizer_states", "loops", "gcpo_rng_states"} <= ckpt.keys()
    resumed = run_fit(
        tiny_model_dir,
        tmp_path / "resumed",
        "--devices",
        "1",
        "--max-steps",
        "4",
        "--resume",
        str(first / "ckpt" / "step=2.ckpt"),
        *options,
    )
    assert fit_metrics(resumed)["rows"] == fit_metrics(full)["rows"][2:]
    a, b = torch.load(full / "weights.pt"), torch.load(resumed / "weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow(seconds=22)
def test_sigterm_saves_a_checkpoint_that_resumes(run_fit, fit_metrics, fit_script, tiny_model_dir, tmp_path):
    out = tmp_path / "killed"
    script, env = fit_script
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--devices",
            "1",
            "--max-steps",
            "1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    for line in proc.stdout:
        if line.startswith("STEP 2"):
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    proc.wait(timeout=120)
    ckpt_path = out / "ckpt" / "sigterm.ckpt"
    assert ckpt_path.is_file(), "no checkpoint was written on SIGTERM"
    step = torch.load(ckpt_path, weights_only=True)["global_step"]
    assert 2 <= step < 1000
    resumed = run_fit(
        tiny_model_dir, tmp_path / "resumed", "--devices", "1", "--max-steps", str(step + 1), "--resume", str(ckpt_path)
    )
    assert [r["step"] for r in fit_metrics(resumed)["rows"]] == [step + 1]
