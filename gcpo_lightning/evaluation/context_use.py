"""Does the model use its GCPO context? A diagnostic of the collider's prompts on any causal LM.

GCPO's causal weighting (paper Eq. 11) compares each candidate ``y_i`` with the outputs ``O_{i,l,k}`` the policy
writes under the conditioning context ``x_{i,l} = {q, y_k: k != i, y_{n,l}}``. If the model ignores that
context, ``O_{i,l,k}`` are plain samples under ``q``, ``Zbar_{i,l}`` carries no information about the collider and
``U_i`` is noise. :func:`measure_context_use` measures, with the collider's own prompt templates:

- the accuracy of the outputs under ``x_{i,l}`` when the combined solution ``y_{n,l}`` is right and when it is
  wrong;
- how often they give the combined solution's answer, when another candidate corroborates it (gives the same
  answer) and when none does; and how often they copy a wrong combined answer;
- each of these next to the same measure on fresh samples under ``q`` of the same questions (a hard question is
  often wrong with or without a context: only the difference is the context's doing);
- one candidate against the majority vote over the ``G`` candidates and against the integrated outputs ``y_n``
  (sampled, as GCPO draws them, and greedy).

A model that uses its context follows a consistent combined solution far more often than fresh samples would,
and its integrated outputs are at least as accurate as the majority vote. ``python -m gcpo_lightning
context-use --help`` runs it on a model folder (:mod:`gcpo_lightning.evaluation.context_use_command`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from gcpo_lightning.components.graphs.prompts import (
    CANDIDATE_LINE,
    CONTEXT_TEMPLATE,
    INTEGRATION_TEMPLATE,
    render_candidates,
)
from gcpo_lightning.data.templates import PROMPT_TEMPLATE

Generate = Callable[[list[str], int, bool], list[str]]
"""``generate(prompts, n, greedy) -> texts``: ``n`` completions per prompt, prompt-major (``len(prompts) * n``)."""

AnswerOf = Callable[[str], Hashable | None]
"""The comparable answer of a completion (``None`` when it has none), e.g. the integer after ``Answer:``."""


@dataclass(frozen=True)
class Templates:
    """The prompts, as the collider renders them (pass the ``ColliderGraphBuilder``'s own when they differ)."""

    prompt: str = PROMPT_TEMPLATE
    integration: str = INTEGRATION_TEMPLATE
    context: str = CONTEXT_TEMPLATE
    candidate: str = CANDIDATE_LINE


@dataclass(frozen=True)
class ContextUseSettings:
    """How much to sample.

    Args:
        group: ``G``, candidates per question.
        integrated: ``M``, sampled integrated outputs per question (as GCPO draws them).
        contexts: candidates ``i`` per question whose contexts ``x_{i,l}`` are sampled (the first ``contexts``;
            candidates are exchangeable), at most ``group``.
        samples: ``K``, outputs per context, and fresh samples per question under ``q``.
    """

    group: int = 8
    integrated: int = 2
    contexts: int = 4
    samples: int = 4

    def __post_init__(self) -> None:
        for name in ("group", "integrated", "contexts", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"ContextUseSettings: {name} must be >= 1, got {getattr(self, name)}")
        if self.group < 2:
            raise ValueError(
                f"ContextUseSettings: group must be >= 2 (a context needs other candidates), got {self.group}"
            )
        if self.contexts > self.group:
            raise ValueError(f"ContextUseSettings: contexts ({self.contexts}) must be <= group ({self.group})")


@dataclass
class Rate:
    """A proportion ``hits / n`` (``nan`` when ``n`` is 0)."""

    hits: float = 0.0
    n: int = 0

    def add(self, hit: float) -> None:
        self.hits += hit
        self.n += 1

    @property
    def value(self) -> float:
        return self.hits / self.n if self.n else float("nan")


CONTEXT_ROWS: tuple[tuple[str, str], ...] = (
    ("right", "accurate, combined solution right"),
    ("wrong", "accurate, combined solution wrong"),
    ("follow_consistent", "gives the combined answer, another candidate gives it too"),
    ("follow_inconsistent", "gives the combined answer, no other candidate does"),
    ("copy_wrong", "gives a wrong combined answer"),
)
"""Measures of the outputs under ``x_{i,l}``, each paired with the same measure on fresh samples under ``q`` of
the same question (key ``x/<name>`` and ``q/<name>``): the difference is what the context does."""

GROUP_ROWS: tuple[tuple[str, str], ...] = (
    ("accuracy_q", "a fresh sample under q"),
    ("single", "one candidate"),
    ("majority", "majority vote over the G candidates"),
    ("integrated_sampled", "integrated output y_n, sampled (as GCPO draws it)"),
    ("integrated_greedy", "integrated output y_n, greedy"),
)
"""Accuracy of one sample, of the majority vote and of the integrated outputs."""

KEYS = (*(f"{side}/{k}" for k, _ in CONTEXT_ROWS for side in ("x", "q")), *(k for k, _ in GROUP_ROWS))


@dataclass
class ContextUse:
    """The measured rates (keys :data:`KEYS`) and the settings they were measured with."""

    settings: ContextUseSettings
    questions: int
    rates: dict[str, Rate] = field(default_factory=lambda: {key: Rate() for key in KEYS})

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{key: {"value": v, "n": n}}`` for JSON."""
        return {key: {"value": r.value, "n": r.n} for key, r in self.rates.items()}


def _cell(rate: Rate) -> str:
    return f"{100 * rate.value:.1f}% (n={rate.n})"


def side_by_side(reports: dict[str, ContextUse]) -> str:
    """Two markdown tables with columns per model: the context's effect (under ``x`` against under ``q``, same
    questions), then one candidate against the majority vote and the integrated outputs."""
    names = list(reports)
    head = " | ".join(f"{n}: under x | {n}: under q" for n in names)
    lines = [f"| outputs | {head} |", "|---|" + "---|" * 2 * len(names)]
    for key, label in CONTEXT_ROWS:
        cells = [f"{_cell(r.rates['x/' + key])} | {_cell(r.rates['q/' + key])}" for r in reports.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| accuracy of | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in GROUP_ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(r.rates[key]) for r in reports.values()) + " |")
    return "\n".join(lines)


def mode_answers(answers: Sequence[Hashable | None]) -> set[Hashable]:
    """The most common non-``None`` answers (all of them on a tie); empty when there is none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return set()
    top = max(counts.values())
    return {a for a, c in counts.items() if c == top}


