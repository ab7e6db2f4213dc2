"""Checkpoints resume exactly on one process, SIGTERM saves a checkpoint first, and the data position is kept."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_distributed import SCRIPT, metrics, run_fit

from gcpo_lightning.data.loader import ResumableLoader, ResumableSampler
from gcpo_lightning.training.rng import rng_state, set_rng_state


def test_sampler_resumes_mid_epoch_in_the_same_order():
    data = list(range(10))
    sampler = ResumableSampler(data, seed=3)
    sampler.set_epoch(1)
    order = list(sampler)
    assert sorted(order) == data and order != list(range(10))
    it = iter(sampler)
    seen = [next(it) for _ in range(4)]
    state = sampler.state_dict()
    assert state["consumed"] == 4 and state["epoch"] == 1
    fresh = ResumableSampler(data, seed=3)
    fresh.load_state_dict(state)
    fresh.set_epoch(1)
    assert seen + list(fresh) == order  # the rest of the same epoch, nothing repeated
    fresh.set_epoch(2)
    assert sorted(fresh) == data and list(fresh) != order  # next epoch: a new order, from the start


def test_loader_position_counts_whole_batches():
    loader = ResumableLoader(list(range(12)), batch_size=4, shuffle=True, seed=0, collate_fn=list)
    it = iter(loader)
    next(it)
    assert loader.state_dict()["consumed"] == 4  # no worker has prefetched ahead of the batches trained on


def test_sampler_refuses_a_different_world_size():
    state = ResumableSampler(list(range(4))).state_dict()
    state["num_replicas"] = 2
    with pytest.raises(ValueError, match="2 data-parallel ranks"):
        ResumableSampler(list(range(4))).load_state_dict(state)


def test_rng_state_round_trip():
    state = rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


@pytest.mark.parametrize("options", [[], ["--lora"], ["--lora", "--qlora"], ["--reference-4bit"]],
                         ids=["full", "lora", "qlora", "4bit-reference"])
def test_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path, options):
    full = run_fit(tiny_model_dir, tmp_path / "full", "--devices", "1", "--max-steps", "4", *options)
    first = run_fit(tiny_model_dir, tmp_path / "first", "--devices", "1", "--max-steps", "2", "--save-at", "2",
                    *options)
    ckpt = torch.load(first / "ckpt" / "step=2.ckpt", weights_only=True)
    assert not any(k.startswith("_reference") or ".reference" in k for k in ckpt["state_dict"])
    if "--qlora" in options:  # only the adapters: the 4-bit base is rebuilt from the model path
        assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"] if k.startswith("policy."))
    assert {"optimizer_states", "loops", "gcpo_rng_states"} <= ckpt.keys()
    resumed = run_fit(tiny_model_dir, tmp_path / "resumed", "--devices", "1", "--max-steps", "4",
                      "--resume", str(first / "ckpt" / "step=2.ckpt"), *options)
    assert metrics(resumed)["rows"] == metrics(full)["rows"][2:]
    a, b = torch.load(full / "weights.pt"), torch.load(resumed / "weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_a_checkpoint_that_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--model", str(tiny_model_dir), "--out", str(out),
                             "--devices", "1", "--max-steps", "1000"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
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
    resumed = run_fit(tiny_model_dir, tmp_path / "resumed", "--devices", "1", "--max-steps", str(step + 1),
                      "--resume", str(ckpt_path))
    assert [r["step"] for r in metrics(resumed)["rows"]] == [step + 1]
