"""Per-problem evaluation records: one JSON line per held-out problem, written and read back."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from gcpo_lightning.functional.pass_at_k import majority_correct, per_problem_pass_at


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
    reward_rows = rewards.detach().reshape(num_problems, n).float().cpu().tolist()
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
            completions=list(completions[p * n : (p + 1) * n]),
            rewards=reward_rows[p],
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
