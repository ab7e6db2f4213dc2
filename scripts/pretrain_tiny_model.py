#!/usr/bin/env python
"""Pre-train (SFT) the tiny char-level Llama shipped in ``gcpo_lightning/assets/tiny-arith/``.

What it does:
    1. Builds a ~0.87M-parameter ``LlamaForCausalLM`` (hidden 128, 4 layers, 4 heads, MLP 384) over the
       100-token character vocabulary of :func:`gcpo_lightning.policy.char_tokenizer.build_char_tokenizer`.
    2. Trains it with supervised fine-tuning on the embedded arithmetic task
       (:class:`gcpo_lightning.data.tasks.arithmetic.ArithmeticTask`), loss only on the completion tokens and
       the final ``<eos>``, on a mixture of the three prompt formats of :mod:`gcpo_lightning.components.graphs.prompts`:

       - single: ``PROMPT_TEMPLATE`` -> a teacher worked solution. The teacher forgets the carry/borrow in
         a fraction ``--error-rate`` of the steps that need one (a systematic mistake), so SFT plateaus
         below perfect and RL has real headroom over the teacher;
       - integration: ``INTEGRATION_TEMPLATE`` with 2..8 noisy candidates (teacher mistakes plus random
         slips, like the model's own samples) -> the correct worked solution;
       - context: ``CONTEXT_TEMPLATE`` (other candidates + one combined solution) -> a teacher worked
         solution (same distribution as single, ``--context-target teacher``: the context is ignored), or
         (``--context-target follow``) a copy of the combined solution when the other candidates support its
         answer (``--agreement``), a teacher solution otherwise: the model learns to read its context.

    3. Every ``--eval-every`` steps measures, on ``--eval-n`` held-out questions (the first questions of
       ``ArithmeticTask().heldout(n, seed=1234)``; the first ``--exclude-n`` of them are never trained on),
       greedy accuracy and sampled accuracy at temperature 1.0 (top_p 1.0, no top-k; ``--eval-samples``
       samples per question), keeping a copy of the weights.
    4. Selects the LAST evaluated checkpoint inside the target band (greedy in ``[--greedy-lo, --greedy-hi]``,
       sampled in ``[--sampled-lo, --sampled-hi]``, well-formed >= ``--min-well-formed``); if none is in the
       band, the one closest to it. SFT accuracy jumps suddenly and differs by seed, hence selection by
       measured accuracy rather than by step count. Training stops early (deterministically) after
       ``--patience`` consecutive in-band evaluations or when an evaluation overshoots the band after
       having been in it.
    5. On the selected checkpoint, samples G=8 candidates per held-out question at T=1 and reports the
       accuracy of one sample, of the majority vote over the 8, and of the model's own greedy integrated
       answer (``INTEGRATION_TEMPLATE`` over the 8 candidates).
    6. Saves the model (safetensors), tokenizer, generation config and ``training_info.json`` to ``--out``.

The shipped weights were made in five stages (stages 1-3 with the defaults, then ``--context-target follow``);
the commands are in ``docs/embedded_model.md`` and in ``training_info.json``'s ``lineage``. About 30 minutes in
all on a 2-core CPU.

``--threads 1`` was used because the machine was shared: with other processes on the 2 cores, 2 OpenMP
threads ran ~10x slower per step (barrier spinning) than 1 thread. On an idle machine ``--threads 2`` (the
default) is faster, but its floating-point results, hence the selected checkpoint, can differ slightly.

Runs are deterministic for a given seed and thread count on the same machine/torch build (selection uses
steps and measured accuracies, never wall time), up to floating-point differences across builds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gcpo_lightning.components.graphs.prompts import (  # noqa: E402
    CONTEXT_TEMPLATE,
    INTEGRATION_TEMPLATE,
    render_candidates,
)
from gcpo_lightning.data.tasks.arithmetic import ArithmeticTask  # noqa: E402
from gcpo_lightning.data.templates import PROMPT_TEMPLATE  # noqa: E402
from gcpo_lightning.policy.char_tokenizer import build_char_tokenizer  # noqa: E402
from gcpo_lightning.rewards.arithmetic import extract_answer, is_correct  # noqa: E402

FORMATS = ("single", "integration", "context")


# --------------------------------------------------------------------------------------------- data


_STEP_RE = re.compile(r"(-?\d+)([+-])(\d+)=(-?\d+)")


def noisy_candidate(
    task: ArithmeticTask, question: str, error_rate: float, slip_rate: float, rng: random.Random
) -> str:
    """A candidate solution like the SFT model's own samples: teacher mistakes plus, sometimes, a random slip.

    A slip changes the result of one random step by a small offset; the wrong total is carried forward
    (later steps keep the teacher's own mistake, if it made one there).
    """
    text = task.worked_solution(question, error_rate, rng)
    if rng.random() >= slip_rate:
        return text
    steps = _STEP_RE.findall(text)
    j = rng.randrange(len(steps))
    total = int(steps[0][0])
    out = []
    for k, (lhs, op, operand, result) in enumerate(steps):
        x = int(operand)
        mistake = int(result) - (int(lhs) + x if op == "+" else int(lhs) - x)
        value = (total + x if op == "+" else total - x) + mistake
        if k == j:
            value += rng.choice((-10, -2, -1, 1, 2, 10))
        out.append(f"{total}{op}{x}={value}")
        total = value
    return f" {','.join(out)}. Answer: {total}"


def tally(cands: list[str]) -> str:
    """An integration that counts votes: every candidate's answer in order, then the most common one (the first
    seen on a tie), e.g. ``" Votes: 17,15,17. Answer: 17"``; candidates without an answer are left out."""
    answers = [int(a) for a in map(extract_answer, cands) if a is not None]
    if not answers:
        return " Votes: none. Answer: 0"
    counts = Counter(answers)
    best = next(a for a in answers if counts[a] == max(counts.values()))
    return f" Votes: {','.join(map(str, answers))}. Answer: {best}"


def first_with_answer(cands: list[str], answer: str | None) -> str | None:
    """The first candidate whose answer equals ``answer`` (as integers), or ``None``."""
    if answer is None:
        return None
    return next((c for c in cands if (got := extract_answer(c)) is not None and int(got) == int(answer)), None)


def majority_candidate(cands: list[str]) -> str:
    """The first candidate whose final answer is the most common one (the group's consensus, copied)."""
    answers = [extract_answer(c) for c in cands]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return cands[0]
    best = max(counts.values())
    return next(c for c, a in zip(cands, answers) if a is not None and counts[a] == best)


def path_majority_candidate(cands: list[str]) -> str:
    """The candidate a step-by-step vote keeps: at each step of the worked solution, the most common next step
    among the candidates that agree with every step chosen so far (the first seen on a tie); the first survivor.

    A transformer that copies by attending to every candidate continuing its own prefix votes this way, token by
    token. It agrees with :func:`majority_candidate`'s answer on ~92% of the noisy groups, and is as accurate
    (62.7% against 61.9% on 4000 groups of 8 teacher-noise candidates).
    """
    paths = [_STEP_RE.findall(c) for c in cands]
    alive = list(range(len(cands)))
    for k in range(max(map(len, paths), default=0)):
        steps = [paths[i][k] for i in alive if k < len(paths[i])]
        if not steps:
            break
        best = Counter(steps).most_common(1)[0][0]  # Counter keeps first-seen order on ties
        alive = [i for i in alive if k < len(paths[i]) and paths[i][k] == best]
    return cands[alive[0]]


INTEGRATIONS = {"majority": majority_candidate, "path": path_majority_candidate, "tally": tally}


def agrees(solution: str, others: list[str], rule: str = "corroborated") -> bool:
    """Whether the other candidates support ``solution``'s answer.

    ``corroborated``: at least one of ``others`` gives the same answer. ``mode``: it is one of their most common
    answers (a tie counts; stage 4 of the shipped model used this rule).
    """
    if rule == "corroborated":
        return first_with_answer(others, extract_answer(solution)) is not None
    counts = Counter(int(a) for a in map(extract_answer, others) if a is not None)
    got = extract_answer(solution)
    return got is not None and bool(counts) and counts[int(got)] == max(counts.values())


@dataclass
class Example:
    """One SFT example: the prompt text and the completion text (without ``<eos>``)."""

    prompt: str
    completion: str


class MixtureSampler:
    """Draws SFT examples of the three formats, never from the excluded (held-out) questions."""

    def __init__(self, task: ArithmeticTask, args: argparse.Namespace, exclude: set[str], rng: random.Random):
        self.task, self.args, self.exclude, self.rng = task, args, exclude, rng
        self.pool: list[tuple[str, list[str]]] = []  # (question, the model's own samples), see refresh_pool

    def refresh_pool(self, model: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
        """Draw ``--self-pool`` training questions and ``--max-candidates`` T=1 samples of the current model for
        each: the candidates of the ``--self-candidates`` share of integration and context examples, which then
        look like what the collider integrates (the model's own samples, not the teacher's noise)."""
        questions = [self.question() for _ in range(self.args.self_pool)]
        n = self.args.max_candidates
        prompts = [PROMPT_TEMPLATE.format(question=q) for q in questions]
        outputs = generate(model, tok, prompts, sample=True, num_return=n)
        self.pool = [(q, [text for text, _ in outputs[k * n : (k + 1) * n]]) for k, q in enumerate(questions)]
        model.train()

    def group(self) -> tuple[str, list[str]]:
        """A question and ``--min-candidates``..``--max-candidates`` candidates: the model's own samples
        (``--self-candidates`` of the time, once the pool is filled) or noisy teacher solutions."""
        n = self.rng.randint(self.args.min_candidates, self.args.max_candidates)
        if self.pool and self.rng.random() < self.args.self_candidates:
            q, samples = self.pool[self.rng.randrange(len(self.pool))]
            return q, self.rng.sample(samples, n)
        q = self.question()
        return q, self.candidates(q, n)

    def question(self) -> str:
        """A training question that is not held out."""
        while True:
            q = self.task.sample_question(self.rng)
            if q not in self.exclude:
                return q

    def candidates(self, q: str, n: int) -> list[str]:
        """``n`` noisy candidates for ``q``."""
        a = self.args
        return [noisy_candidate(self.task, q, a.cand_error_rate, a.slip_rate, self.rng) for _ in range(n)]

    def teacher(self, q: str) -> str:
        """The teacher's (systematically mistaken) worked solution."""
        return self.task.worked_solution(q, self.args.error_rate, self.rng)

    def single(self) -> Example:
        q = self.question()
        return Example(PROMPT_TEMPLATE.format(question=q), self.teacher(q))

    def integration(self) -> Example:
        q, cands = self.group()
        prompt = INTEGRATION_TEMPLATE.format(question=q, candidates=render_candidates(cands))
        if self.args.integration_target in INTEGRATIONS:
            return Example(prompt, INTEGRATIONS[self.args.integration_target](cands))
        return Example(prompt, self.task.worked_solution(q))

    def combined(self, q: str, cands: list[str]) -> str:
        """The combined solution shown in a context.

        ``teacher`` (stages 1-3): the clean solution or a fresh noisy candidate, half and half. ``follow``: like
        the collider's integrated outputs (``--integration-target``'s form over all the candidates) 60% of the
        time, else a fresh noisy candidate (20%) or the clean solution (20%), so that it sometimes disagrees with
        the other candidates.
        """
        if self.args.context_target == "teacher":
            return self.task.worked_solution(q) if self.rng.random() < 0.5 else self.candidates(q, 1)[0]
        u = self.rng.random()
        if u < 0.6:
            return INTEGRATIONS.get(self.args.integration_target, majority_candidate)(cands)
        return self.candidates(q, 1)[0] if u < 0.8 else self.task.worked_solution(q)

    def context(self) -> Example:
        q, cands = self.group()
        i = self.rng.randrange(len(cands))
        integrated = self.combined(q, cands)
        prompt = CONTEXT_TEMPLATE.format(question=q, others=render_candidates(cands, skip=i), integrated=integrated)
        others = cands[:i] + cands[i + 1 :]
        if self.args.context_target == "follow" and agrees(integrated, others, self.args.agreement):
            if self.args.integration_target != "tally":
                return Example(prompt, integrated)  # a worked solution: follow it
            # a vote count: follow its answer with a worked solution, the first other candidate that gives it
            return Example(prompt, first_with_answer(others, extract_answer(integrated)) or integrated)
        return Example(prompt, self.teacher(q))

    def batch(self, fmt: str, size: int) -> list[Example]:
        return [getattr(self, fmt)() for _ in range(size)]


def collate(tok: PreTrainedTokenizerFast, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels``; labels only on completion + ``<eos>``."""
    p_ids = tok([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    c_ids = tok([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    seqs = [p + c + [tok.eos_token_id] for p, c in zip(p_ids, c_ids)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for r, (p, s) in enumerate(zip(p_ids, seqs)):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
        labels[r, len(p) : len(s)] = torch.tensor(s[len(p) :])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------------------------- eval


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    prompts: list[str],
    *,
    sample: bool,
    num_return: int = 1,
    max_new_tokens: int = 64,
    chunk: int = 256,
) -> list[tuple[str, bool]]:
    """Generate completions (left padding). Returns ``(text, ended_with_eos)`` per sequence, prompt-major."""
    model.eval()
    out: list[tuple[str, bool]] = []
    for start in range(0, len(prompts), chunk):
        enc = tok(prompts[start : start + chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if sample else dict(do_sample=False)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_return,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **kwargs,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        for row in new.tolist():
            ended = tok.eos_token_id in row
            if ended:
                row = row[: row.index(tok.eos_token_id)]
            out.append((str(tok.decode(row, skip_special_tokens=True)), ended))
    return out


def score(outputs: list[tuple[str, bool]], answers: list[str]) -> tuple[float, float]:
    """(accuracy, well-formed rate) of outputs against answers (same length)."""
    correct = sum(is_correct(t, a) for (t, _), a in zip(outputs, answers))
    formed = sum(ended and extract_answer(t) is not None for t, ended in outputs)
    return correct / len(outputs), formed / len(outputs)


def quick_eval(model, tok, heldout: list[tuple[str, str]], samples: int) -> dict[str, float | None]:
    """Greedy and T=1 sampled accuracy (and well-formed rates) on the held-out pairs."""
    prompts = [PROMPT_TEMPLATE.format(question=q) for q, _ in heldout]
    answers = [a for _, a in heldout]
    g_acc, g_form = score(generate(model, tok, prompts, sample=False), answers)
    s_out = generate(model, tok, prompts, sample=True, num_return=samples)
    s_acc, s_form = score(s_out, [a for a in answers for _ in range(samples)])
    return {"greedy_acc": g_acc, "greedy_well_formed": g_form, "sampled_acc": s_acc, "sampled_well_formed": s_form}


def group_eval(model, tok, heldout: list[tuple[str, str]], group: int) -> dict[str, float]:
    """Single sample vs majority vote vs the model's greedy integrated answer, over G self-sampled candidates."""
    prompts = [PROMPT_TEMPLATE.format(question=q) for q, _ in heldout]
    cands = generate(model, tok, prompts, sample=True, num_return=group)
    single = majority = 0.0
    int_prompts = []
    for n, (q, a) in enumerate(heldout):
        texts = [t for t, _ in cands[n * group : (n + 1) * group]]
        got = [extract_answer(t) for t in texts]
        single += sum(g is not None and int(g) == int(a) for g in got) / group
        votes = Counter(int(g) for g in got if g is not None)
        majority += bool(votes) and votes.most_common(1)[0][0] == int(a)
        int_prompts.append(INTEGRATION_TEMPLATE.format(question=q, candidates=render_candidates(texts)))
    answers = [a for _, a in heldout]
    int_out = generate(model, tok, int_prompts, sample=False, chunk=64)
    integrated, formed = score(int_out, answers)
    n = len(heldout)
    return {
        "group_size": group,
        "single_sample_acc": single / n,
        "majority_vote_acc": majority / n,
        "integrated_greedy_acc": integrated,
        "integrated_well_formed": formed,
    }


def in_band(m: dict[str, float], a: argparse.Namespace) -> bool:
    return (
        a.greedy_lo <= m["greedy_acc"] <= a.greedy_hi
        and a.sampled_lo <= m["sampled_acc"] <= a.sampled_hi
        and min(m["greedy_well_formed"], m["sampled_well_formed"]) >= a.min_well_formed
    )


def should_stop(history: list[dict[str, float]], a: argparse.Namespace) -> bool:
    """Deterministic early stop: ``--patience`` consecutive in-band evaluations, or overshooting the band
    (greedy or sampled accuracy above it) after having been in it."""
    flags = [in_band(m, a) for m in history]
    if a.patience > 0 and len(flags) >= a.patience and all(flags[-a.patience :]):
        return True
    last = history[-1]
    overshoot = last["greedy_acc"] > a.greedy_hi or last["sampled_acc"] > a.sampled_hi
    return any(flags) and overshoot


def band_distance(m: dict[str, float], a: argparse.Namespace) -> float:
    def d(x: float, lo: float, hi: float) -> float:
        return max(lo - x, 0.0, x - hi)

    return (
        d(m["greedy_acc"], a.greedy_lo, a.greedy_hi)
        + d(m["sampled_acc"], a.sampled_lo, a.sampled_hi)
        + max(a.min_well_formed - min(m["greedy_well_formed"], m["sampled_well_formed"]), 0.0)
    )


# --------------------------------------------------------------------------------------------- main


def build_model(tok: PreTrainedTokenizerFast, a: argparse.Namespace) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "gcpo_lightning" / "assets" / "tiny-arith")
    p.add_argument("--threads", type=int, default=2)
    # model
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    # data
    p.add_argument("--error-rate", type=float, default=0.6, help="teacher mistake rate per carry/borrow step")
    p.add_argument("--cand-error-rate", type=float, default=0.6, help="mistake rate of the noisy candidates")
    p.add_argument("--slip-rate", type=float, default=0.3, help="probability that a noisy candidate has a random slip")
    p.add_argument("--min-candidates", type=int, default=2, help="fewest candidates in integration/context examples")
    p.add_argument("--max-candidates", type=int, default=8)
    p.add_argument(
        "--init", type=Path, default=None, help="continue from this checkpoint (stage 2) instead of a new model"
    )
    p.add_argument(
        "--integration-target",
        choices=("clean", "majority", "path", "tally"),
        default="clean",
        help="integration completions: the clean solution, a copy of the majority-answer candidate, a copy of the "
        "candidate a step-by-step vote keeps (path), or a vote count (every candidate's answer, then the most "
        "common one)",
    )
    p.add_argument(
        "--context-target",
        choices=("teacher", "follow"),
        default="teacher",
        help="context completions: a teacher solution (ignores the context), or a copy of the combined solution "
        "when another candidate gives the same answer (for a vote count, the first such candidate), a teacher "
        "solution otherwise",
    )
    p.add_argument(
        "--agreement",
        choices=("corroborated", "mode"),
        default="corroborated",
        help="when --context-target follow copies the combined solution: another candidate gives its answer "
        "(corroborated), or its answer is one of the other candidates' most common (mode)",
    )
    p.add_argument(
        "--self-candidates",
        type=float,
        default=0.0,
        help="share of integration and context examples whose candidates are the model's own T=1 samples (from a "
        "pool redrawn every --self-refresh steps) instead of noisy teacher solutions",
    )
    p.add_argument("--self-pool", type=int, default=256, help="questions in the pool of the model's own samples")
    p.add_argument("--self-refresh", type=int, default=100, help="steps between two draws of the pool")
    p.add_argument("--mix", type=str, default="0.8,0.1,0.1", help="step fractions of single,integration,context")
    p.add_argument("--batch-single", type=int, default=32)
    p.add_argument("--batch-long", type=int, default=8, help="batch size of the (long) integration/context formats")
    # optimisation
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    # evaluation / selection
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-start", type=int, default=300, help="first step at which to evaluate")
    p.add_argument("--eval-n", type=int, default=200, help="held-out questions used for evaluation")
    p.add_argument("--exclude-n", type=int, default=1000, help="first held-out questions never trained on")
    p.add_argument("--eval-samples", type=int, default=2, help="T=1 samples per question")
    p.add_argument("--group", type=int, default=8, help="G for the single/majority/integrated measurement")
    p.add_argument(
        "--group-evals",
        action="store_true",
        help="measure single / majority vote / integrated accuracy (as at the end) at every evaluation too",
    )
    p.add_argument("--greedy-lo", type=float, default=0.30)
    p.add_argument("--greedy-hi", type=float, default=0.50)
    p.add_argument("--sampled-lo", type=float, default=0.25)
    p.add_argument("--sampled-hi", type=float, default=0.45)
    p.add_argument("--min-well-formed", type=float, default=0.95)
    p.add_argument("--patience", type=int, default=3, help="stop after this many consecutive in-band evals (0: never)")
    p.add_argument("--no-save", action="store_true", help="measure only, write nothing")
    return p.parse_args(argv)


def lr_at(step: int, a: argparse.Namespace) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


STAGE_KEYS = ("command", "selected_step", "selected_in_band", "selected_metrics", "group_metrics", "train_wall_s")


def stage_summary(info: dict) -> dict:
    """The part of a stage's ``training_info.json`` its successors keep in their ``lineage``."""
    return {k: info[k] for k in (*STAGE_KEYS, "total_wall_s", "steps_trained") if k in info}


def lineage_of(init: Path | None) -> list[dict]:
    """The stages that made the checkpoint ``init``: its own ``lineage`` (which ends with it), or its summary."""
    path = init / "training_info.json" if init is not None else None
    if path is None or not path.exists():
        return []
    info = json.loads(path.read_text())
    return info.get("lineage") or [stage_summary(info)]


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    t0 = time.time()

    task = ArithmeticTask()
    tok = build_char_tokenizer()
    model = LlamaForCausalLM.from_pretrained(a.init) if a.init else build_model(tok, a)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,}", flush=True)

    heldout_all = task.heldout(max(a.exclude_n, a.eval_n))
    exclude = {q for q, _ in heldout_all[: a.exclude_n]}
    heldout = heldout_all[: a.eval_n]
    sampler = MixtureSampler(task, a, exclude, rng)
    mix = [float(x) for x in a.mix.split(",")]

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.98))
    history: list[dict] = []
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    losses: dict[str, list[float]] = {f: [] for f in FORMATS}

    def evaluate(step: int) -> None:
        te = time.time()
        m = quick_eval(model, tok, heldout, a.eval_samples)
        if a.group_evals:
            m.update({f"group_{k}": v for k, v in group_eval(model, tok, heldout, a.group).items()})
        m.update(step=step, train_wall_s=round(te - t0, 1), eval_s=round(time.time() - te, 1))
        m.update({f"loss_{f}": (sum(v[-50:]) / len(v[-50:]) if v else None) for f, v in losses.items()})
        history.append(m)
        snapshots[step] = copy.deepcopy(model.state_dict())
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}), flush=True)
        model.train()

    model.train()
    for step in range(a.steps):
        if a.self_candidates > 0 and step % a.self_refresh == 0:
            sampler.refresh_pool(model, tok)
        fmt = rng.choices(FORMATS, weights=mix)[0]
        batch = collate(tok, sampler.batch(fmt, a.batch_single if fmt == "single" else a.batch_long))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        losses[fmt].append(loss.item())
        if (step + 1) % 25 == 0:
            recent = {f: round(sum(v[-20:]) / max(1, len(v[-20:])), 4) for f, v in losses.items()}
            print(f"step {step + 1} lr {lr_at(step, a):.2e} loss {recent} wall {time.time() - t0:.0f}s", flush=True)
        if (step + 1 >= a.eval_start and (step + 1) % a.eval_every == 0) or step + 1 == a.steps:
            evaluate(step + 1)
            if should_stop(history, a):
                print(f"early stop at step {step + 1}", flush=True)
                break
    train_wall = time.time() - t0
    steps_done = history[-1]["step"]

    banded = [m for m in history if in_band(m, a)]
    chosen = banded[-1] if banded else min(history, key=lambda m: (band_distance(m, a), -m["step"]))
    print(f"selected step {chosen['step']} (in band: {bool(banded)})", flush=True)
    model.load_state_dict(snapshots[chosen["step"]])
    group = group_eval(model, tok, heldout, a.group)
    print(json.dumps(group), flush=True)

    info = {
        "description": "SFT of a tiny char-level Llama on the embedded arithmetic task",
        "command": "python scripts/pretrain_tiny_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "task": asdict(task),
        "num_parameters": n_params,
        "model_config": model.config.to_dict(),
        "seed": a.seed,
        "steps_trained": steps_done,
        "selected_step": chosen["step"],
        "selected_in_band": bool(banded),
        "heldout": {"seed": 1234, "eval_n": a.eval_n, "excluded_from_training_n": a.exclude_n},
        "selected_metrics": {k: v for k, v in chosen.items() if not k.startswith("loss_")},
        "group_metrics": group,
        "history": history,
        "train_wall_s": round(train_wall, 1),
        "total_wall_s": round(time.time() - t0, 1),
        "torch_version": torch.__version__,
        "threads": a.threads,
    }
    info["lineage"] = [*lineage_of(a.init), stage_summary(info)]  # every stage, this one last
    print(json.dumps({k: info[k] for k in ("selected_step", "selected_metrics", "group_metrics", "total_wall_s")}))
    if a.no_save:
        return
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    (a.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {a.out}", flush=True)


if __name__ == "__main__":
    main()
