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

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

# ----- pass@k ------------------------------------------------------------------------------------------------------


def _check_pass_at_k_args(n: int, c: int, k: int) -> None:
    """Raise a ``ValueError`` unless ``0 <= c <= n`` and ``1 <= k <= n``."""
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample per problem, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"the number of correct samples must be in [0, n={n}], got c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (samples per problem); got k={k}, n={n}. "
                         f"Generate at least k samples per problem or lower k.")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator ``1 - C(n - c, k) / C(n, k)`` (Chen et al., 2021).

    Computed stably, without large binomials, as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``; when
    ``n - c < k`` every ``k``-subset contains a correct sample and the result is exactly ``1.0``.

    Args:
        n: samples generated for the problem.
        c: how many of them are correct.
        k: the budget; ``1 <= k <= n``.

    Returns:
        The estimate, in ``[0, 1]``. At ``k = 1`` it is ``c / n``.

    Raises:
        ValueError: when ``k > n``, ``k < 1``, ``n < 1`` or ``c`` is outside ``[0, n]``.
    """
    _check_pass_at_k_args(n, c, k)
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_tensor(correct: Tensor, k: int) -> Tensor:
    """:func:`pass_at_k` for a batch of problems.

    Args:
        correct: ``[P, n]`` per-sample correctness (bool, or numbers where non-zero means correct).
        k: the budget; ``1 <= k <= n``.

    Returns:
        ``[P]`` float64 pass@k estimates, on ``correct``'s device.

    Raises:
        ValueError: when ``correct`` is not 2-D or ``k`` is outside ``[1, n]``.
    """
    if correct.dim() != 2:
        raise ValueError(f"correct must be [P, n], got shape {tuple(correct.shape)}")
    n = correct.shape[1]
    _check_pass_at_k_args(n, 0, k)
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


# ----- majority voting ---------------------------------------------------------------------------------------------


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


@dataclass
class ProblemRecord:
    """Everything evaluated for one problem: one line of the results JSONL file.

    Attributes:
        index: the problem's position in the evaluation set (or any stable id).
        prompt: the prompt given to the model.
        answer: the gold answer.
        completions: the ``n`` sampled completions.
        rewards: total reward of each completion.
        correct: correctness of each completion.
        extracted: the answer extracted from each completion (``None``: none), or ``None`` when not extracted.
        pass_at: per-problem ``{"pass@j": estimate}``.
        majority: whether the majority vote was correct (``None``: not computed).
        question: the bare question, when it differs from the prompt.
        extra: anything else to keep (must be JSON-serialisable).
    """

    index: int
    prompt: str
    answer: Any
    completions: list[str]
    rewards: list[float]
    correct: list[bool]
    extracted: list[str | None] | None = None
    pass_at: dict[str, float] = field(default_factory=dict)
    majority: bool | None = None
    question: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the record."""
        return asdict(self)


def problem_records(
    rows: Sequence[dict[str, Any]],
    completions: Sequence[str],
    rewards: Tensor,
    correct: Tensor,
    answer_keys: list[list[str | None]] | None = None,
    ks: Iterable[int] = (1,),
    majority_k: int | None = None,
    start_index: int = 0,
) -> list[ProblemRecord]:
    """Build one :class:`ProblemRecord` per problem from a group-major batch of samples.

    Args:
        rows: ``P`` dataset rows with ``"prompt"`` and optionally ``"answer"`` and ``"question"``.
        completions: ``P * n`` completions, group-major (problem ``p``'s samples are ``[p * n, (p + 1) * n)``).
        rewards: ``[P * n]`` or ``[P, n]`` total rewards.
        correct: ``[P, n]`` per-sample correctness.
        answer_keys: ``P`` lists of ``n`` extracted answers, or ``None``.
        ks: budgets for the per-problem ``pass@j`` values.
        majority_k: when given (with ``answer_keys``), the per-problem majority@k is recorded.
        start_index: ``index`` of the first problem.
    """
    num_problems, n = correct.shape
    rewards = rewards.detach().reshape(num_problems, n).float().cpu().tolist()
    pass_at = {name: v.cpu().tolist() for name, v in per_problem_pass_at(correct, ks).items()}
    majority = None
    if answer_keys is not None and majority_k is not None:
        majority = majority_correct(answer_keys, correct, majority_k).bool().cpu().tolist()
    flags = correct.bool().cpu().tolist()
    return [
        ProblemRecord(
            index=start_index + p,
            prompt=row["prompt"],
            answer=row.get("answer"),
            completions=list(completions[p * n:(p + 1) * n]),
            rewards=rewards[p],
            correct=flags[p],
            extracted=None if answer_keys is None else list(answer_keys[p]),
            pass_at={name: values[p] for name, values in pass_at.items()},
            majority=None if majority is None else majority[p],
            question=row.get("question"),
        )
        for p, row in enumerate(rows)
    ]


def write_problem_results(path: str | Path, records: Iterable[ProblemRecord], append: bool = True) -> Path:
    """Write one JSON line per problem.

    Only global rank zero should call this (e.g. under ``if trainer.is_global_zero``); gathering the records of
    other ranks first, if wanted, is also the caller's job.

    Args:
        path: the ``.jsonl`` file; its parent folders are created.
        records: the problems to write.
        append: ``True`` appends to an existing file (records of several batches, or epochs, accumulate);
            ``False`` truncates it first (only this call's records remain).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)
    return path


def read_problem_results(path: str | Path) -> list[ProblemRecord]:
    """Read back a file written by :func:`write_problem_results`."""
    with open(path, encoding="utf-8") as f:
        return [ProblemRecord(**json.loads(line)) for line in f if line.strip()]


# ----- glue for the module -----------------------------------------------------------------------------------------


def answer_keys(reward_fn: Any, completions: Sequence[str], n: int) -> list[list[str | None]] | None:
    """Each sample's extracted answer for ``majority@k``, grouped per problem (``P`` lists of ``n``).

    The accuracy reward supplies the extraction through an ``answer_key(completion) -> str | None`` attribute
    (the built-in math and arithmetic rewards have one); without it there is no majority vote (``None``).
    """
    extract = getattr(reward_fn, "answer_key", None)
    if extract is None:
        return None
    keys = [None if (key := extract(c)) is None else str(key) for c in completions]
    return [keys[p * n : (p + 1) * n] for p in range(len(keys) // n)]


def results_path(template: str, stage: str, step: int, rank: int, world_size: int) -> Path:
    """The per-problem JSONL path: ``{stage}`` and ``{step}`` filled in, ``.rank<r>`` added with several ranks."""
    path = Path(template.format(stage=stage, step=step))
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}") if world_size > 1 else path
