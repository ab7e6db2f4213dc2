"""``StaticCacheLoop`` (a static KV cache, a fixed-shape decode step) gives exactly ``KVCacheLoop``'s tokens.

Greedy on the shipped arithmetic model (it writes EOS after solutions of different lengths), sampled with a fixed
seed on a random model (EOS set to several frequent tokens so that rows stop mid-way), with left-padded prompts of
different lengths, ``min_new_tokens``, top-p and top-k; with the cache reused by a smaller call, through
``generate_shared`` (forced continuations scored too), ``GroupSampler`` and GCPO's collider graph; and with the
step compiled by ``torch.compile`` (``aot_eager`` on CPU: the tracing without code generation;
``tests/e2e/test_gpu.py`` compiles it with inductor and CUDA graphs).
"""

from __future__ import annotations

import pytest
import torch

from gcpo_lightning import GroupSampler
from gcpo_lightning.components.sampling.backends import Decoding, KVCacheLoop, StaticCacheLoop
from gcpo_lightning.components.sampling.decoding import Forced
from gcpo_lightning.components.sampling.group_sampler import completion_mask_from_eos
from gcpo_lightning.interfaces.containers import PolicyModels
from gcpo_lightning.policy.loading import ASSETS, load_causal_lm, load_tokenizer

PROMPTS = ["Problem: 1+2\nSolution:", "Problem: 3+4-5*2+8\nSolution:", "Problem: 9-1\nSolution:", "7"]


pytestmark = pytest.mark.usefixtures("own_random_stream")  # these tests seed torch's generator


def _model(model_dir):
    return load_causal_lm(str(model_dir)).eval(), load_tokenizer(str(model_dir))


def _encode(tok, prompts: list[str], repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].repeat(repeat, 1), enc["attention_mask"].repeat(repeat, 1)  # [n, P] left-padded


def _decoding(tok, eos: list[int], **settings) -> Decoding:
    defaults = dict(temperature=1.0, top_p=1.0, top_k=0, greedy=False, min_new_tokens=0, max_new_tokens=24)
    return Decoding(eos_ids=eos, pad_id=tok.pad_token_id, **{**defaults, **settings})


def _both(model, ids, mask, d: Decoding, static: StaticCacheLoop, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """KVCacheLoop's and the static loop's tokens from the same seed; both leave the generator in the same state."""
    torch.manual_seed(seed)
    ref = KVCacheLoop().generate(model, ids, mask, d)
    after_ref = torch.rand(3)
    torch.manual_seed(seed)
    ours = static.generate(model, ids, mask, d)
    assert torch.equal(torch.rand(3), after_ref), "the static loop must draw exactly the numbers the loop draws"
    return ref, ours


def _frequent_tokens(model, ids, mask, k: int) -> list[int]:
    """The ``k`` tokens the random model puts most mass on after the prompts: as EOS, rows stop at varied steps."""
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask).logits[:, -1].softmax(-1).mean(0)  # [V]
    return probs.topk(k).indices.tolist()


@pytest.mark.parametrize("min_new_tokens", [0, 6])
def test_greedy_equals_the_loop_with_eos_mid_way(min_new_tokens):
    model, tok = _model(ASSETS / "tiny-arith")
    ids, mask = _encode(tok, PROMPTS, repeat=2)
    d = _decoding(tok, [tok.eos_token_id], greedy=True, max_new_tokens=40, min_new_tokens=min_new_tokens)
    ref, ours = _both(model, ids, mask, d, StaticCacheLoop(compile=False))
    lengths = completion_mask_from_eos(ref, d.eos_ids)[0].sum(1)
    assert lengths.min() < lengths.max(), "rows must finish at different steps for the test to mean anything"
    assert mask.sum(1).min() < mask.shape[1], "the prompts must be left-padded"
    assert torch.equal(ref, ours)


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(temperature=0.7, top_p=0.8),
        dict(temperature=1.3, top_k=12, min_new_tokens=5),
        dict(top_p=0.9, top_k=30, min_new_tokens=3),
    ],
    ids=["T1", "top_p", "top_k+min_new", "top_p+top_k+min_new"],
)
def test_seeded_sampling_equals_the_loop(tiny_model_dir, settings):
    model, tok = _model(tiny_model_dir)
    ids, mask = _encode(tok, PROMPTS, repeat=3)
    d = _decoding(tok, [tok.eos_token_id, *_frequent_tokens(model, ids, mask, 6)], **settings)
    ref, ours = _both(model, ids, mask, d, StaticCacheLoop(compile=False), seed=4)
    lengths = completion_mask_from_eos(ref, d.eos_ids)[0].sum(1)
    assert lengths.min() < lengths.max(), "rows must finish at different steps for the test to mean anything"
    assert lengths.min() > d.min_new_tokens
    assert torch.equal(ref, ours)


def test_every_row_stopping_early_ends_the_call_where_the_loop_does(tiny_model_dir):
    model, tok = _model(tiny_model_dir)
    ids, mask = _encode(tok, PROMPTS, repeat=2)
    d = _decoding(tok, [tok.eos_token_id, *_frequent_tokens(model, ids, mask, 40)], max_new_tokens=200)
    ref, ours = _both(model, ids, mask, d, StaticCacheLoop(compile=False), seed=1)
    assert ref.shape[1] < 200 and torch.equal(ref, ours)


