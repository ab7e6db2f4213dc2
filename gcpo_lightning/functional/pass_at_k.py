"""Evaluation estimators as pure functions: unbiased pass@k (Chen et al. 2021) and majority@k."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def pass_at_k_tensor(correct: Tensor, k: int) -> Tensor:
    """The unbiased pass@k estimator ``1 - C(n - c, k) / C(n, k)`` (Chen et al., 2021) for a batch of problems.

    Computed stably, without large binomials, as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` in float64; when
    ``n - c < k`` every ``k``-subset contains a correct sample and the result is exactly ``1.0`` (the factor at
    ``i = k`` is exactly 0). At ``k = 1`` it is ``c / n``.

    Args:
        correct: ``[P, n]`` per-sample correctness (bool, or numbers where non-zero means correct).
        k: the budget; ``1 <= k <= n``.

    Returns:
        ``[P]`` float64 pass@k estimates in ``[0, 1]``, on ``correct``'s device.

    Raises:
        ValueError: when ``correct`` is not 2-D, has no samples, or ``k`` is outside ``[1, n]``.
    """
    if correct.dim() != 2:
        raise ValueError(f"correct must be [P, n], got shape {tuple(correct.shape)}")
    n = correct.shape[1]
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample per problem, got n={n}")
    if not 1 <= k <= n:
        raise ValueError(
            f"pass@k needs 1 <= k <= n (samples per problem); got k={k}, n={n}. "
            f"Generate at least k samples per problem or lower k."
        )
    c = correct.bool().sum(-1, keepdim=True)  # [P, 1]
    i = torch.arange(1, n + 1, device=correct.device, dtype=torch.float64)  # [n]
    # factor (1 - k/i) for i in (n - c, n]; it is 0 at i = k, so n - c < k gives exactly 1 - 0 = 1.
    factors = torch.where(i > (n - c), 1.0 - k / i, torch.ones_like(i))  # [P, n]
    return 1.0 - factors.prod(-1)  # [P]


def per_problem_pass_at(correct: Tensor, ks: Iterable[int]) -> dict[str, Tensor]:
    """``{"pass@k": [P] estimates}`` for every ``k`` in ``ks``.

    Args:
        correct: ``[P, n]`` per-sample correctness.
        ks: budgets, each in ``[1, n]``.
    """
    return {f"pass@{k}": pass_at_k_tensor(correct, k) for k in ks}


def _majority_index(answers: Sequence[str | None]) -> int | None:
    """Index of the first sample carrying the most frequent non-``None`` answer (ties: first to appear)."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for j, a in enumerate(answers):
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
            first.setdefault(a, j)
    if not counts:
        return None
    # max() keeps the first maximal key in iteration order; dicts iterate in insertion (= first-occurrence) order.
    best = max(counts, key=counts.__getitem__)
    return first[best]


def majority_correct(answers: list[list[str | None]], correct: Tensor, k: int) -> Tensor:
    """Per-problem majority-vote correctness over the first ``k`` samples.

    For each problem, the voted answer is the most frequent non-``None`` extracted answer among its first ``k``
    samples. Ties are broken by first occurrence: among equally frequent answers, the one whose first sample
    comes earliest wins. The problem counts as correct when the samples carrying the voted answer are correct;
    samples with equal answers are assumed to be graded alike, and the first such sample's correctness is used.
    A problem whose first ``k`` answers are all ``None`` (nothing extracted) counts as incorrect.

    Args:
        answers: ``P`` lists of at least ``k`` extracted answers (``None``: no answer could be extracted).
        correct: ``[P, n]`` per-sample correctness, ``n >= k``.
        k: samples that vote.

    Returns:
        ``[P]`` float tensor of 0.0 / 1.0, on ``correct``'s device.

    Raises:
        ValueError: on mismatched shapes or ``k`` outside ``[1, n]``.
    """
    if correct.dim() != 2:
        raise ValueError(f"correct must be [P, n], got shape {tuple(correct.shape)}")
    num_problems, n = correct.shape
    if not 1 <= k <= n:
        raise ValueError(f"majority@k needs 1 <= k <= n; got k={k}, n={n}")
    if len(answers) != num_problems:
        raise ValueError(f"got answers for {len(answers)} problems but correctness for {num_problems}")
    flags = correct.bool().tolist()
    out = []
    for p, (row, ok) in enumerate(zip(answers, flags)):
        if len(row) < k:
            raise ValueError(f"problem {p} has {len(row)} answers, fewer than k={k}")
        j = _majority_index(row[:k])
        out.append(j is not None and ok[j])
    return torch.tensor(out, dtype=torch.float32, device=correct.device)
