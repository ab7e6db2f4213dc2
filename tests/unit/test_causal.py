"""GCPO's maths by hand, no model: causal targets and weights (Eq. 11), other similarities, the projected reference
and k3 (Eq. 12-13), the ratio cap, the builder's argument checks and the graph's structure."""

from __future__ import annotations

import math

import pytest
import torch

from gcpo_lightning import CausalAdvantage, CausalProjectedKL, ColliderGraphBuilder
from gcpo_lightning.components.adjusters.similarity import Euclidean, Gaussian
from gcpo_lightning.functional.causal import causal_target, causal_weights, projected_reference_probs
from gcpo_lightning.functional.losses import k3
from gcpo_lightning.interfaces.containers import CausalGraph, PenaltyInputs


class _Rollout:
    group_size = 2


def test_causal_weight_by_hand():
    # G = 2, D = 2, M = 2.  z_0 = (1, 0), z_1 = (0, 1), so zbar = (0.5, 0.5).
    # i = 0: Zbar_{0,0} = (1, 1), Zbar_{0,1} = (1, -1) -> Zbar'_0 = (1, 0)
    #        target_0 = (1, 1) - (1, 0) + (0.5, 0.5) = (0.5, 1.5);  cos(z_0, target_0) = 0.5 / sqrt(2.5) = 0.316228
    # i = 1: Zbar_{1,0} = (0, 2), Zbar_{1,1} = (2, 0) -> Zbar'_1 = (1, 1)
    #        target_1 = (0, 2) - (1, 1) + (0.5, 0.5) = (-0.5, 1.5); cos(z_1, target_1) = 1.5 / sqrt(2.5) = 0.948683
    # alpha = 2: U = (0.632456, 1.897367).
    # Rewards (1, 0): A = +-0.5 / std, std = sqrt(0.5) -> A = (0.707107, -0.707107)
    # B = A * U = (0.447214, -1.341641)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ctx = torch.tensor([[[1.0, 1.0], [1.0, -1.0]], [[0.0, 2.0], [2.0, 0.0]]])
    torch.testing.assert_close(causal_target(z, ctx, 2), torch.tensor([[0.5, 1.5], [-0.5, 1.5]]))
    graph = CausalGraph(group_size=2, representations=z, context_representations=ctx)
    out = CausalAdvantage(alpha=2.0, eps=0.0).adjust(torch.tensor([1.0, 0.0]), _Rollout(), graph)
    torch.testing.assert_close(out.values, torch.tensor([0.447214, -1.341641]), atol=1e-5, rtol=0)
    assert out.metrics["causal_weight/min"] == pytest.approx(0.632456, abs=1e-5)
    assert out.metrics["causal_weight/frac_negative"] == 0.0


def test_single_integrated_output_collapses_to_zbar():
    # M = 1: Zbar_i - Zbar'_i = 0, so U_i = alpha * cos(z_i, zbar).  z = (1, 0), (0, 1): zbar = (.5, .5),
    # cos = 0.5 / sqrt(0.5) = 0.707107 for both, U = 1.414214.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ctx = torch.tensor([[[3.0, -7.0]], [[0.1, 9.0]]])  # anything: it cancels
    u = causal_weights(z, causal_target(z, ctx, 2), alpha=2.0)
    torch.testing.assert_close(u, torch.full((2,), 2 * math.sqrt(0.5)))
    no_collider = causal_weights(z, causal_target(z, None, 2), alpha=2.0)
    torch.testing.assert_close(no_collider, u)


def test_equal_rewards_give_zero_causal_advantage():
    z = torch.randn(4, 3)
    graph = CausalGraph(group_size=4, representations=z, context_representations=torch.randn(4, 2, 3))
    out = CausalAdvantage().adjust(torch.ones(4), type("R", (), {"group_size": 4})(), graph)
    assert out.values.abs().max().item() == 0.0


@pytest.mark.parametrize(("similarity", "expected"), [(Euclidean(), 1 / (1 + 1.0)), (Gaussian(1.0), math.exp(-0.5))])
def test_other_similarities(similarity, expected):
    # z = (1, 1), target = (2, 2): distance sqrt(2), D = 2 -> distance / sqrt(D) = 1
    # euclidean: 1 / (1 + 1) = 0.5;  gaussian (sigma 1): exp(-2 / (2 * 2)) = exp(-0.5)
    u = causal_weights(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 2.0]]), 1.0, similarity)
    assert u.item() == pytest.approx(expected)