def test_the_cache_is_reused_by_smaller_calls_and_grows_for_larger_ones(tiny_model_dir):
    model, tok = _model(tiny_model_dir)
    static = StaticCacheLoop(compile=False, length_bucket=64)
    ids, mask = _encode(tok, PROMPTS, repeat=3)  # 12 rows
    d = _decoding(tok, [tok.eos_token_id, *_frequent_tokens(model, ids, mask, 6)])
    _both(model, ids, mask, d, static)
    first = static._buffers
    assert first is not None and (first.rows, first.length) == (12, 64)
    # 5 rows with a shorter prompt: padded to the kept 12 x 64 cache, whose first rows hold the last call's keys
    ref, ours = _both(model, ids[:5, 4:], mask[:5, 4:], d, static, seed=2)
    assert static._buffers is first and torch.equal(ref, ours)
    longer = _decoding(tok, d.eos_ids, max_new_tokens=60)  # 30 + 60 slots: the cache grows to 128
    ref, ours = _both(model, ids[:3], mask[:3], longer, static, seed=3)
    assert (static._buffers.rows, static._buffers.length) == (12, 128) and torch.equal(ref, ours)


def test_shared_prefix_decode_and_forced_scores_equal_the_loop(tiny_model_dir):
    model, tok = _model(tiny_model_dir)
    prefixes = ["Problem: 12+7\nOther solutions:\n[1] 19", "Problem: 3*3-1\nOther solutions:\n[2] 8 or so"]
    suffixes = [" A", " BBBBB\nC", " 8", "\nCombined solution: 9"]
    pre_ids, pre_mask = _encode(tok, prefixes)
    suf_ids, suf_mask = _encode(tok, suffixes)
    owner = torch.tensor([0, 0, 1, 1])
    forced = Forced(rows=torch.tensor([0, 2]), ids=_encode(tok, [" 19", " 8 !"])[0], keep=torch.tensor([1]))
    for greedy in (True, False):
        d = _decoding(tok, [tok.eos_token_id, *_frequent_tokens(model, suf_ids, suf_mask, 4)], greedy=greedy)
        runs = []
        for backend in (KVCacheLoop(), StaticCacheLoop(compile=False)):
            torch.manual_seed(5)
            runs.append(backend.generate_shared(model, pre_ids, pre_mask, suf_ids, suf_mask, owner, d, forced))
        (ref, (ref_logps, ref_cache)), (ours, (our_logps, our_cache)) = runs
        assert torch.equal(ref, ours), greedy
        torch.testing.assert_close(our_logps, ref_logps, rtol=0, atol=0)
        assert torch.equal(our_cache.keys[0], ref_cache.keys[0]) and torch.equal(our_cache.mask, ref_cache.mask)


def test_group_sampler_with_the_static_backend_equals_the_default(tiny_model_dir):
    models = PolicyModels(*_model(tiny_model_dir))
    static = GroupSampler(max_completion_length=10, generation_batch_size=5, backend=StaticCacheLoop(compile=False))
    default = GroupSampler(max_completion_length=10, generation_batch_size=5)
    groups = [[p + " A", p + " BB"] for p in PROMPTS[:2]]
    for call in ("sample", "sample_shared"):
        rollouts = []
        for sampler in (default, static):
            torch.manual_seed(6)
            args = (PROMPTS, 3) if call == "sample" else (groups, 3)
            rollouts.append(getattr(sampler, call)(models, *args))
        assert torch.equal(rollouts[0].completion_ids, rollouts[1].completion_ids), call
        assert rollouts[0].completions == rollouts[1].completions
    assert static.backend._buffers.rows == 6  # sample_shared: whole groups per chunk, 2 prompts x 3 rows


def test_gcpo_graph_with_the_static_backend_equals_the_default(make_module, tiny_model_dir):
    from gcpo_lightning import ColliderGraphBuilder

    G, M, K = 3, 2, 2
    rows = [{"prompt": f"Problem: {q}\nSolution:", "question": q, "answer": "0"} for q in ["1+2", "3+4+5"]]
    graphs = []
    for backend in (KVCacheLoop(), StaticCacheLoop(compile=False)):
        builder = ColliderGraphBuilder(num_integrated=M, num_context_samples=K, keep_context_cache=True)
        sampler = GroupSampler(max_completion_length=8, generation_batch_size=8, backend=backend)
        module = make_module(tiny_model_dir, num_generations=G, graph_builder=builder, sampler=sampler)
        module.configure_model()
        models = module.models()
        torch.manual_seed(0)
        rollout = sampler.sample(models, module.prompts_for(rows), G)
        rollout.rows = rows
        graphs.append(builder.build(rollout, models, sampler))
    ref, ours = graphs
    assert ref.integrated == ours.integrated and ref.context_samples == ours.context_samples
    assert torch.equal(ref.context_logps, ours.context_logps)  # p(y_i | x_il) scored on the same prefill
    assert torch.equal(ref.context_cache.keys[0], ours.context_cache.keys[0])
    torch.testing.assert_close(ref.context_representations, ours.context_representations, rtol=0, atol=0)


def test_compiled_step_traces_in_one_graph_and_gives_the_same_tokens(tiny_model_dir):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, tok = _model(tiny_model_dir)
    ids, mask = _encode(tok, PROMPTS, repeat=2)
    d = _decoding(tok, [tok.eos_token_id, *_frequent_tokens(model, ids, mask, 6)], min_new_tokens=2, top_p=0.9)
    static = StaticCacheLoop(compile=True, compile_backend="aot_eager")
    assert static.compiles(model)
    ref, ours = _both(model, ids, mask, d, static, seed=7)
    assert torch.equal(ref, ours)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1


def test_settings_are_checked_and_compile_auto_means_cuda_only(tiny_model_dir):
    with pytest.raises(ValueError, match="compile"):
        StaticCacheLoop(compile="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="length_bucket"):
        StaticCacheLoop(length_bucket=0)
    model, _ = _model(tiny_model_dir)
    assert not StaticCacheLoop().compiles(model)  # on the CPU
    assert not StaticCacheLoop(compile=False).compiles(model) and StaticCacheLoop(compile=True).compiles(model)
