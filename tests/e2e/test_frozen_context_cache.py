"""``policy_context: context_frozen`` attends to the KV cache kept from context generation only while the policy
still has the rollout's weights: after the first optimiser step of a rollout it encodes ``x_i`` again."""

from __future__ import annotations

import torch

from gcpo_lightning import CausalAdvantage, CausalProjectedKL, ColliderGraphBuilder
from gcpo_lightning.components.penalties import causal_kl
from gcpo_lightning.interfaces.containers import PenaltyInputs, PromptCache


def test_after_update_drops_only_the_cache():
    cache = PromptCache(
        keys=[torch.zeros(3, 1, 2, 1)],
        values=[torch.ones(3, 1, 2, 1)],
        mask=torch.ones(3, 2),
        last_token=torch.tensor([4, 5, 6]),
        last_position=torch.tensor([2, 2, 1]),
    )
    inputs = PenaltyInputs(ref_logps=torch.arange(3.0).unsqueeze(1), context_cache=cache)
    picked = inputs.select(torch.tensor([2, 0]))
    assert picked.context_cache is not None and picked.context_cache.last_token.tolist() == [6, 4]
    assert picked.ref_logps is not None and picked.ref_logps.squeeze(1).tolist() == [2.0, 0.0]
    after = inputs.after_update()
    assert after.context_cache is None and after.ref_logps is inputs.ref_logps


def test_the_cache_serves_the_first_optimiser_step_only(make_module, fit, tiny_model_dir, tmp_path, monkeypatch):
    calls: list[str] = []
    for name, tag in (("score_after_cache", "cache"), ("score_after_frozen_prefix", "encode")):
        original = getattr(causal_kl, name)
        monkeypatch.setattr(causal_kl, name, lambda *a, _o=original, _t=tag, **k: calls.append(_t) or _o(*a, **k))
    module = make_module(
        tiny_model_dir,
        graph_builder=ColliderGraphBuilder(num_integrated=2, num_context_samples=1, keep_context_cache=True),
        adjuster=CausalAdvantage(alpha=2.0),
        kl=CausalProjectedKL(beta=0.04, kappa=0.06, policy_context="context_frozen"),
        mini_batch_size=4,  # 2 prompts x G = 4: two optimiser steps per rollout
    )
    fit(module, tmp_path, steps=2, batch_size=2)  # one rollout, two optimiser steps
    assert calls == ["cache", "encode"]
