"""GSM8K-style math word problems generated offline: short stories with 1-3 arithmetic steps and integer answers.

Each problem comes from one of a few story templates filled with random names, objects and small numbers, and
has a worked solution in GSM8K's format: one sentence per step with the calculation written out
(``"He buys 3 * 4 = 12 pencils."``) and a last line ``#### <answer>``. Everything is deterministic given the seed.

Held-out problems are disjoint from training problems by their *mathematics*, not only their text: a problem
is held out when a stable hash of its template and numbers falls in the held-out bucket, so no training problem
uses the same template with the same numbers as a held-out one (names and objects do not matter).

This module has no torch dependency.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gcpo_lightning.data.templates import MATH_TEMPLATE

WORD_PROBLEM_TEMPLATE = MATH_TEMPLATE
"""How a word problem is asked: the question, then the usual ``\\boxed{}`` instruction."""

Split = Literal["train", "heldout"]

NAMES: tuple[tuple[str, str], ...] = (
    ("Ava", "she"),
    ("Ben", "he"),
    ("Chloe", "she"),
    ("Daniel", "he"),
    ("Emma", "she"),
    ("Felix", "he"),
    ("Grace", "she"),
    ("Hugo", "he"),
    ("Isla", "she"),
    ("Jack", "he"),
    ("Lena", "she"),
    ("Marco", "he"),
    ("Nora", "she"),
    ("Omar", "he"),
    ("Priya", "she"),
    ("Sam", "he"),
    ("Tara", "she"),
    ("Victor", "he"),
)
ITEMS: tuple[str, ...] = (
    "apples",
    "pencils",
    "stickers",
    "marbles",
    "cards",
    "books",
    "shells",
    "stamps",
    "balloons",
    "beads",
    "crayons",
    "toy cars",
)
THINGS: tuple[str, ...] = ("a book", "a toy", "lunch", "a movie ticket", "a plant", "a board game", "a scarf")
OPERATORS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b,
}


@dataclass(frozen=True)
class WordProblem:
    """One generated problem.

    Args:
        question: the story and its question.
        solution: the worked solution, one step a line, ending with ``#### <answer>``.
        answer: the integer answer.
        template: the name of the story template.
        numbers: the numbers drawn for the template (with ``template``, what makes problems the same).
    """

    question: str
    solution: str
    answer: int
    template: str
    numbers: tuple[int, ...]

    def gsm8k_row(self) -> dict[str, str]:
        """The problem as a GSM8K dataset row: ``question``, and ``answer`` holding the whole solution."""
        return {"question": self.question, "answer": self.solution}

    def row(self) -> dict[str, str]:
        """The problem as a prompt row's columns: ``question``, ``answer`` (the number) and ``solution``."""
        return {"question": self.question, "answer": str(self.answer), "solution": self.solution}


class Story:
    """The cast of one problem (a person, a friend, an object, a purchase) and its solution, built step by step."""

    def __init__(self, rng: random.Random) -> None:
        (self.name, he), (self.friend, _) = rng.sample(NAMES, 2)
        self.he, self.He = he, he.capitalize()
        self.his, self.him = ("his", "him") if he == "he" else ("her", "her")
        self.items, self.thing = rng.choice(ITEMS), rng.choice(THINGS)
        self.lines: list[str] = []

    def text(self, template: str, **numbers: int | str) -> str:
        """``template`` filled with the cast and ``numbers``."""
        return template.format(**vars(self), **numbers)

    def step(self, sentence: str, a: int, op: str, b: int) -> int:
        """Add one solution line ``sentence`` with ``{calc}`` written as ``a op b = result``; returns the result."""
        result = OPERATORS[op](a, b)
        if op == "/" and a % b:
            raise ValueError(f"{a} / {b} is not an integer")
        self.lines.append(self.text(sentence, calc=f"{a} {op} {b} = {result}"))
        return result


Made = tuple[tuple[int, ...], str, int]
"""What a template returns: its numbers, the question, and the answer (the solution lines are in the story)."""


def t_add(rng: random.Random, s: Story) -> Made:
    a, b = rng.randint(2, 50), rng.randint(2, 50)
    q = s.text("{name} has {a} {items}. {He} buys {b} more {items}. How many {items} does {name} have now?", a=a, b=b)
    return (a, b), q, s.step("{name} has {calc} {items} now.", a, "+", b)


def t_sub(rng: random.Random, s: Story) -> Made:
    a = rng.randint(10, 60)
    b = rng.randint(2, a - 1)
    q = s.text(
        "{name} had {a} {items} and gave {b} of them to {friend}. How many {items} does {name} have left?", a=a, b=b
    )
    return (a, b), q, s.step("{name} has {calc} {items} left.", a, "-", b)


