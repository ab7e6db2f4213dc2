"""GCPO through ``Trainer.fit`` on a tiny model: both policy contexts train and log the causal metrics, and a
context longer than the model's maximum length is reported before training."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from gcpo_lightning import CausalAdvantage, CausalProjectedKL, ColliderGraphBuilder


def test_context_too_long_is_reported_before_training(make_module, fit, tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.max_position_embeddings = 64
    short = tmp_path / "short"
    import shutil

    shutil.copytree(tiny_model_dir, short)
    config.save_pretrained(short)
    module = make_module(short, graph_builder=ColliderGraphBuilder(), kl=CausalProjectedKL(beta=0.0))
    with pytest.raises(ValueError, match="more than the model's maximum length 64"):
        fit(module, tmp_path / "logs", steps=1)


@pytest.mark.parametrize("policy_context", ["context", "query"])
def test_gcpo_fits_end_to_end(make_module, fit, logged_rows, tiny_model_dir, tmp_path, policy_context):
    L.seed_everything(0)
    from gcpo_lightning.policy.loading import load_causal_lm

    before = load_causal_lm(str(tiny_model_dir)).state_dict()
    module = make_module(
        tiny_model_dir,
        graph_builder=ColliderGraphBuilder(num_integrated=2, num_context_samples=2),
        adjuster=CausalAdvantage(),
        kl=CausalProjectedKL(policy_context=policy_context),
        num_generations=3,
        mini_batch_size=3,
    )
    trainer = fit(module, tmp_path, steps=2)
    after = module.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logged = {k for row in logged_rows(trainer) for k, v in row.items() if v != ""}
    expected = {
        "causal_kl",
        "causal_clamped_frac",
        "causal_weight/mean",
        "causal_weight/min",
        "causal_weight/max",
        "causal_weight/frac_negative",
        "kl",
        "timing/integration",
        "timing/context_generation",
        "timing/context_representation",
        "loss",
    }
    assert expected <= logged, expected - logged
