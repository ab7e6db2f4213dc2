"""GCPO with its contexts read as sets (``context_layout: set``) through ``Trainer.fit``, and the settings it cannot
be combined with reported when the module is built."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from gcpo_lightning import CausalAdvantage, CausalProjectedKL, ColliderGraphBuilder, GroupSampler
from gcpo_lightning.components.penalties import causal_kl


@pytest.mark.parametrize("policy_context", ["context", "query"])
def test_set_contexts_fit_end_to_end(
    make_module, fit, logged_rows, tiny_model_dir, tmp_path, monkeypatch, policy_context
):
    calls: list[int] = []
    original = causal_kl.set_context_logps
    monkeypatch.setattr(
        causal_kl, "set_context_logps", lambda *a, **k: calls.append(a[3].shape[0]) or original(*a, **k)
    )
    L.seed_everything(0)
    module = make_module(
        tiny_model_dir,
        graph_builder=ColliderGraphBuilder(num_integrated=2, num_context_samples=2, context_layout="set"),
        adjuster=CausalAdvantage(),
        kl=CausalProjectedKL(policy_context=policy_context),
        num_generations=3,
        mini_batch_size=3,  # 2 prompts x G = 3: two optimiser steps per rollout
    )
    from gcpo_lightning.policy.loading import load_causal_lm

    before = load_causal_lm(str(tiny_model_dir)).state_dict()
    trainer = fit(module, tmp_path, steps=2, batch_size=2)
    after = module.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the gradient pass on x_i is the packed set pass, once per optimiser step (of its 3 candidates); none with query
    assert calls == ([3, 3] if policy_context == "context" else [])
    rows = logged_rows(trainer)
    logged = {k for row in rows for k, v in row.items() if v != ""}
    assert {"causal_kl", "causal_weight/mean", "timing/context_generation", "loss"} <= logged
    assert all(float(row["loss"]) == float(row["loss"]) for row in rows if row.get("loss"))  # finite, not NaN


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kl": CausalProjectedKL(policy_context="context_frozen")}, "not context_frozen"),
        (
            {"sampler": GroupSampler(backend=__import__("gcpo_lightning").components.sampling.backends.HFGenerate())},
            "KVCacheLoop",
        ),
    ],
)
def test_set_layout_settings_it_cannot_combine_with_fail_at_construction(make_module, tiny_model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(tiny_model_dir, graph_builder=ColliderGraphBuilder(context_layout="set"), **kwargs)