def t_mul(rng: random.Random, s: Story) -> Made:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    q = s.text("A box holds {a} {items}. {name} has {b} full boxes. How many {items} does {name} have?", a=a, b=b)
    return (a, b), q, s.step("The boxes hold {calc} {items}.", b, "*", a)


def t_div(rng: random.Random, s: Story) -> Made:
    b, share = rng.randint(2, 9), rng.randint(2, 12)
    q = s.text(
        "{name} shares {total} {items} equally among {b} friends. How many {items} does each friend get?",
        total=b * share,
        b=b,
    )
    return (b * share, b), q, s.step("Each friend gets {calc} {items}.", b * share, "/", b)


def t_packs(rng: random.Random, s: Story) -> Made:
    a, b, c = rng.randint(2, 30), rng.randint(2, 6), rng.randint(2, 10)
    q = s.text(
        "{name} has {a} {items}. {He} buys {b} packs with {c} {items} in each pack. "
        "How many {items} does {name} have now?",
        a=a,
        b=b,
        c=c,
    )
    packs = s.step("The packs hold {calc} {items}.", b, "*", c)
    return (a, b, c), q, s.step("{name} has {calc} {items} now.", a, "+", packs)


def t_wage(rng: random.Random, s: Story) -> Made:
    a, b = rng.randint(5, 20), rng.randint(2, 8)
    c = rng.randint(1, a * b - 1)
    q = s.text(
        "{name} earns ${a} an hour and works {b} hours. Then {he} spends ${c} on {thing}. "
        "How many dollars does {name} have left?",
        a=a,
        b=b,
        c=c,
    )
    earned = s.step("{name} earns {calc} dollars.", a, "*", b)
    return (a, b, c), q, s.step("{He} has {calc} dollars left.", earned, "-", c)


def t_orchard(rng: random.Random, s: Story) -> Made:
    a, b = rng.randint(2, 12), rng.randint(3, 15)
    c = rng.randint(1, a * b - 1)
    q = s.text(
        "A farmer plants {a} rows of {b} trees. A storm knocks down {c} trees. How many trees are still standing?",
        a=a,
        b=b,
        c=c,
    )
    planted = s.step("The farmer plants {calc} trees.", a, "*", b)
    return (a, b, c), q, s.step("There are {calc} trees still standing.", planted, "-", c)


def t_times_as_many(rng: random.Random, s: Story) -> Made:
    a, k = rng.randint(3, 30), rng.randint(2, 4)
    q = s.text(
        "{name} reads {a} pages on Monday and {k} times as many pages on Tuesday. "
        "How many pages does {name} read on the two days together?",
        a=a,
        k=k,
    )
    tuesday = s.step("On Tuesday {he} reads {calc} pages.", a, "*", k)
    return (a, k), q, s.step("Together {he} reads {calc} pages.", a, "+", tuesday)


def t_more_than(rng: random.Random, s: Story) -> Made:
    a, b = rng.randint(3, 40), rng.randint(2, 20)
    q = s.text(
        "{name} has {a} {items}. {friend} has {b} more {items} than {name}. How many {items} do they have altogether?",
        a=a,
        b=b,
    )
    friend = s.step("{friend} has {calc} {items}.", a, "+", b)
    return (a, b), q, s.step("Altogether they have {calc} {items}.", a, "+", friend)


def t_shopping(rng: random.Random, s: Story) -> Made:
    a, b, c, d = rng.randint(2, 5), rng.randint(2, 9), rng.randint(2, 6), rng.randint(1, 4)
    q = s.text(
        "{name} buys {a} notebooks that cost ${b} each and {c} pens that cost ${d} each. "
        "How many dollars does {name} spend?",
        a=a,
        b=b,
        c=c,
        d=d,
    )
    notebooks = s.step("The notebooks cost {calc} dollars.", a, "*", b)
    pens = s.step("The pens cost {calc} dollars.", c, "*", d)
    return (a, b, c, d), q, s.step("{name} spends {calc} dollars.", notebooks, "+", pens)


