"""Packed shared-prefix scoring equals scoring every context separately (eager and sdpa attention)."""

from __future__ import annotations

import pytest
import torch

from gcpo_lightning.components.scoring.logprobs import score_completions
from gcpo_lightning.components.scoring.prefix_sharing import (
    branch_attention_mask,
    common_prefix_length,
    pack_branches,
    shared_prefix_logps,
)
from gcpo_lightning.policy.loading import load_causal_lm, load_tokenizer


def test_pack_layout_by_hand():
    # contexts share [1, 2]; branch 0 adds [3], branch 1 adds [4, 5]; completion [7, 8]
    pack = pack_branches([[1, 2, 3], [1, 2, 4, 5]], [7, 8])
    assert pack.ids == [1, 2, 3, 7, 4, 5, 7]
    assert pack.positions == [0, 1, 2, 3, 2, 3, 4]
    assert pack.branch == [-1, -1, 0, 0, 1, 1, 1]
    # y_0 is predicted by the last context token of each branch, y_1 by y_0 in that branch
    assert pack.predict_at == [[2, 3], [5, 6]]


def test_identical_contexts_keep_a_token_per_branch():
    assert common_prefix_length([[1, 2], [1, 2]]) == 2
    pack = pack_branches([[1, 2], [1, 2]], [9])
    assert pack.branch == [-1, 0, 1] and pack.predict_at == [[1], [2]]


def test_mask_blocks_other_branches():
    branch = torch.tensor([[-1, -1, 0, 0, 1, 1, -2]])
    mask = branch_attention_mask(branch, branch != -2, torch.float32)[0, 0]  # [L, L]
    allowed = mask == 0
    assert allowed[4, :2].all() and not allowed[4, 2:4].any() and allowed[5, 4]
    assert not allowed[2, 3], "causal within a branch"
    assert allowed[6, 6] and not allowed[6, :6].any(), "padding attends only to itself"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_prefix_equals_separate_passes(tiny_model_dir, attn):
    model = load_causal_lm(str(tiny_model_dir), {"attn_implementation": attn}).eval()
    tok = load_tokenizer(str(tiny_model_dir))
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix = "Problem: 1+2+3\nOther solutions:\n[2] 1+2=3,3+3=6. Answer: 6\nCombined solution:"
    contexts = [[enc(prefix + y + "\nNow write your own solution:") for y in (" 6", " 1+2=3. Answer: 7", " 6")]]
    contexts.append([enc(prefix[:20] + y) for y in (" a", " bcd")])
    completions = [enc(" 1+2=3,3+3=6. Answer: 6") + [tok.eos_token_id], enc(" 42")]
    packed = shared_prefix_logps(model, contexts, completions, temperature=0.7)
    for ctxs, y, got in zip(contexts, completions, packed):
        for m, ctx in enumerate(ctxs):
            ref = score_completions(
                model,
                torch.tensor([ctx]),
                torch.ones(1, len(ctx), dtype=torch.long),
                torch.tensor([y]),
                torch.ones(1, len(y), dtype=torch.long),
                temperature=0.7,
            ).logps
            torch.testing.assert_close(got[m], ref[0], atol=1e-5, rtol=1e-5)
