"""GCPO's components on a tiny model: the collider builder's contexts, GCPO without its causal terms equals GRPO,
shared-prefix context scoring, and micro-batch accumulation (the hand-computed maths is in unit/test_causal.py)."""

from __future__ import annotations

import pytest
import torch

from gcpo_lightning import (
    CausalAdvantage,
    CausalProjectedKL,
    ColliderGraphBuilder,
    GroupNormalizedAdvantage,
    IndependentResponses,
    ReferenceKL,
)
from gcpo_lightning.components.aggregation import ConstantNormalizer, SequenceMean, TokenMean
from gcpo_lightning.functional.batching import micro_batches


def _rollout(module, G=3, B=2):
    module.configure_model()
    models = module.models()
    rows = [{"prompt": f"Problem: {q}\nSolution:", "question": q, "answer": "0"} for q in ["1+2", "3+4+5"][:B]]
    rollout = module.sampler.sample(models, module.prompts_for(rows), G)
    rollout.rows = rows
    return rollout, models


def test_builder_contexts_hold_the_right_nodes(make_module, tiny_model_dir):
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


@pytest.mark.slow
def test_gcpo_without_weighting_and_causal_kl_equals_grpo(make_module, tiny_model_dir):
    grpo = make_module(
        tiny_model_dir,
        graph_builder=IndependentResponses(),
        adjuster=GroupNormalizedAdvantage(),
        kl=ReferenceKL(beta=0.04),
        num_generations=4,
    )
    rollout, models = _rollout(grpo, G=4)
    gcpo = make_module(
        tiny_model_dir,
        graph_builder=ColliderGraphBuilder(num_integrated=2),
        adjuster=GroupNormalizedAdvantage(),
        kl=CausalProjectedKL(beta=0.04, kappa=0.0),
        num_generations=4,
    )
    gcpo.configure_model()
    gcpo_models = gcpo.models()
    loss_a, grads_a = _loss_and_grads(grpo, rollout, models)
    loss_b, grads_b = _loss_and_grads(gcpo, rollout, gcpo_models)
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
    # and the full GCPO differs: the causal terms are live
    full = make_module(
        tiny_model_dir,
        graph_builder=ColliderGraphBuilder(num_integrated=2),
        adjuster=CausalAdvantage(),
        kl=CausalProjectedKL(beta=0.04, kappa=0.06),
        num_generations=4,
    )
    full.configure_model()
    loss_c, _ = _loss_and_grads(full, rollout, full.models())
    assert not torch.allclose(loss_a, loss_c)


def test_shared_prefix_context_probs_equal_plain(make_module, tiny_model_dir):
    from gcpo_lightning.components.penalties.causal_kl import context_probs, context_probs_shared

    module = make_module(tiny_model_dir, num_generations=3, graph_builder=ColliderGraphBuilder(num_integrated=3))
    rollout, models = _rollout(module, G=3)
    graph = module.graph_builder.build(rollout, models, module.sampler)
    plain = context_probs(rollout, graph, models, batch_size=4)  # [N, M, T]
    shared = context_probs_shared(rollout, graph, models, batch_size=4)  # [N, M, T]
    mask = rollout.completion_mask.unsqueeze(1).bool().expand_as(plain)
    torch.testing.assert_close(shared[mask], plain[mask], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["rows", "tokens"])
@pytest.mark.parametrize("loss", [SequenceMean(), TokenMean(), ConstantNormalizer()], ids=lambda a: a.name)
def test_micro_batches_accumulate_to_the_full_gradient(make_module, tiny_model_dir, loss, split):
    """Splitting a step into micro-batches gives the full batch's gradient (GCPO components, causal KL on x_i),
    whether micro_batch_size sets the rows or micro_batch_tokens bounds rows x the longest sequence (x_i's)."""
    from gcpo_lightning.training.update import micro_batch_rows

    kwargs = dict(
        graph_builder=ColliderGraphBuilder(num_integrated=2),
        adjuster=CausalAdvantage(),
        kl=CausalProjectedKL(),
        num_generations=3,
        loss=loss,
    )
    full, micro = make_module(tiny_model_dir, **kwargs), make_module(tiny_model_dir, micro_batch_size=2, **kwargs)
    rollout, models = _rollout(full, G=3)
    graph = full.graph_builder.build(rollout, models, full.sampler)
    rewards, _ = full.score_rewards(rollout)
    adv = full.adjuster.adjust(rewards, rollout, graph).values
    prepared = full.kl.prepare(rollout, graph, models)
    if split == "tokens":  # room for 2 rows of x_i + completion, the longest sequence of the pass: 2 rows
        micro.micro_batch_size = None
        micro.micro_batch_tokens = 2 * (prepared.context_ids.shape[1] + rollout.completion_ids.shape[1]) + 1
    assert micro_batch_rows(full, rollout, prepared) is None and micro_batch_rows(micro, rollout, prepared) == 2
    grads = []
    for module in (full, micro):
        module.configure_model()
        module.policy.load_state_dict(full.policy.state_dict())
        module.policy.zero_grad()
        for index, weight in module.loss.micro_batches(
            rollout.completion_mask, micro_batch_rows(module, rollout, prepared)
        ):
            value, _ = module.compute_loss(rollout.select(index), adv[index], prepared.select(index), module.models())
            (value * weight).backward()
        grads.append({n: p.grad.clone() for n, p in module.policy.named_parameters()})
    assert len(micro_batches(rollout.completion_mask, micro_batch_rows(micro, rollout, prepared), False)) == 3
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)