def t_bakery(rng: random.Random, s: Story) -> Made:
    a, b, d = rng.randint(2, 6), rng.randint(6, 12), rng.randint(2, 6)
    per_bag = rng.randint(1, (a * b - 1) // d)
    c = a * b - d * per_bag
    q = s.text(
        "A bakery bakes {a} trays of {b} cookies. It sells {c} cookies and packs the rest equally into "
        "{d} bags. How many cookies go in each bag?",
        a=a,
        b=b,
        c=c,
        d=d,
    )
    baked = s.step("The bakery bakes {calc} cookies.", a, "*", b)
    rest = s.step("After the sale {calc} cookies are left.", baked, "-", c)
    return (a, b, c, d), q, s.step("Each bag gets {calc} cookies.", rest, "/", d)


def t_savings(rng: random.Random, s: Story) -> Made:
    a, b, c = rng.randint(2, 15), rng.randint(2, 8), rng.randint(5, 30)
    d = rng.randint(1, a * b + c - 1)
    q = s.text(
        "{name} saves ${a} every week for {b} weeks. {His} grandmother gives {him} ${c}. Then {he} spends "
        "${d} on {thing}. How many dollars does {name} have now?",
        His=s.his.capitalize(),
        a=a,
        b=b,
        c=c,
        d=d,
    )
    saved = s.step("{name} saves {calc} dollars.", a, "*", b)
    total = s.step("With the gift {he} has {calc} dollars.", saved, "+", c)
    return (a, b, c, d), q, s.step("After shopping {he} has {calc} dollars.", total, "-", d)


TEMPLATES: dict[str, tuple[int, Callable[[random.Random, Story], Made]]] = {
    "add": (1, t_add),
    "sub": (1, t_sub),
    "mul": (1, t_mul),
    "div": (1, t_div),
    "packs": (2, t_packs),
    "wage": (2, t_wage),
    "orchard": (2, t_orchard),
    "times_as_many": (2, t_times_as_many),
    "more_than": (2, t_more_than),
    "shopping": (3, t_shopping),
    "bakery": (3, t_bakery),
    "savings": (3, t_savings),
}
"""Story templates by name: ``(number of arithmetic steps, generator)``."""


def stable_bucket(template: str, numbers: tuple[int, ...], buckets: int = 1000) -> int:
    """A bucket in ``[0, buckets)`` from a hash of the problem's template and numbers, the same in every process."""
    digest = hashlib.blake2b(f"{template}:{numbers}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


@dataclass(frozen=True)
class WordProblemTask:
    """Generates word problems with ``min_steps`` to ``max_steps`` arithmetic steps.

    Args:
        min_steps: fewest arithmetic steps in a problem (1-3).
        max_steps: most arithmetic steps in a problem (1-3).
        heldout_fraction: share of the problem space (by template and numbers) reserved for held-out problems.
    """

    min_steps: int = 1
    max_steps: int = 3
    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps <= 3:
            raise ValueError(f"need 1 <= min_steps <= max_steps <= 3, got {self.min_steps}, {self.max_steps}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    @property
    def templates(self) -> list[str]:
        """Names of the templates with an allowed number of steps."""
        return [name for name, (steps, _) in TEMPLATES.items() if self.min_steps <= steps <= self.max_steps]

    def sample(self, rng: random.Random) -> WordProblem:
        """One problem drawn with ``rng`` (train or held-out)."""
        name = rng.choice(self.templates)
        story = Story(rng)
        numbers, question, answer = TEMPLATES[name][1](rng, story)
        solution = "\n".join([*story.lines, f"#### {answer}"])
        return WordProblem(question, solution, answer, name, numbers)

    def is_heldout(self, problem: WordProblem) -> bool:
        """Whether the problem's template and numbers fall in the held-out part of the space."""
        return stable_bucket(problem.template, problem.numbers) < round(self.heldout_fraction * 1000)

    def generate(self, n: int, seed: int = 0, split: Split = "train") -> list[WordProblem]:
        """``n`` problems with distinct questions from ``split``, deterministic given ``seed``.

        Raises:
            ValueError: when ``n`` distinct problems cannot be found in ``100 * n`` draws.
        """
        rng, want_heldout = random.Random(seed), split == "heldout"
        problems: dict[str, WordProblem] = {}
        for _ in range(100 * max(n, 1)):
            if len(problems) >= n:
                break
            problem = self.sample(rng)
            if self.is_heldout(problem) == want_heldout:
                problems.setdefault(problem.question, problem)
        if len(problems) < n:
            raise ValueError(f"found only {len(problems)} distinct {split} problems of the {n} asked for")
        return list(problems.values())


def write_word_problems(
    path: str | Path, n: int, seed: int = 0, split: Split = "train", task: WordProblemTask | None = None
) -> Path:
    """Write ``n`` problems as GSM8K-format JSONL rows (``question``, ``answer`` = the solution).

    Read them back with ``HFPromptDataModule(path=<file>, preset="gsm8k")``.

    Args:
        path: the JSONL file to write.
        n: number of problems.
        seed: generation seed.
        split: ``train`` or ``heldout``.
        task: the generator (default: 1-3 steps).
    """
    path = Path(path)
    problems = (task or WordProblemTask()).generate(n, seed, split)
    path.write_text("".join(json.dumps(p.gsm8k_row()) + "\n" for p in problems))
    return path


def rows(problems: list[WordProblem], prompt_template: str = WORD_PROBLEM_TEMPLATE) -> list[dict[str, Any]]:
    """Prompt rows: ``prompt`` (``prompt_template`` around the question), ``question``, ``answer``, ``solution``."""
    return [{"prompt": prompt_template.format(question=p.question), **p.row()} for p in problems]
