"""``python -m gcpo_lightning context-use``: does my model use its GCPO context? (see :mod:`.context_use`).

Loads one or more model folders (``from_pretrained``, offline), samples with the kit's own decoding loop and the
collider's prompt templates, and prints one markdown table with a column per model::

    python -m gcpo_lightning context-use --model gcpo_lightning/assets/tiny-arith --n 200
    python -m gcpo_lightning context-use --model my/model --data problems.jsonl --answer-format math --chat

Questions come from the embedded arithmetic task's held-out list (default) or from a JSONL file with a question
and an answer column.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from gcpo_lightning.components.sampling.backends import Decoding, KVCacheLoop
from gcpo_lightning.components.sampling.group_sampler import completion_mask_from_eos, encode_prompts, eos_ids
from gcpo_lightning.data.tasks.arithmetic import ArithmeticTask
from gcpo_lightning.evaluation.context_use import (
    AnswerOf,
    ContextUse,
    ContextUseSettings,
    Generate,
    chunks,
    measure_context_use,
    side_by_side,
)
from gcpo_lightning.policy.loading import check_model_path, load_causal_lm, load_tokenizer, render_prompt
from gcpo_lightning.rewards.arithmetic import extract_answer
from gcpo_lightning.rewards.math_answers import gold_text, prediction_text


def arithmetic_answer(completion: str) -> int | None:
    """The integer after the last ``Answer:`` (the embedded task's reward reads the same)."""
    text = extract_answer(completion)
    return None if text is None else int(text)


def math_answer(completion: str) -> str | None:
    r"""The raw answer text (``\boxed{}``, ``Answer:`` or the last number), whitespace and commas removed."""
    text = prediction_text(completion)
    return None if text is None else text.replace(",", "").replace(" ", "")


def math_gold(answer: str) -> str:
    """A reference answer in :func:`math_answer`'s form (``#### 42`` and ``\\boxed{42}`` give ``42``)."""
    return gold_text(answer).replace(",", "").replace(" ", "")


ANSWER_FORMATS: dict[str, tuple[AnswerOf, Callable[[str], Hashable]]] = {
    "arithmetic": (arithmetic_answer, lambda gold: int(gold.strip())),
    "math": (math_answer, math_gold),
}
"""``--answer-format``: the answer of a completion and the comparable form of a reference answer."""


def read_problems(path: Path, question_key: str, answer_key: str, gold_of: Callable[[str], Hashable], n: int) -> list:
    """The first ``n`` ``(question, gold)`` pairs of a JSONL file; a bad row is an error naming its line."""
    problems: list[tuple[str, Hashable]] = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if len(problems) == n or not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in (question_key, answer_key) if k not in row]
        if missing:
            raise ValueError(f"{path}:{line_no}: row has no column {missing[0]!r} (columns: {sorted(row)})")
        try:
            problems.append((str(row[question_key]), gold_of(str(row[answer_key]))))
        except ValueError as err:
            raise ValueError(f"{path}:{line_no}: answer {row[answer_key]!r} cannot be read: {err}") from err
    if not problems:
        raise ValueError(f"{path}: no problems in the file")
    return problems


def loop_generator(model: Any, tokenizer: Any, decoding: Decoding, batch_size: int, chat: bool | None) -> Generate:
    """A :data:`Generate` over the kit's :class:`KVCacheLoop` (the decoding GCPO's sampler uses)."""
    backend, device = KVCacheLoop(), next(model.parameters()).device

    def generate(prompts: list[str], n: int, greedy: bool) -> list[str]:
        rows = [render_prompt(tokenizer, p, chat, None) for p in prompts for _ in range(n)]
        texts: list[str] = []
        for batch in chunks(rows, batch_size):
            ids, mask = encode_prompts(tokenizer, batch, 1, device)  # [b, P]
            with torch.no_grad():
                out = backend.generate(model, ids, mask, replace(decoding, greedy=greedy))  # [b, T]
            keep, _ = completion_mask_from_eos(out, eos_ids(tokenizer))
            texts += tokenizer.batch_decode(
                out.masked_fill(keep == 0, tokenizer.pad_token_id), skip_special_tokens=True
            )
        return texts

    return generate


def load(name_or_path: str) -> tuple[Any, Any]:
    """Model (eval mode) and left-padding tokenizer: a folder or a shipped name (``tiny-arith``), offline."""
    return load_causal_lm(name_or_path).eval(), load_tokenizer(name_or_path, "--model")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m gcpo_lightning context-use",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", action="append", required=True, help="model folder or shipped name (repeat to compare models)"
    )
    p.add_argument("--n", type=int, default=200, help="questions")
    p.add_argument("--data", type=Path, default=None, help="JSONL file of problems (default: arithmetic held-out)")
    p.add_argument("--question-key", default="question")
    p.add_argument("--answer-key", default="answer")
    p.add_argument("--answer-format", choices=sorted(ANSWER_FORMATS), default="arithmetic")
    p.add_argument("--group", type=int, default=8, help="G, candidates per question")
    p.add_argument("--integrated", type=int, default=2, help="M, sampled integrated outputs per question")
    p.add_argument("--contexts", type=int, default=4, help="candidates i per question whose contexts are sampled")
    p.add_argument("--samples", type=int, default=4, help="K, outputs per context (and fresh samples under q)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="rows per decoding batch")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the tokenizer's chat template (default: when it has one)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write the rates to this JSON file")
    return p.parse_args(argv)


def run_one(path: str, problems: list[tuple], a: argparse.Namespace, settings: ContextUseSettings) -> ContextUse:
    """Measure one model, seeded."""
    torch.manual_seed(a.seed)
    model, tokenizer = load(path)
    decoding = Decoding(
        a.max_new_tokens,
        eos_ids(tokenizer),
        tokenizer.pad_token_id,
        a.temperature,
        a.top_p,
        a.top_k,
        greedy=False,
        min_new_tokens=0,
    )
    generate = loop_generator(model, tokenizer, decoding, a.batch_size, a.chat)
    return measure_context_use(generate, problems, ANSWER_FORMATS[a.answer_format][0], settings)


def prepare(a: argparse.Namespace) -> tuple[list[tuple], ContextUseSettings]:
    """Check every input before any model is loaded: the problems, the settings and each model path."""
    gold_of = ANSWER_FORMATS[a.answer_format][1]
    if a.n < 1:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    if a.data is None:
        problems: list[tuple] = [(q, gold_of(ans)) for q, ans in ArithmeticTask().heldout(a.n)]
    else:
        problems = read_problems(a.data, a.question_key, a.answer_key, gold_of, a.n)
    settings = ContextUseSettings(a.group, a.integrated, a.contexts, a.samples)
    for path in a.model:
        check_model_path(path, "--model")
    return problems, settings


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        problems, settings = prepare(a)
    except (ValueError, OSError) as err:  # ModelPathError is a ValueError
        print(f"context-use: {err}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    reports = {path: run_one(path, problems, a, settings) for path in a.model}
    print(f"{len(problems)} questions, {asdict(settings)}, T={a.temperature}, top_p={a.top_p}, top_k={a.top_k}")
    print(side_by_side(reports))
    if a.json:
        a.json.write_text(json.dumps({p: r.as_dict() for p, r in reports.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
