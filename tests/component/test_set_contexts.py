"""GCPO's contexts read as sets (``ColliderGraphBuilder(context_layout="set")``, a **[decision]**).

- the attention rules, on a hand-written block;
- read in order, the set contexts are the textual contexts' tokens;
- with two candidates a context sees one line only, so set attention is plain causal attention: the packed pass
  equals a plain forward over the context's tokens with the set layout's positions (an independent reference);
- ``p(y_i | x_{i,l})`` scored during set generation (on the gathered KV cache) equals the packed pass;
- packing several branches into one sequence changes neither the values nor the gradient;
- the causal KL's gradient pass on ``x_i`` (packed per group) equals, at the rollout policy, the scores of context
  generation, and follows the micro-batch selection;
- bad settings fail at construction, naming what is wrong.
"""

from __future__ import annotations

import pytest
import torch

from gcpo_lightning import CausalProjectedKL, ColliderGraphBuilder, GroupSampler
from gcpo_lightning.components.penalties.causal_kl import context_probs_set
from gcpo_lightning.components.scoring.logprobs import score_completions
from gcpo_lightning.components.scoring.set_scoring import packed_set_logps, set_context_logps
from gcpo_lightning.functional.set_attention import BRANCH, PAD, SHARED, set_attention_allowed

pytestmark = pytest.mark.usefixtures("own_random_stream")  # these tests seed torch's generator

ROWS = [{"prompt": f"Problem: {q}\nSolution:", "question": q, "answer": "0"} for q in ["1+2", "3+4+5"]]


def test_set_attention_rules_on_a_hand_written_block():
    # tokens: P P L0 L0 L1 L1 | branch 0 (hides line 0): b b | branch 1 (hides line 1): c | pad
    line = torch.tensor([[SHARED, SHARED, 0, 0, 1, 1, BRANCH, BRANCH, BRANCH, PAD]])
    hidden = torch.tensor([[-1, -1, -1, -1, -1, -1, 0, 0, 1, -1]])
    branch = torch.tensor([[-1, -1, -1, -1, -1, -1, 0, 0, 1, -1]])
    allowed = set_attention_allowed(line, hidden, branch)[0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # P: causal over P
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # L0: P and itself
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0, 0, 0, 0],  # L1: P and itself, not L0
            [1, 1, 0, 0, 1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 1, 1, 1, 0, 0, 0],  # branch 0: P, L1 (not L0), itself
            [1, 1, 0, 0, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 1, 0],  # branch 1: P, L0 (not L1), not branch 0, itself
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # padding: itself only
        ]
    )
    assert torch.equal(allowed, expected)


def _graph(make_module, model_dir, G=3, M=2, K=2, layout="set", batch=5, **builder_args):
    module = make_module(
        model_dir,
        num_generations=G,
        graph_builder=ColliderGraphBuilder(
            num_integrated=M, num_context_samples=K, context_layout=layout, **builder_args
        ),
        sampler=GroupSampler(max_completion_length=8, generation_batch_size=batch, temperature=0.7),
    )
    module.configure_model()
    models = module.models()
    torch.manual_seed(0)
    rollout = module.sampler.sample(models, module.prompts_for(ROWS), G)
    rollout.rows = ROWS
    return module, models, rollout


def test_set_contexts_read_in_order_are_the_textual_contexts(make_module, tiny_model_dir):
    module, models, rollout = _graph(make_module, tiny_model_dir)
    graphs = {}
    for layout in ("text", "set"):
        module.graph_builder.context_layout = layout
        torch.manual_seed(1)
        graphs[layout] = module.graph_builder.build(rollout, models, module.sampler)
    text, sets = graphs["text"], graphs["set"]
    assert sets.set_contexts is not None and text.set_contexts is None
    assert text.integrated == sets.integrated  # the same integration phase
    for n in range(text.context_ids.shape[0]):
        for m in range(text.context_ids.shape[1]):
            a = text.context_ids[n, m][text.context_mask[n, m].bool()]
            b = sets.context_ids[n, m][sets.context_mask[n, m].bool()]
            assert torch.equal(a, b), (n, m)


