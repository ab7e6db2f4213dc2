"""Issue 10 ("GCPO you can afford"): every cheaper path of the GCPO step against the textual-context path.

- generation with a preallocated KV cache equals the growing cache (same tokens, sampled with a fixed seed);
- shared-prefix generation (prefix prefilled once, KV cache forked to the rows that share it) equals one
  independent prompt per row: same tokens under greedy decoding and with a fixed seed, and the collider's graph
  (integrated outputs, context samples, ``Zbar``) is the same with ``share_prefix`` on and off;
- dropping finished rows from the decoding batch (``compact``) gives the same tokens, sampled or greedy;
- ``p(y_i | x_{i,l})`` scored on the KV cache of context generation (``score_candidates``) equals the causal KL's
  own packed pass, and so does everything the causal KL prepares from it.
"""

from __future__ import annotations

import pytest
import torch

from gcpo_lightning import ColliderGraphBuilder, GroupSampler
from gcpo_lightning.components.sampling.backends import HFGenerate
from gcpo_lightning.components.sampling.decoding import decode, decode_shared_prefix
from gcpo_lightning.components.sampling.group_sampler import completion_mask_from_eos
from gcpo_lightning.policy.loading import ASSETS, load_causal_lm, load_tokenizer

pytestmark = pytest.mark.usefixtures("own_random_stream")  # these tests seed torch's generator


def _model(model_dir):
    return load_causal_lm(str(model_dir)).eval(), load_tokenizer(str(model_dir))


