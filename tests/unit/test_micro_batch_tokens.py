"""``micro_batch_tokens``: rows per forward/backward pass from a token budget (``training.update.micro_batch_rows``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from gcpo_lightning.training.update import micro_batch_rows


def _batch(P: int, T: int, Px: int | None) -> tuple[SimpleNamespace, SimpleNamespace]:
    mb = SimpleNamespace(prompt_ids=torch.zeros(6, P), completion_ids=torch.zeros(6, T))
    return mb, SimpleNamespace(context_ids=None if Px is None else torch.zeros(6, Px))


def test_rows_fit_the_budget_for_the_longest_sequence_of_the_pass():
    # prompt 10 + completion 20 = 30 tokens a row; the causal KL's context 90 + completion 20 = 110 is the longest
    gcpo, grpo = _batch(10, 20, 90), _batch(10, 20, None)
    module = lambda size, tokens: SimpleNamespace(micro_batch_size=size, micro_batch_tokens=tokens)  # noqa: E731
    assert micro_batch_rows(module(None, 1000), *gcpo) == 9  # floor(1000 / 110)
    assert micro_batch_rows(module(4, 1000), *gcpo) == 4  # never more than micro_batch_size
    assert micro_batch_rows(module(None, 50), *gcpo) == 1  # one row even when it alone is over the budget
    assert micro_batch_rows(module(None, 1000), *grpo) == 33  # floor(1000 / 30): GRPO reads no context
    assert micro_batch_rows(module(4, None), *gcpo) == 4  # no budget: micro_batch_size as it is
    assert micro_batch_rows(module(None, None), *gcpo) is None  # the whole mini-batch