def majority_answer(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most common non-``None`` answer, the first one seen on a tie (``None`` when there is none)."""
    modes = mode_answers(answers)
    return next((a for a in answers if a in modes), None)


def chunks(items: list, size: int) -> list[list]:
    """``items`` cut into consecutive lists of ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclass
class _Question:
    """The texts sampled for one question."""

    question: str
    gold: Hashable
    candidates: list[str]
    integrated: list[str]


def _sample_groups(
    generate: Generate, problems: Sequence[tuple[str, Hashable]], templates: Templates, s: ContextUseSettings
) -> list[_Question]:
    """``G`` candidates under ``q`` and ``M`` sampled integrated outputs per question."""
    prompts = [templates.prompt.format(question=q) for q, _ in problems]
    cands = chunks(generate(prompts, s.group, False), s.group)
    lists = [render_candidates(c, None, templates.candidate) for c in cands]
    integration = [templates.integration.format(question=q, candidates=c) for (q, _), c in zip(problems, lists)]
    integrated = chunks(generate(integration, s.integrated, False), s.integrated)
    return [_Question(q, gold, c, y) for (q, gold), c, y in zip(problems, cands, integrated)]


def _group_rates(
    report: ContextUse, groups: list[_Question], greedy: list[str], fresh: list[list[str]], answer_of: AnswerOf
) -> None:
    """Rates of one candidate, the majority vote, the integrated outputs and fresh samples under ``q``."""
    r = report.rates
    for g, y_greedy, own in zip(groups, greedy, fresh):
        answers = [answer_of(c) for c in g.candidates]
        for a in answers:
            r["single"].add(a == g.gold)
        r["majority"].add(majority_answer(answers) == g.gold)
        for y in g.integrated:
            r["integrated_sampled"].add(answer_of(y) == g.gold)
        r["integrated_greedy"].add(answer_of(y_greedy) == g.gold)
        for o in own:
            r["accuracy_q"].add(answer_of(o) == g.gold)


def _context_prompts(g: _Question, templates: Templates, s: ContextUseSettings) -> list[tuple[int, int, str]]:
    """``(i, l, x_{i,l})`` for the first ``contexts`` candidates and every integrated output."""
    out = []
    for i in range(s.contexts):
        others = render_candidates(g.candidates, i, templates.candidate)
        for m, y in enumerate(g.integrated):
            out.append((i, m, templates.context.format(question=g.question, others=others, integrated=y)))
    return out


def _context_rates(
    report: ContextUse,
    g: _Question,
    contexts: list[tuple[int, int, str]],
    outputs: list[list[str]],
    fresh: list[Hashable | None],
    answer_of: AnswerOf,
) -> None:
    """Each context's outputs (``x/``) and the question's fresh samples (``q/``) under the context's condition."""
    answers = [answer_of(c) for c in g.candidates]
    for (i, m, _), outs in zip(contexts, outputs):
        combined = answer_of(g.integrated[m])
        right = combined == g.gold
        for side, got in (("x", [answer_of(o) for o in outs]), ("q", fresh)):
            _count(report, side, "right" if right else "wrong", got, g.gold)
            if combined is None:
                continue
            agree = combined in answers[:i] + answers[i + 1 :]
            _count(report, side, "follow_consistent" if agree else "follow_inconsistent", got, combined)
            if not right:
                _count(report, side, "copy_wrong", got, combined)


def _count(report: ContextUse, side: str, key: str, got: list[Hashable | None], target: Hashable) -> None:
    """Add whether each answer in ``got`` equals ``target`` to rate ``side/key``."""
    for a in got:
        report.rates[f"{side}/{key}"].add(a == target)


def measure_context_use(
    generate: Generate,
    problems: Sequence[tuple[str, Hashable]],
    answer_of: AnswerOf,
    settings: ContextUseSettings | None = None,
    templates: Templates | None = None,
) -> ContextUse:
    """Measure how the model's outputs depend on the collider's context (see the module docstring).

    Args:
        generate: the model's sampler (``generate(prompts, n, greedy)``); sampling as in training (e.g. T=1).
        problems: ``(question, gold)`` pairs; ``gold`` is compared with ``answer_of(completion)``.
        answer_of: the comparable answer of a completion, ``None`` when it has none.
        settings: ``G``, ``M``, contexts per question and ``K``.
        templates: the prompts (the kit's defaults unless the collider was configured with others).

    Returns:
        The rates, each with the number of outputs behind it.
    """
    s, t = settings or ContextUseSettings(), templates or Templates()
    if not problems:
        raise ValueError("measure_context_use: no problems given")
    report = ContextUse(s, len(problems))
    groups = _sample_groups(generate, problems, t, s)
    integration = [
        t.integration.format(question=g.question, candidates=render_candidates(g.candidates, None, t.candidate))
        for g in groups
    ]
    greedy = generate(integration, 1, True)
    fresh = chunks(generate([t.prompt.format(question=g.question) for g in groups], s.samples, False), s.samples)
    _group_rates(report, groups, greedy, fresh, answer_of)
    contexts = [_context_prompts(g, t, s) for g in groups]
    flat = [x for per_question in contexts for _, _, x in per_question]
    outputs = chunks(generate(flat, s.samples, False), s.samples)
    start = 0
    for g, per_question, own in zip(groups, contexts, fresh):
        mine = outputs[start : start + len(per_question)]
        start += len(per_question)
        _context_rates(report, g, per_question, mine, [answer_of(o) for o in own], answer_of)
    return report
