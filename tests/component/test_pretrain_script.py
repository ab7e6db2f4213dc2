"""scripts/pretrain_tiny_model.py, the script that made the shipped tiny-arith: a few steps of two chained stages."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).parents[2] / "scripts" / "pretrain_tiny_model.py"
TINY = ["--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "1", "--threads", "1"]
QUICK = ["--steps", "3", "--eval-start", "3", "--eval-n", "4", "--eval-samples", "1", "--group", "2"]


def load_script():
    spec = importlib.util.spec_from_file_location("pretrain_tiny_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_two_chained_stages_save_a_model_and_the_lineage_of_both(tmp_path: Path) -> None:
    script = load_script()
    first, second = tmp_path / "stage1", tmp_path / "stage2"
    script.main([*TINY, *QUICK, "--out", str(first)])
    stage2 = ["--init", str(first), "--integration-target", "majority", "--context-target", "follow"]
    script.main([*QUICK, *stage2, "--min-candidates", "3", "--mix", "0,0.5,0.5", "--out", str(second)])
    info = json.loads((second / "training_info.json").read_text())
    assert [stage["command"].count("--init") for stage in info["lineage"]] == [0, 1]  # stage 1, then this one
    assert info["lineage"][-1]["selected_step"] == info["selected_step"] == 3
    assert info["args"]["min_candidates"] == 3
    model = AutoModelForCausalLM.from_pretrained(second)
    assert model.config.hidden_size == 32  # the second stage continued the first stage's model


def test_self_candidates_come_from_the_models_own_samples() -> None:
    """``--self-candidates 1``: once the pool is drawn, every integration/context group is a question of the pool
    and a subset of that question's own samples; with the pool empty the candidates are teacher noise."""
    import random

    import torch

    from gcpo_lightning.data.tasks.arithmetic import ArithmeticTask
    from gcpo_lightning.policy.char_tokenizer import build_char_tokenizer

    script = load_script()
    args = script.parse_args([*TINY, "--self-candidates", "1", "--self-pool", "3", "--max-candidates", "4"])
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = script.build_model(tok, args)
    sampler = script.MixtureSampler(ArithmeticTask(), args, set(), random.Random(0))
    q, cands = sampler.group()
    assert 2 <= len(cands) <= 4 and not sampler.pool
    sampler.refresh_pool(model, tok)
    assert len(sampler.pool) == 3 and all(len(samples) == 4 for _, samples in sampler.pool)
    pool = dict(sampler.pool)
    for _ in range(10):
        q, cands = sampler.group()
        assert q in pool and set(cands) <= set(pool[q]) and 2 <= len(cands) <= 4
    assert model.training, "drawing the pool leaves the model in training mode"
