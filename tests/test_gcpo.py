"""GCPO's components: hand-computed weights and projected KL, the builder's contexts, and GRPO equivalence."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from test_module import fit, logged_rows, make_module

from gcpo_lightning import (
    CausalAdvantage,
    CausalProjectedKL,
    ColliderGraphBuilder,
    GroupNormalizedAdvantage,
    IndependentResponses,
    ReferenceKL,
)
from gcpo_lightning.components.adjusters.similarity import Euclidean, Gaussian
from gcpo_lightning.components.aggregation import ConstantNormalizer, SequenceMean, TokenMean
from gcpo_lightning.functional.batching import micro_batches
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
    # alpha = 2: U = (0.632456, 1.897367).  Rewards (1, 0): A = +-0.5 / std, std = sqrt(0.5) -> A = (0.707107, -0.707107)
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
        ColliderGraphBuilder(num_context_samples=0)
    with pytest.raises(ValueError, match=r"context_template is missing placeholder\(s\) \['\{others\}'\]"):
        ColliderGraphBuilder(context_template="{question} {integrated}")
    with pytest.raises(ValueError, match="integration_template"):
        ColliderGraphBuilder(integration_template="{question}")


def _rollout(module, G=3, B=2):
    module.configure_model()
    models = module.models()
    rows = [{"prompt": f"Problem: {q}\nSolution:", "question": q, "answer": "0"} for q in ["1+2", "3+4+5"][:B]]
    rollout = module.sampler.sample(models, module.prompts_for(rows), G)
    rollout.rows = rows
    return rollout, models


def test_builder_contexts_hold_the_right_nodes(tiny_model_dir):
    G, M, K = 3, 2, 1
    builder = ColliderGraphBuilder(num_integrated=M, num_context_samples=K)
    module = make_module(tiny_model_dir, num_generations=G, graph_builder=builder)
    rollout, models = _rollout(module, G)
    rollout.completions = [f" cand{n}" for n in range(len(rollout.completions))]  # unmistakable texts
    graph = builder.build(rollout, models, module.sampler)
    B, N = 2, 2 * G
    assert len(graph.integrated) == B and all(len(y) == M for y in graph.integrated)
    assert graph.context_representations.shape == (N, M, rollout.hidden.shape[1])
    assert graph.context_ids.shape[:2] == (N, M)
    assert len(graph.context_samples) == N * M * K
    for b in range(B):
        for i in range(G):
            for l_ in range(M):
                x = graph.context_prompts[b][i][l_]
                assert f" cand{b * G + i}" not in x, "x_{i,l} must not contain y_i"
                assert all(f" cand{b * G + k}" in x for k in range(G) if k != i)
                assert not any(f" cand{c}" in x for c in range(N) if c // G != b), "no other group's candidates"
                assert f"Combined solution:{graph.integrated[b][l_]}\n" in x
                assert x.startswith(f"Problem: {rollout.rows[b]['question']}\n")


def test_context_too_long_is_reported_before_training(tiny_model_dir, tmp_path):
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


def _loss_and_grads(module, rollout, models):
    torch.manual_seed(123)
    graph = module.graph_builder.build(rollout, models, module.sampler)
    rewards, _ = module.score_rewards(rollout)
    adv = module.adjuster.adjust(rewards, rollout, graph)
    prepared = module.kl.prepare(rollout, graph, models)
    module.policy.zero_grad()
    loss, *_ = module.compute_loss(rollout, adv.values, prepared, models)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.policy.named_parameters()}


def test_gcpo_without_weighting_and_causal_kl_equals_grpo(tiny_model_dir):
    grpo = make_module(tiny_model_dir, graph_builder=IndependentResponses(), adjuster=GroupNormalizedAdvantage(),
                       kl=ReferenceKL(beta=0.04), num_generations=4)
    rollout, models = _rollout(grpo, G=4)
    gcpo = make_module(tiny_model_dir, graph_builder=ColliderGraphBuilder(num_integrated=2),
                       adjuster=GroupNormalizedAdvantage(), kl=CausalProjectedKL(beta=0.04, kappa=0.0),
                       num_generations=4)
    gcpo.configure_model()
    gcpo_models = gcpo.models()
    loss_a, grads_a = _loss_and_grads(grpo, rollout, models)
    loss_b, grads_b = _loss_and_grads(gcpo, rollout, gcpo_models)
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
    # and the full GCPO differs: the causal terms are live
    full = make_module(tiny_model_dir, graph_builder=ColliderGraphBuilder(num_integrated=2), adjuster=CausalAdvantage(),
                       kl=CausalProjectedKL(beta=0.04, kappa=0.06), num_generations=4)
    full.configure_model()
    loss_c, _ = _loss_and_grads(full, rollout, full.models())
    assert not torch.allclose(loss_a, loss_c)


@pytest.mark.parametrize("policy_context", ["context", "query"])
def test_gcpo_fits_end_to_end(tiny_model_dir, tmp_path, policy_context):
    L.seed_everything(0)
    from gcpo_lightning.policy.loading import load_causal_lm

    before = load_causal_lm(str(tiny_model_dir)).state_dict()
    module = make_module(tiny_model_dir, graph_builder=ColliderGraphBuilder(num_integrated=2, num_context_samples=2),
                         adjuster=CausalAdvantage(), kl=CausalProjectedKL(policy_context=policy_context),
                         num_generations=3, mini_batch_size=3)
    trainer = fit(module, tmp_path, steps=2)
    after = module.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logged = {k for row in logged_rows(trainer) for k, v in row.items() if v != ""}
    expected = {"causal_kl", "causal_clamped_frac", "causal_weight/mean", "causal_weight/min", "causal_weight/max",
                "causal_weight/frac_negative", "kl", "timing/integration", "timing/context_generation",
                "timing/context_representation", "loss"}
    assert expected <= logged, expected - logged


def test_shared_prefix_context_probs_equal_plain(tiny_model_dir):
    from gcpo_lightning.components.penalties.causal_kl import context_probs, context_probs_shared

    module = make_module(tiny_model_dir, num_generations=3, graph_builder=ColliderGraphBuilder(num_integrated=3))
    rollout, models = _rollout(module, G=3)
    graph = module.graph_builder.build(rollout, models, module.sampler)
    plain = context_probs(rollout, graph, models, batch_size=4)  # [N, M, T]
    shared = context_probs_shared(rollout, graph, models, batch_size=4)  # [N, M, T]
    mask = rollout.completion_mask.unsqueeze(1).bool().expand_as(plain)
    torch.testing.assert_close(shared[mask], plain[mask], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss", [SequenceMean(), TokenMean(), ConstantNormalizer()], ids=lambda a: a.name)
def test_micro_batches_accumulate_to_the_full_gradient(tiny_model_dir, loss):
    """Splitting a step into micro-batches gives the full batch's gradient (GCPO components, causal KL on x_i)."""
    kwargs = dict(graph_builder=ColliderGraphBuilder(num_integrated=2), adjuster=CausalAdvantage(),
                  kl=CausalProjectedKL(), num_generations=3, loss=loss)
    full, micro = make_module(tiny_model_dir, **kwargs), make_module(tiny_model_dir, micro_batch_size=2, **kwargs)
    rollout, models = _rollout(full, G=3)
    graph = full.graph_builder.build(rollout, models, full.sampler)
    rewards, _ = full.score_rewards(rollout)
    adv = full.adjuster.adjust(rewards, rollout, graph).values
    prepared = full.kl.prepare(rollout, graph, models)
    grads = []
    for module in (full, micro):
        module.configure_model()
        module.policy.load_state_dict(full.policy.state_dict())
        module.policy.zero_grad()
        for index, weight in module.loss.micro_batches(rollout.completion_mask, module.micro_batch_size):
            value, _ = module.compute_loss(rollout.select(index), adv[index], prepared.select(index), module.models())
            (value * weight).backward()
        grads.append({n: p.grad.clone() for n, p in module.policy.named_parameters()})
    assert len(micro_batches(rollout.completion_mask, micro.micro_batch_size, False)) == 3
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)


def test_causal_ratio_cap_bounds_the_penalty_and_its_gradient():
    from types import SimpleNamespace

    from gcpo_lightning.interfaces.containers import Scores

    # p'_ref = 0.5, pi_theta(y | x_i) = 0.001: u = 500, k3 = 500 - ln 500 - 1 = 492.785
    # capped at max_ratio 10: k3(10) = 10 - ln 10 - 1 = 6.697415, and no gradient through the capped token
    logps_x = torch.full((1, 1), math.log(0.001), requires_grad=True)
    prepared = PenaltyInputs(causal_ref_logps=torch.full((1, 1), math.log(0.5)), causal_clamped=torch.zeros(1, 1, dtype=torch.bool))
    rollout = SimpleNamespace(completion_mask=torch.ones(1, 1))
    for cap, expected in [(None, 500 - math.log(500) - 1), (10.0, 10 - math.log(10) - 1)]:
        kl = CausalProjectedKL(beta=0.0, kappa=1.0, policy_context="query", max_ratio=cap)
        out = kl.penalty(Scores(logps=logps_x), rollout, prepared, None)
        assert out.per_token.item() == pytest.approx(expected, rel=1e-5)
        grad, = torch.autograd.grad(out.per_token.sum(), logps_x)
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