def test_two_candidates_set_scores_equal_a_plain_causal_pass(make_module, tiny_model_dir):
    # with G = 2 a context holds one line, which attends to P and itself: plain causal attention; only the
    # positions (a gap where the hidden line was) are the set layout's, and the reference passes them explicitly
    G, M = 2, 2
    module, models, rollout = _graph(make_module, tiny_model_dir, G=G, M=M, K=1)
    graph = module.graph_builder.build(rollout, models, module.sampler)
    sets = graph.set_contexts
    p = context_probs_set(rollout, sets, models)  # [N, M, T]
    for n in range(G * len(ROWS)):
        line = sets.block_line[n]
        visible = (line != PAD) & (line != sets.own[n])
        block_positions = torch.arange(line.shape[0])[visible]
        Lb = int((line != PAD).sum())
        y = rollout.completion_ids[n][rollout.completion_mask[n].bool()]
        for m in range(M):
            tail = sets.tail_ids[n, m][sets.tail_mask[n, m].bool()]
            ids = torch.cat([sets.block_ids[n][visible], tail, y]).unsqueeze(0)
            positions = torch.cat([block_positions, Lb + torch.arange(len(tail) + len(y))]).unsqueeze(0)
            with torch.no_grad():
                logits = models.policy(input_ids=ids, position_ids=positions).logits[0] / models.temperature
            start = ids.shape[1] - len(y) - 1
            ref = logits[start : start + len(y)].log_softmax(-1).gather(-1, y.unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(p[n, m, : len(y)].log(), ref, atol=1e-5, rtol=1e-5)


def test_scores_of_set_generation_equal_the_packed_pass(make_module, tiny_model_dir):
    module, models, rollout = _graph(make_module, tiny_model_dir)  # 5 rows a call: chunks of whole groups
    graph = module.graph_builder.build(rollout, models, module.sampler)
    assert graph.context_logps is not None
    M = graph.context_logps.shape[1]
    mask = rollout.completion_mask.bool().unsqueeze(1).expand(-1, M, -1)  # [N, M, T]
    packed = context_probs_set(rollout, graph.set_contexts, models)  # [N, M, T]
    torch.testing.assert_close(graph.context_logps.exp()[mask], packed[mask], atol=1e-5, rtol=1e-5)
    kl = CausalProjectedKL(beta=0.0, kappa=0.06)
    ours = kl.prepare(rollout, graph, models)
    graph.context_logps = None  # the KL now scores the contexts itself, packed
    theirs = kl.prepare(rollout, graph, models)
    real = rollout.completion_mask.bool()  # past a completion's end the values are arbitrary (masked in the loss)
    torch.testing.assert_close(ours.causal_ref_logps[real], theirs.causal_ref_logps[real], atol=1e-5, rtol=1e-5)


def test_the_two_pass_scores_equal_one_packed_sequence_per_group_values_and_gradient(make_module, tiny_model_dir):
    module, models, rollout = _graph(make_module, tiny_model_dir, K=1)
    graph = module.graph_builder.build(rollout, models, module.sampler)
    sets = graph.set_contexts
    rows = torch.tensor([4, 1, 5, 0, 2, 2])  # across groups, out of order, one candidate twice (two contexts)
    tails = torch.tensor([0, 1, 0, 1, 0, 1])
    ids, mask = rollout.completion_ids[rows], rollout.completion_mask[rows]
    real = mask.bool()
    params = [p for p in models.policy.parameters() if p.requires_grad]
    packed = packed_set_logps(models.policy, sets.select(rows), tails, ids, mask)  # branches masked from each other
    two_pass = set_context_logps(models.policy, sets.select(rows), tails, ids, mask)
    torch.testing.assert_close(two_pass[real], packed[real], atol=1e-5, rtol=1e-5)
    g_packed = torch.autograd.grad(packed[real].sum(), params)
    g_two_pass = torch.autograd.grad(two_pass[real].sum(), params)
    for a, b in zip(g_two_pass, g_packed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in g_packed)
    alone = torch.cat(  # one branch per sequence: packing several branches into one changes nothing
        [
            packed_set_logps(
                models.policy, sets.select(rows[r : r + 1]), tails[r : r + 1], ids[r : r + 1], mask[r : r + 1]
            )
            for r in range(len(rows))
        ]
    )
    torch.testing.assert_close(alone[real], packed[real], atol=1e-5, rtol=1e-5)


def test_causal_kl_pass_on_x_i_equals_the_generation_scores_and_follows_micro_batches(make_module, tiny_model_dir):
    module, models, rollout = _graph(make_module, tiny_model_dir)
    graph = module.graph_builder.build(rollout, models, module.sampler)
    kl = CausalProjectedKL(beta=0.0, kappa=0.06)
    prepared = kl.prepare(rollout, graph, models)
    assert prepared.set_contexts is not None
    scores = score_completions(models.policy, *rollout.scoring_inputs())
    mask = rollout.completion_mask.bool()
    logps = kl.policy_logps_on_context(scores, rollout, prepared, models)  # [N, T] with grad
    assert logps.requires_grad
    # the policy has not moved: pi_theta(y_i | x_i) is p_x = p(y_i | x_{i,0}) of context generation
    torch.testing.assert_close(logps[mask], graph.context_logps[:, 0][mask], atol=1e-5, rtol=1e-5)
    index = torch.tensor([4, 1, 5])  # a micro-batch across groups
    picked = kl.policy_logps_on_context(scores, rollout.select(index), prepared.select(index), models)
    torch.testing.assert_close(picked[mask[index]], logps[index][mask[index]], atol=1e-5, rtol=1e-5)


def test_bad_set_settings_fail_at_construction():
    with pytest.raises(ValueError, match="represent_in_context"):
        ColliderGraphBuilder(context_layout="set", represent_in_context=True)
    with pytest.raises(ValueError, match=r"\{others\}"):
        ColliderGraphBuilder(context_layout="set", context_template="{question} {others} {integrated}")
    with pytest.raises(ValueError, match="integrated"):
        ColliderGraphBuilder(context_layout="set", context_template="{question}{integrated}\n{others}\nGo:")
    with pytest.raises(ValueError, match="context_layout"):
        ColliderGraphBuilder(context_layout="tree")


def test_set_layout_needs_a_backend_that_can(make_module, tiny_model_dir):
    from gcpo_lightning.components.sampling.backends import HFGenerate

    module, models, rollout = _graph(make_module, tiny_model_dir)
    module.sampler.backend = HFGenerate()
    with pytest.raises(ValueError, match="KVCacheLoop"):
        module.graph_builder.build(rollout, models, module.sampler)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cascade_attention_equals_the_gathered_cache(make_module, temperature):
    # the shipped arithmetic model: rows end at different steps, so compaction drops rows from the shared blocks too
    from gcpo_lightning.policy.loading import ASSETS

    module, models, rollout = _graph(make_module, ASSETS / "tiny-arith", G=4, M=2, K=2, batch=20)
    _assert_cascade_equals_gathered(module, models, rollout, temperature)


def test_cascade_attention_with_grouped_query_heads(make_module, make_tiny_llama, tmp_path):
    # Qwen2's and Llama 3's layout: 2 KV heads for 4 query heads (each KV head's queries are merged together)
    module, models, rollout = _graph(make_module, make_tiny_llama(tmp_path, kv_heads=2), G=4, M=2, K=1, batch=4)
    assert models.policy.config.num_key_value_heads == 2
    _assert_cascade_equals_gathered(module, models, rollout, temperature=1.0, tokens=12)


def _assert_cascade_equals_gathered(module, models, rollout, temperature: float, tokens: int = 64) -> None:
    from gcpo_lightning.components.sampling import set_cascade
    from gcpo_lightning.components.sampling.backends import KVCacheLoop

    module.sampler.temperature = temperature
    module.sampler.max_completion_length = tokens
    assert set_cascade.supports_cascade(models.policy)
    graphs = []
    for cascade in (False, True):
        module.sampler.backend = KVCacheLoop(cascade=cascade)
        torch.manual_seed(3)
        graphs.append(module.graph_builder.build(rollout, models, module.sampler))
    gathered, cascaded = graphs
    assert models.policy.config._attn_implementation == "sdpa"  # switched back after generation
    assert cascaded.context_samples == gathered.context_samples
    if temperature > 0:  # sampled rows end at different steps: compaction drops rows from the shared blocks
        assert len({len(s) for s in cascaded.context_samples}) > 1
    real = rollout.completion_mask.bool().unsqueeze(1).expand_as(gathered.context_logps)
    torch.testing.assert_close(cascaded.context_logps[real], gathered.context_logps[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cascaded.context_representations, gathered.context_representations, atol=1e-5, rtol=1e-5)


def test_cascade_attention_outside_its_block_is_an_error():
    from gcpo_lightning.components.sampling.set_cascade import set_cascade_attention

    with pytest.raises(RuntimeError, match="outside cascade_attention"):
        set_cascade_attention(
            torch.nn.Module(), torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), None
        )


def test_pieces_tokenise_as_the_whole_context_with_a_byte_level_bpe():
    # a GPT-2-style tokenizer built here: its pre-tokenizer splits a run of newlines before a non-space ("\n", "\n")
    # but keeps it whole at the end of a string ("\n\n"), so pieces tokenised alone differ from the whole string
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from gcpo_lightning.components.graphs.set_prompts import tokenize_piece

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["[1] 12\n\n[2] 7 apples\n\nCombined:", "x\n\ny\n\n"] * 50, trainer)
    encode = lambda text: bpe.encode(text).ids  # noqa: E731
    lines = ["Problem: 5+7\nOther solutions:\n", "[1] 12\n\n", "[2] 7 apples\n", "[3] 9\n\n\n"]
    tail = "Combined: 12\nNow:"
    whole = encode("".join(lines) + tail)
    alone = [t for piece in lines for t in encode(piece)] + encode(tail)
    assert alone != whole, "the tokenizer must split newline runs differently at a string's end for this test"
    assert [t for piece in lines for t in tokenize_piece(encode, piece)] + encode(tail) == whole