def test_preallocated_cache_gives_the_same_tokens(tiny_model_dir):
    model, tok = _model(tiny_model_dir)
    enc = tok(
        ["Problem: 1+2\nSolution:", "Problem: 3+4+5-6\nSolution:"] * 3,
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    runs = []
    for preallocate in (False, True):
        torch.manual_seed(0)
        runs.append(
            decode(
                model,
                enc["input_ids"],
                enc["attention_mask"],
                12,
                [tok.eos_token_id],
                tok.pad_token_id,
                temperature=1.0,
                preallocate=preallocate,
            )
        )
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("greedy", [True, False])
def test_compacting_finished_rows_gives_the_same_tokens(greedy):
    # the shipped arithmetic model: it writes EOS after solutions of different lengths (the random test model does not)
    model, tok = _model(ASSETS / "tiny-arith")
    prompts = ["Problem: 1+2\nSolution:", "Problem: 3+4-5*2+8\nSolution:", "Problem: 9-1\nSolution:"] * 4
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    stops = [tok.eos_token_id]
    runs = []
    for compact in (None, 0.1, 1.0):
        torch.manual_seed(2)
        runs.append(
            decode(
                model,
                enc["input_ids"],
                enc["attention_mask"],
                40,
                stops,
                tok.pad_token_id,
                greedy=greedy,
                compact=compact,
            )
        )
    lengths = completion_mask_from_eos(runs[0], stops)[0].sum(1)
    assert lengths.min() < lengths.max(), "rows must finish at different steps for the test to mean anything"
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_shared_prefix_decode_equals_full_prompts(tiny_model_dir):
    model, tok = _model(tiny_model_dir)
    prefixes = ["Problem: 12+7\nOther solutions:\n[1] 19", "Problem: 3*3-1\nOther solutions:\n[2] 8 or so"]
    suffixes = [[" A", " BBBBB\nC"], [" 8", "\nCombined solution: 9"]]
    full = [p + s for p, ss in zip(prefixes, suffixes) for s in ss]
    enc = tok(full, return_tensors="pt", padding=True, add_special_tokens=False)
    pre = tok(prefixes, return_tensors="pt", padding=True, add_special_tokens=False)
    suf = tok([s for ss in suffixes for s in ss], return_tensors="pt", padding=True, add_special_tokens=False)
    owner = torch.tensor([0, 0, 1, 1])
    for greedy in (True, False):
        torch.manual_seed(1)
        ref = decode(
            model, enc["input_ids"], enc["attention_mask"], 10, [tok.eos_token_id], tok.pad_token_id, greedy=greedy
        )
        torch.manual_seed(1)
        ours, _ = decode_shared_prefix(
            model,
            pre["input_ids"],
            pre["attention_mask"],
            suf["input_ids"],
            suf["attention_mask"],
            owner,
            10,
            [tok.eos_token_id],
            tok.pad_token_id,
            greedy=greedy,
        )
        assert torch.equal(ref, ours), greedy


def test_sample_shared_equals_sample(make_module, tiny_model_dir):
    module = make_module(tiny_model_dir)
    module.configure_model()
    models = module.models()
    groups = [
        ["Problem: 1+2\nOther: [1] 3\nCombined: 3\nNow:", "Problem: 1+2\nOther: [1] 3\nCombined: 4 maybe\nNow:"],
        ["Problem: 5-5\nOther: [2] 0\nCombined: 0\nNow:", "Problem: 5-5\nOther: [2] 0\nCombined:\nNow:"],
    ]
    flat = [p for g in groups for p in g]
    for sampler in (
        GroupSampler(max_completion_length=8, generation_batch_size=6),
        GroupSampler(max_completion_length=8, backend=HFGenerate()),
    ):
        torch.manual_seed(3)
        ref = sampler.sample(models, flat, 3, score=True)
        torch.manual_seed(3)
        ours = sampler.sample_shared(models, groups, 3, score=True)
        assert torch.equal(ref.prompt_ids, ours.prompt_ids)
        assert torch.equal(ref.completion_ids, ours.completion_ids)
        assert ref.completions == ours.completions
        torch.testing.assert_close(ref.old_logps, ours.old_logps)


def test_collider_share_prefix_builds_the_same_graph(make_module, tiny_model_dir):
    G, M, K = 3, 2, 2
    rows = [{"prompt": f"Problem: {q}\nSolution:", "question": q, "answer": "0"} for q in ["1+2", "3+4+5"]]
    graphs = []
    for share in (False, True):
        builder = ColliderGraphBuilder(num_integrated=M, num_context_samples=K, share_prefix=share)
        module = make_module(
            tiny_model_dir,
            num_generations=G,
            graph_builder=builder,
            sampler=GroupSampler(max_completion_length=8, generation_batch_size=8),
        )
        module.configure_model()
        models = module.models()
        torch.manual_seed(0)
        rollout = module.sampler.sample(models, module.prompts_for(rows), G)
        rollout.rows = rows
        graphs.append(builder.build(rollout, models, module.sampler))
    plain, shared = graphs
    assert plain.integrated == shared.integrated
    assert plain.context_samples == shared.context_samples
    assert torch.equal(plain.context_ids, shared.context_ids)
    torch.testing.assert_close(plain.context_representations, shared.context_representations)
    assert shared.metrics["tokens_per_s/context_generation"] > 0
    assert plain.context_logps is None and shared.context_logps is not None


def _collider_graph(make_module, model_dir, G: int, M: int, K: int, **module_args):
    """``(graph, rollout, models)``: a 2-question rollout (seed 0, 8 tokens, T = 0.7, 5 rows per generation call)
    and its collider graph with ``M`` integrated outputs and ``K`` samples per context."""
    rows = [{"prompt": f"Problem: {q}\nSolution:", "question": q, "answer": "0"} for q in ["1+2", "3+4+5"]]
    module = make_module(
        model_dir,
        num_generations=G,
        graph_builder=ColliderGraphBuilder(num_integrated=M, num_context_samples=K),
        sampler=GroupSampler(max_completion_length=8, generation_batch_size=5, temperature=0.7),
        **module_args,
    )
    module.configure_model()
    models = module.models()
    torch.manual_seed(0)
    rollout = module.sampler.sample(models, module.prompts_for(rows), G)
    rollout.rows = rows
    return module.graph_builder.build(rollout, models, module.sampler), rollout, models


def test_candidates_scored_during_context_generation_equal_the_packed_pass(make_module, tiny_model_dir):
    from gcpo_lightning import CausalProjectedKL
    from gcpo_lightning.components.penalties.causal_kl import context_probs, context_probs_shared

    G, M, K = 3, 2, 2
    # 5 rows a call: whole candidates (M*K = 4 rows) per chunk, so the scored continuations span chunks
    graph, rollout, models = _collider_graph(make_module, tiny_model_dir, G, M, K)
    assert graph.context_logps is not None and graph.context_logps.shape == (G * 2, M, rollout.completion_ids.shape[1])
    mask = rollout.completion_mask.bool().unsqueeze(1).expand(-1, M, -1)  # [N, M, T]
    for reference in (context_probs_shared, context_probs):
        p = reference(rollout, graph, models, 4)  # [N, M, T] the causal KL's own pass
        torch.testing.assert_close(graph.context_logps.exp()[mask], p[mask], atol=1e-5, rtol=1e-5)
    kl = CausalProjectedKL(beta=0.0, kappa=0.06)
    ours = kl.prepare(rollout, graph, models)
    graph.context_logps = None  # the KL now scores the contexts itself
    theirs = kl.prepare(rollout, graph, models)
    torch.testing.assert_close(ours.causal_ref_logps, theirs.causal_ref_logps, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.causal_clamped, theirs.causal_clamped)


def test_frozen_prefix_scores_equal_the_full_pass(tiny_model_dir):
    from gcpo_lightning.components.scoring.logprobs import score_after_frozen_prefix, score_completions

    model, tok = _model(tiny_model_dir)
    ctx = tok(
        ["Problem: 1+2\nOther solutions:\n[2] 3\nNow:", "Problem: 3+4\nNow:"],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    ys = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    y_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    for chunk in (None, 2):
        full = score_completions(
            model, ctx["input_ids"], ctx["attention_mask"], ys, y_mask, temperature=0.7, logits_chunk_size=chunk
        ).logps
        frozen = score_after_frozen_prefix(model, ctx["input_ids"], ctx["attention_mask"], ys, y_mask, 0.7, chunk)
        torch.testing.assert_close(frozen[y_mask.bool()], full[y_mask.bool()], atol=1e-5, rtol=1e-5)
        norm = model.model.norm.weight
        (g_full,) = torch.autograd.grad(full[y_mask.bool()].sum(), norm)
        (g_frozen,) = torch.autograd.grad(frozen[y_mask.bool()].sum(), norm)
        # the final norm sees the same inputs at y's positions: same gradient (earlier layers lose the path via x_i)
        torch.testing.assert_close(g_frozen, g_full, atol=1e-5, rtol=1e-4)


def test_frozen_context_attends_to_the_cache_kept_from_context_generation(make_module, tiny_model_dir):
    from gcpo_lightning import CausalProjectedKL
    from gcpo_lightning.components.scoring.logprobs import score_completions

    G, M, K = 3, 2, 2
    rows = [{"prompt": f"Problem: {q}\nSolution:", "question": q, "answer": "0"} for q in ["1+2", "3+4+5"]]
    builder = ColliderGraphBuilder(num_integrated=M, num_context_samples=K, keep_context_cache=True)
    module = make_module(
        tiny_model_dir,
        num_generations=G,
        graph_builder=builder,
        sampler=GroupSampler(max_completion_length=8, generation_batch_size=5),
    )
    module.configure_model()
    models = module.models()
    torch.manual_seed(0)
    rollout = module.sampler.sample(models, module.prompts_for(rows), G)
    rollout.rows = rows
    graph = builder.build(rollout, models, module.sampler)
    kl = CausalProjectedKL(beta=0.0, kappa=0.06, policy_context="context_frozen")
    prepared = kl.prepare(rollout, graph, models)
    assert prepared.context_cache is not None and prepared.context_cache.mask.shape[0] == G * 2
    scores = score_completions(models.policy, *rollout.scoring_inputs())
    mask = rollout.completion_mask.bool()
    cached = kl.policy_logps_on_context(scores, rollout, prepared, models)  # attends to the kept cache
    encoded = kl.policy_logps_on_context(scores, rollout, prepared.after_update(), models)  # encodes x_i again
    torch.testing.assert_close(cached[mask], encoded[mask], atol=1e-5, rtol=1e-5)
    params = [p for p in models.policy.parameters() if p.requires_grad]
    g_cached = torch.autograd.grad(cached[mask].sum(), params, allow_unused=True)
    g_encoded = torch.autograd.grad(encoded[mask].sum(), params, allow_unused=True)
    for a, b in zip(g_cached, g_encoded):  # the same gradient: both drop the path through x_i's keys and values
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    index = torch.tensor([4, 1])  # a micro-batch: the cache rows follow the selection
    picked = kl.policy_logps_on_context(scores, rollout.select(index), prepared.select(index), models)
    torch.testing.assert_close(picked[mask[index]], cached[index][mask[index]], atol=1e-5, rtol=1e-5)


def test_no_context_samples_gives_the_causal_kl_the_same_contexts_and_inputs(make_module, tiny_model_dir):
    # K = 0 (the "without causal weighting" ablation reads no Zbar): the contexts are only encoded, and the causal
    # KL gets the same x_{i,l} token ids and the same p'_ref as from the contexts the samples were generated after
    from gcpo_lightning import CausalProjectedKL, GroupNormalizedAdvantage

    G, M = 3, 2
    graphs = {
        K: _collider_graph(make_module, tiny_model_dir, G, M, K, adjuster=GroupNormalizedAdvantage()) for K in (1, 0)
    }
    (with_samples, rollout, models), (without, _, _) = graphs[1], graphs[0]
    assert without.integrated == with_samples.integrated  # the integration is sampled first, with the same seed
    assert without.context_representations is None and without.context_samples == []
    assert not ColliderGraphBuilder(num_context_samples=0).needs_representations
    for n in range(rollout.completion_ids.shape[0]):
        for m in range(M):
            ours, theirs = (g.context_ids[n, m][g.context_mask[n, m].bool()] for g in (without, with_samples))
            assert torch.equal(ours, theirs)
    kl = CausalProjectedKL(beta=0.0, kappa=0.06)
    a, b = kl.prepare(rollout, with_samples, models), kl.prepare(rollout, without, models)
    real = rollout.completion_mask.bool()  # [N, T] (padding is masked out of every loss)
    torch.testing.assert_close(b.causal_ref_logps[real], a.causal_ref_logps[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(a.causal_clamped[real], b.causal_clamped[real])
    assert torch.equal(a.context_ids, b.context_ids)  # x_i of the gradient pass