def test_projected_reference_and_k3_by_hand():
    # p'_ref = p_x - p_phi + p_q = (0.5-0.3+0.2, 0.1-0.6+0.3, 0.9-0.2+0.5) = (0.4, -0.2, 1.2) -> clamp (0.4, 1e-6, 1)
    p_x, p_phi, p_q = torch.tensor([[0.5, 0.1, 0.9]]), torch.tensor([[0.3, 0.6, 0.2]]), torch.tensor([[0.2, 0.3, 0.5]])
    p_ref, clamped = projected_reference_probs(p_x, p_phi, p_q)
    torch.testing.assert_close(p_ref, torch.tensor([[0.4, 1e-6, 1.0]]))
    assert clamped.tolist() == [[False, True, True]]
    # with pi_theta(y | x_i) = 0.5: u = (0.8, 2e-6, 2);  k3 = u - ln u - 1 = (0.023144, 12.122365, 0.306853)
    kl = k3(p_ref.log() - math.log(0.5))
    torch.testing.assert_close(kl, torch.tensor([[0.023144, 12.122365, 0.306853]]), atol=1e-5, rtol=0)


def test_bad_builder_settings():
    with pytest.raises(ValueError, match="num_integrated"):
        ColliderGraphBuilder(num_integrated=0)
    with pytest.raises(ValueError, match="num_context_samples"):
        ColliderGraphBuilder(num_context_samples=-1)
    for no_samples_but in ({"context_layout": "set"}, {"keep_context_cache": True}):
        with pytest.raises(ValueError, match="num_context_samples: 0"):
            ColliderGraphBuilder(num_context_samples=0, **no_samples_but)
    with pytest.raises(ValueError, match=r"context_template is missing placeholder\(s\) \['\{others\}'\]"):
        ColliderGraphBuilder(context_template="{question} {integrated}")
    with pytest.raises(ValueError, match="integration_template"):
        ColliderGraphBuilder(integration_template="{question}")


def test_causal_ratio_cap_bounds_the_penalty_and_its_gradient():
    from types import SimpleNamespace

    from gcpo_lightning.interfaces.containers import Scores

    # p'_ref = 0.5, pi_theta(y | x_i) = 0.001: u = 500, k3 = 500 - ln 500 - 1 = 492.785
    # capped at max_ratio 10: k3(10) = 10 - ln 10 - 1 = 6.697415, and no gradient through the capped token
    logps_x = torch.full((1, 1), math.log(0.001), requires_grad=True)
    prepared = PenaltyInputs(
        causal_ref_logps=torch.full((1, 1), math.log(0.5)), causal_clamped=torch.zeros(1, 1, dtype=torch.bool)
    )
    rollout = SimpleNamespace(completion_mask=torch.ones(1, 1))
    for cap, expected in [(None, 500 - math.log(500) - 1), (10.0, 10 - math.log(10) - 1)]:
        kl = CausalProjectedKL(beta=0.0, kappa=1.0, policy_context="query", max_ratio=cap)
        out = kl.penalty(Scores(logps=logps_x), rollout, prepared, None)
        assert out.per_token.item() == pytest.approx(expected, rel=1e-5)
        (grad,) = torch.autograd.grad(out.per_token.sum(), logps_x)
        assert (grad.item() == 0.0) == (cap is not None)
    with pytest.raises(ValueError, match="max_ratio"):
        CausalProjectedKL(max_ratio=1.0)


def test_graph_structure_names_the_collider():
    independent = CausalGraph(group_size=2).structure()
    assert independent["edges"] == [("q", "y_0"), ("q", "y_1")] and independent["contexts"] == {}
    graph = CausalGraph(group_size=3, integrated=[["a", "b"]])
    s = graph.structure()
    assert ("y_2", "y_n,1") in s["edges"] and ("q", "y_n,0") in s["edges"]
    assert s["contexts"]["x_1,0"] == ["q", "y_0", "y_2", "y_n,0"]
    assert len(s["contexts"]) == 6
