"""Mini-batches hold whole groups; micro-batch weights add the chunks' losses back up to the mini-batch loss."""

from __future__ import annotations

import pytest
import torch

from gcpo_lightning.functional.batching import group_spans, micro_batches, mini_batches


def test_mini_batches_hold_whole_groups_and_cover_the_rollout():
    torch.manual_seed(0)
    steps = mini_batches(12, group_size=3, size=6)  # 4 groups of 3, 2 groups per optimiser step
    assert [len(s) for s in steps] == [6, 6]
    assert sorted(torch.cat(steps).tolist()) == list(range(12))
    for step in steps:
        groups = (step // 3).tolist()
        assert groups[0:3] == [groups[0]] * 3 and groups[3:6] == [groups[3]] * 3  # members stay together


def test_one_step_keeps_the_rollout_order():
    assert torch.equal(mini_batches(6, group_size=3, size=None)[0], torch.arange(6))


def test_micro_batch_weights():
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])  # 4 + 1 + 2 = 7 tokens
    by_completion = micro_batches(mask, size=2, token_weighted=False)
    assert [c.tolist() for c, _ in by_completion] == [[0, 1], [2]]
    assert [w for _, w in by_completion] == [2 / 3, 1 / 3]  # share of completions
    by_token = micro_batches(mask, size=2, token_weighted=True)
    assert [w for _, w in by_token] == pytest.approx([5 / 7, 2 / 7])  # share of tokens: (4 + 1) / 7 and 2 / 7


def test_group_spans_keep_groups_whole_under_the_limit():
    # groups of 4, 4, 8, 2 rows with at most 8 a span: [4+4], [8], [2]; a group over the limit stands alone
    assert group_spans([4, 4, 8, 2], 8) == [(0, 2), (2, 3), (3, 4)]
    assert group_spans([16, 2], 8) == [(0, 1), (1, 2)]
    assert group_spans([], 8) == []
