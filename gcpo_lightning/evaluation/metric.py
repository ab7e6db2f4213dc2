"""Sampled evaluation: pass@1, pass@k, mean@k and majority@k over ``k`` samples per problem.

The protocol follows the paper: each held-out problem is answered ``n`` times by sampling, and

* ``pass@1`` is the correctness averaged over all ``n`` samples (the unbiased pass@k estimator at ``k = 1``,
  which is exactly ``c / n``), then averaged over problems;
* ``pass@k`` is the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code":
  ``1 - C(n - c, k) / C(n, k)`` for ``c`` correct samples out of ``n``, the probability that at least one of
  ``k`` samples drawn without replacement from the ``n`` is correct;
* ``mean@k`` is the plain mean correctness of the *first* ``k`` samples;
* ``majority@k`` is the correctness of the most frequent extracted answer among the first ``k`` samples.

:class:`SampledEvaluation` accumulates these as per-problem scalar sums plus a problem count (all states reduced
with ``sum``), so it synchronises correctly across ranks under DDP/FSDP. Per-problem results can be written to a
JSONL file with :func:`write_problem_results` (on global rank zero only: that is the caller's job).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from gcpo_lightning.functional.pass_at_k import majority_correct, pass_at_k_tensor

# ----- the metric --------------------------------------------------------------------------------------------------


class SampledEvaluation(Metric):
    """pass@1, pass@k, mean@k and majority@k over problems answered with several samples each.

    Every state is a scalar sum reduced with ``sum`` across processes (per-problem scores summed, plus a problem
    count), so :meth:`compute` gives the same, globally averaged values on every rank under DDP/FSDP.

    ``pass@j`` (for each ``j`` in ``ks``) uses all ``n`` samples of a problem through the unbiased estimator;
    ``pass@1`` is thus the correctness averaged over all ``n`` samples. ``mean@k`` is the mean correctness of the
    first ``k`` samples only, so when exactly ``n == k`` samples are generated ``mean@k`` equals ``pass@1``
    (both are ``c / n`` per problem); with ``n > k`` ``pass@1`` is the lower-variance estimate of the same
    quantity. ``majority@k`` is reported only when answer keys were given to at least one update (on any rank),
    averaged over the problems that had them.

    Args:
        k: samples per problem used by ``mean@k`` and ``majority@k`` (each update needs ``n >= k``).
        ks: budgets for ``pass@j``; default ``(1, k)``. Each must be ``<= n`` at every update.

    Example:
        >>> metric = SampledEvaluation(k=4)
        >>> metric.update(torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0]]).bool(), [["3", "2", None, "3"], [None] * 4])
        >>> {name: round(v.item(), 4) for name, v in metric.compute().items()}
        {'pass@1': 0.25, 'pass@4': 0.5, 'mean@4': 0.25, 'majority@4': 0.5}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    # states registered with ``add_state`` (the ``pass_at_{j}_sum`` ones are reached with getattr)
    problems: Tensor
    mean_sum: Tensor
    majority_sum: Tensor
    majority_problems: Tensor

    def __init__(self, k: int, ks: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        ks = (1, k) if ks is None else tuple(ks)
        if not ks or any(j < 1 for j in ks):
            raise ValueError(f"ks must be non-empty budgets >= 1, got {ks}")
        self.k = k
        self.ks: tuple[int, ...] = tuple(sorted(set(ks)))
        # float64 scalar sums (exact problem counts, no drift over large evaluation sets), summed across ranks
        for name in ("problems", *map(self._pass_state, self.ks), "mean_sum", "majority_sum", "majority_problems"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    @staticmethod
    def _pass_state(j: int) -> str:
        return f"pass_at_{j}_sum"

    def update(self, correct: Tensor, answer_keys: list[list[str | None]] | None = None) -> None:
        """Add a batch of problems.

        Args:
            correct: ``[P, n]`` per-sample correctness (bool, or numbers where non-zero means correct), ``n >= k``
                and ``n >= max(ks)``.
            answer_keys: ``P`` lists of ``n`` extracted answers (``None``: nothing extracted) for ``majority@k``;
                ``None`` to skip majority voting for this batch.
        """
        if correct.dim() != 2:
            raise ValueError(f"correct must be [P, n], got shape {tuple(correct.shape)}")
        n = correct.shape[1]
        if n < max(self.k, *self.ks):
            raise ValueError(f"got {n} samples per problem, fewer than k={self.k} / ks={self.ks}")
        correct = correct.detach().bool()
        self.problems += correct.shape[0]
        for j in self.ks:
            state = self._pass_state(j)
            setattr(self, state, getattr(self, state) + pass_at_k_tensor(correct, j).sum().to(self.problems))
        self.mean_sum += correct[:, : self.k].double().mean(-1).sum().to(self.problems)
        if answer_keys is not None:
            self.majority_sum += majority_correct(answer_keys, correct, self.k).sum().to(self.problems)
            self.majority_problems += correct.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """``{"pass@j": ..., "mean@k": ..., "majority@k": ...}`` averaged over problems (``nan`` before any update).

        ``majority@k`` is present only when answer keys were given to some update.
        """
        out = {f"pass@{j}": getattr(self, self._pass_state(j)) / self.problems for j in self.ks}
        out[f"mean@{self.k}"] = self.mean_sum / self.problems
        if self.majority_problems.item() > 0:
            out[f"majority@{self.k}"] = self.majority_sum / self.majority_problems
        return out


# ----- per-problem results -----------------------------------------------------------------------------------------


# ----- glue for the module -----------------------------------------------------------------------------------------
