r"""Math answers: find the final answer in a text and decide whether two answers are mathematically equal.

Equivalence is decided by Hugging Face's `math-verify <https://github.com/huggingface/Math-Verify>`_ (``parse`` and
``verify``), with a small hand-written fallback used when math-verify cannot parse an answer (or fails on it).

Rules (tested in ``tests/unit/test_math_answers.py``):

* **Prediction extraction** (:func:`extract_prediction`), first rule that applies:

  1. the content of the **last** top-level ``\boxed{...}`` (or ``\fbox{...}``; also MATH's unbraced ``\boxed 5``,
     up to the next space or ``$``). Earlier boxes are ignored, so boxing several candidates does not earn a reward
     unless the last one is right, and an empty last box is no answer. (math-verify alone would read
     ``\boxed{1}, \boxed{2}`` as the set ``{1, 2}``; we do not.)
  2. the text after the last ``Answer:`` / ``answer is`` / ``final answer is`` marker, up to the end of that line
     (the first ``$...$`` / ``\(...\)`` chunk if the line has one, else up to the end of the sentence);
  3. the last number in the completion (GSM8K-style "flexible" extraction), unless ``fallback_to_last_number=False``.

* **Normalisation** (:func:`normalize_answer`) before parsing: outer ``\boxed{}`` and ``$``/``\(``/``\[`` delimiters
  removed, Markdown ``**`` and a final ``.`` dropped, a leading currency ``$`` dropped, thousands separators removed
  when the *whole* answer is one number (``1,234`` is 1234; ``1,2`` and ``(1,234)`` keep their comma and read as a
  set/tuple), and trailing unit words dropped after a number (``5 dollars`` and ``5\text{ cm}`` are 5).

* **Equivalence** (:func:`answers_match`): math-verify's semantics: ``\frac{1}{2}`` = ``\dfrac12`` = ``1/2`` = ``0.5``;
  ``\sqrt{2}`` = ``\sqrt2`` = ``2^{1/2}``; ``x = 5`` matches ``5``; decimals are compared after rounding to 6 places,
  so ``0.333333`` matches ``1/3`` but ``0.33`` does not. A **percentage** ``5\%`` matches both ``5`` and ``0.05``
  (math-verify's rule, kept by the fallback); a plain ``0.05`` does not match ``5``.

* **Gold answers** (:func:`extract_gold`) that cannot be parsed raise :class:`GoldAnswerError`; they never score.
  A GSM8K gold (after ``####``) must be a number; a bare word of 3+ letters (``Sunday``) is read as ``\text{Sunday}``,
  not as a product of symbols.

**Threads**: math-verify's timeouts use ``signal.alarm``, which only works in the main thread. The timeout is passed
in the main thread and disabled elsewhere (:func:`timeout_seconds`), so rewards work from any thread. Off the main
thread nothing interrupts a slow comparison, so two guards apply everywhere: predictions longer than
:data:`MAX_ANSWER_CHARS` are not parsed, and answers whose evaluation could create huge numbers (``10^{10^{10}}``,
``(10^{10})!``; see :data:`MAX_ANSWER_DIGITS`) skip math-verify for the bounded fallback.
"""

from __future__ import annotations

import ast
import logging
import math
import operator
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import math_verify

logger = logging.getLogger(__name__)

GoldStyle = Literal["plain", "gsm8k", "boxed"]
"""How to find the answer in a reference: the text itself, the text after ``####``, or the last ``\\boxed{}``."""

GOLD_STYLES: tuple[str, ...] = ("plain", "gsm8k", "boxed")

MATH_VERIFY_TIMEOUT_S = 5
"""math-verify's per-call timeout in the main thread (seconds)."""

MAX_ANSWER_CHARS = 512
"""Extracted predictions longer than this are not parsed (they score 0)."""

MAX_ANSWER_DIGITS = 100_000
"""Answers whose evaluation could create numbers with more digits (``10^{10^{10}}``) skip math-verify."""


class GoldAnswerError(ValueError):
    """A reference answer that cannot be parsed; the message quotes it."""


@dataclass(frozen=True)
class ParsedAnswer:
    """An answer: its normalised text and math-verify's parse of it.

    Args:
        text: the normalised answer text, e.g. ``"\\frac{3}{4}"``.
        parsed: math-verify's parse results (SymPy objects and strings); empty when math-verify failed.
    """

    text: str
    parsed: tuple[Any, ...] = ()


# ----- finding the answer in a text ----------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?:\s*\{| \s*([^\s${][^\s$]*))")
"""``\\boxed{`` (group 1 ``None``; the match ends after the brace) or unbraced ``\\boxed 5`` (group 1: ``5``)."""
_MARKER_RE = re.compile(r"\b(?:final\s+)?answer\s*(?:is\b\s*:?|:|=)", re.IGNORECASE)
_MATH_CHUNK_RE = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_SENTENCE_END_RE = re.compile(r"[;!?]|\.(?!\d)")
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")


def _matching_brace(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos`` (escaped braces skipped), or ``None`` if unclosed."""
    depth, i = 0, open_pos
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return i
        i += 1
    return None


def boxed_contents(text: str) -> list[str]:
    r"""The contents of the top-level ``\boxed{...}`` groups of ``text``, left to right.

    ``\fbox{...}`` counts as a box, and so does MATH's unbraced ``\boxed 5`` (its content: the text up to the next
    whitespace or ``$``). A backslash escapes the character after it (``\{`` is no brace; ``\\`` is one escaped
    backslash).

    Args:
        text: any text; an unclosed ``\boxed{`` ends the scan.

    Returns:
        e.g. ``["1", "\\frac{3}{4}"]`` for ``"\\boxed{1} then \\boxed{\\frac{3}{4}}"``.
    """
    contents: list[str] = []
    pos = 0
    while match := _BOXED_RE.search(text, pos):
        if match.group(1) is not None:
            contents.append(match.group(1))
            pos = match.end()
            continue
        end = _matching_brace(text, match.end() - 1)
        if end is None:
            break
        contents.append(text[match.end() : end])
        pos = end + 1
    return contents


def _after_marker(completion: str) -> str | None:
    """The answer after the last ``Answer:``-like marker (its line's first math chunk, else its first sentence)."""
    matches = list(_MARKER_RE.finditer(completion))
    if not matches:
        return None
    line = completion[matches[-1].end() :].lstrip().split("\n", 1)[0]
    chunk = _MATH_CHUNK_RE.search(line)
    if chunk:
        return next(group for group in chunk.groups() if group is not None)
    return _SENTENCE_END_RE.split(line, 1)[0]


def _last_number(completion: str) -> str | None:
    """The last number in ``completion`` (``-3``, ``1,234``, ``2.5``, ``3/4``), or ``None``."""
    numbers = _NUMBER_RE.findall(completion)
    return numbers[-1] if numbers else None


def prediction_text(completion: str, fallback_to_last_number: bool = True) -> str | None:
    r"""The raw answer text of a completion: last ``\boxed{}``, else an ``Answer:`` marker, else the last number.

    Args:
        completion: generated text.
        fallback_to_last_number: whether to use the last number when there is no box and no marker.

    Returns:
        The un-normalised answer text, or ``None`` when the completion has no answer.
    """
    boxes = boxed_contents(completion)
    if boxes:
        return boxes[-1]
    marked = _after_marker(completion)
    if marked is not None:
        return marked
    return _last_number(completion) if fallback_to_last_number else None


def gold_text(answer: str, style: GoldStyle = "plain") -> str:
    r"""The raw answer text of a reference answer.

    Args:
        answer: the dataset's answer field.
        style: ``"plain"`` (the field is the answer), ``"gsm8k"`` (the text after the last ``####``) or ``"boxed"``
            (a MATH-style solution: the content of its last ``\boxed{}``).

    Returns:
        The un-normalised answer text.

    Raises:
        GoldAnswerError: if the ``####`` or ``\boxed{}`` is missing.
        ValueError: on an unknown style.
    """
    if style == "plain":
        return answer
    if style == "gsm8k":
        if "####" not in answer:
            raise GoldAnswerError(f"gold answer has no '####' (gsm8k style): {_quote(answer)}")
        return answer.rsplit("####", 1)[1]
    if style == "boxed":
        boxes = boxed_contents(answer)
        if not boxes:
            raise GoldAnswerError(f"gold answer has no \\boxed{{}} (boxed style): {_quote(answer)}")
        return boxes[-1]
    raise ValueError(f"unknown gold style {style!r}; expected one of {GOLD_STYLES}")


def _quote(text: str, limit: int = 300) -> str:
    """``repr(text)``, shortened in the middle when longer than ``limit``."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[: limit // 2]) + " ... " + repr(text[-limit // 2 :])


# ----- normalisation ---------------------------------------------------------------------------------------------

_NUM = r"[-+]?\d+(?:\.\d+)?(?:/\d+)?"
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_THOUSANDS_RE = re.compile(r"([-+]?)(\d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+)(\.\d+)?")
_UNIT_WORDS_RE = re.compile(rf"({_NUM}(?:\\?%)?)\s+(?!pi\b)[A-Za-z][A-Za-z'\-]+(?:\s+[A-Za-z][A-Za-z'\-]*)*")
_DEGREES_RE = re.compile(rf"({_NUM})\s*(?:\^\s*\{{?\s*\\circ\s*\}}?|°)")
_BARE_WORDS_RE = re.compile(r"[A-Za-z]{3,}(?:[ \-'][A-Za-z]+)*")
_UNIT_TEXT_RE = re.compile(
    rf"({_NUM}(?:\\?%)?)\s*(?:\\[,;: !]\s*)*\\(?:text|mbox|mathrm|textrm)\{{\s*[A-Za-z][^{{}}]*\}}"
)


def _unwrap_boxed(text: str) -> str:
    r"""``\boxed{X}`` (or ``\boxed X``) -> ``X`` when the box spans the whole text."""
    match = _BOXED_RE.match(text)
    if match and match.group(1) is not None:
        return match.group(1) if match.end() == len(text) else text
    if match and _matching_brace(text, match.end() - 1) == len(text) - 1:
        return text[match.end() : -1]
    return text


def _unwrap_delimiters(text: str) -> str:
    """``$X$``, ``$$X$$``, ``\\(X\\)``, ``\\[X\\]`` -> ``X`` when the delimiters span the whole text."""
    for left, right in _DELIMITERS:
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            return text[len(left) : -len(right)]
    return text


def _strip_decoration(text: str) -> str:
    """Drop Markdown bold markers, a final full stop and a leading currency dollar (``$5``, ``\\$5``)."""
    text = re.sub(r"^\*+|\*+$", "", text).strip()
    text = re.sub(r"\.$", "", text)
    return re.sub(r"^\\?\$\s*(?=[-+.\d])", "", text)


def strip_thousands(text: str) -> str:
    """``1,234,567.5`` -> ``1234567.5`` when the whole text is one number with thousands separators.

    The separators are ``,``, ``{,}`` and ``\\,``; a sign is kept (``-1,234`` -> ``-1234``). Any other text, such as
    ``1,2345``, ``1,2`` (a set) or ``12 apples``, is returned unchanged.
    """
    match = _THOUSANDS_RE.fullmatch(text)
    if not match:
        return text
    sign, digits, decimals = match.groups()
    return sign + re.sub(r"\D", "", digits) + (decimals or "")


def _strip_units(text: str) -> str:
    """``5 dollars`` / ``5\\text{ cm}`` / ``30^\\circ`` -> the number (followed only by words; ``3 pi`` is kept)."""
    for pattern in (_UNIT_WORDS_RE, _UNIT_TEXT_RE, _DEGREES_RE):
        match = pattern.fullmatch(text)
        if match:
            return match.group(1)
    return text


def _wrap_words(text: str) -> str:
    """``Sunday`` -> ``\\text{Sunday}``: a bare word of 3+ letters is text, not a product of symbols."""
    return f"\\text{{{text}}}" if _BARE_WORDS_RE.fullmatch(text) else text


_NORMALISERS: tuple[Callable[[str], str], ...] = (
    _unwrap_boxed,
    _unwrap_delimiters,
    _strip_decoration,
    strip_thousands,
    _strip_units,
    _wrap_words,
)


def normalize_answer(text: str) -> str:
    r"""Normalise an extracted answer text (see the module docstring): ``"$\boxed{1,000}$ dollars."`` -> ``"1000"``.

    Args:
        text: a raw answer text.

    Returns:
        The normalised text (possibly empty).
    """
    text = text.strip()
    for _ in range(8):  # the steps can expose one another (``$\boxed{$5$}$``); stop when nothing changes
        before = text
        for step in _NORMALISERS:
            text = step(text).strip()
        if text == before:
            break
    return text


# ----- math-verify -----------------------------------------------------------------------------------------------


def timeout_seconds() -> int | None:
    """math-verify's timeout for this thread: :data:`MATH_VERIFY_TIMEOUT_S` in the main thread, else ``None``.

    ``signal.alarm`` (math-verify's timeout mechanism) raises outside the main thread, so there it is disabled.
    """
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _has_math(parsed: tuple[Any, ...]) -> bool:
    """Whether math-verify produced at least one mathematical object (not only its raw-string fallback)."""
    return any(not isinstance(item, str) for item in parsed)


def _digits_bound(node: Any) -> float:
    """An upper bound on the decimal digits of the numbers that evaluating ``node`` can create (``inf``: unbounded).

    Guards against answers like ``10^{10^{10}}`` or ``(10^{10})!`` whose evaluation holds the interpreter for minutes
    (a ``signal.alarm`` cannot interrupt it, and off the main thread there is no timeout at all).
    """
    import sympy
    from sympy.functions.combinatorial.factorials import CombinatorialFunction

    if isinstance(node, sympy.Rational):
        return (abs(node.p).bit_length() + node.q.bit_length()) * 0.302 + 1
    if isinstance(node, sympy.Pow) and node.exp.is_number:
        if not node.exp.is_Number or abs(node.exp) > MAX_ANSWER_DIGITS:
            return math.inf
        return _digits_bound(node.base) * max(1.0, float(abs(node.exp)))
    if isinstance(node, CombinatorialFunction) and any(arg.is_number for arg in node.args):
        if not all(arg.is_Number and abs(arg) <= MAX_ANSWER_DIGITS for arg in node.args):
            return math.inf
        return sum(float(abs(arg)) * math.log10(float(abs(arg)) + 2) for arg in node.args)
    return sum(_digits_bound(arg) for arg in getattr(node, "args", ())) + 1


def _usable(parsed: tuple[Any, ...]) -> bool:
    """Whether math-verify parsed a mathematical object that is safe to compare (see :func:`_digits_bound`)."""
    import sympy

    small = all(_digits_bound(item) <= MAX_ANSWER_DIGITS for item in parsed if isinstance(item, sympy.Basic))
    return _has_math(parsed) and small


def _mv_parse(text: str) -> tuple[Any, ...]:
    """math-verify's parse of one answer text, or ``()`` if it fails."""
    if not text:
        return ()
    config = [math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()]
    try:
        return tuple(math_verify.parse(f"${text}$", config, parsing_timeout=timeout_seconds()))
    except Exception:  # any failure means "use the fallback"
        logger.debug("math-verify could not parse %r", text, exc_info=True)
        return ()


def _mv_verify(prediction: ParsedAnswer, gold: ParsedAnswer) -> bool | None:
    """math-verify's verdict, or ``None`` when it could not (safely) parse either side, or failed."""
    if not (_usable(gold.parsed) and _usable(prediction.parsed)):
        return None
    try:
        return bool(math_verify.verify(list(gold.parsed), list(prediction.parsed), timeout_seconds=timeout_seconds()))
    except Exception:  # any failure means "use the fallback"
        logger.debug("math-verify failed on %r vs %r", prediction.text, gold.text, exc_info=True)
        return None


# ----- hand-written fallback -------------------------------------------------------------------------------------

Number = Fraction | float

_SAFE_EXPR_RE = re.compile(r"(?:[\d.+\-*/()\s]|sqrt|pi)+")
_LATEX_SPACING_RE = re.compile(r"\\(?:left|right|displaystyle|[,;:! ])")
_MAX_EXPONENT = 64
_MAX_EXACT_BITS = 4096


def _latex_to_python(text: str) -> str | None:
    r"""A Python arithmetic expression for simple LaTeX (``\frac``, ``\sqrt``, ``^``, ``\pi``), or ``None``."""
    s = _LATEX_SPACING_RE.sub("", text).replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "pi")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+|pi)", r"\\sqrt{\1}", s)
    for _ in range(32):  # innermost groups first; a bare {group} only once no command matches
        before = s
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\[([^{}\[\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
        if s == before:
            s = re.sub(r"(?<!\\frac)(?<!\\sqrt)\{([^{}]*)\}", r"(\1)", s, count=1)
        if s == before:
            break
    s = re.sub(r"(?<=[\d)i])\s*(?=[(sp])", "*", s.replace("^", "**"))  # implicit products: 2pi, 2 sqrt(2), )(
    return s if s and _SAFE_EXPR_RE.fullmatch(s) else None


def _power(base: Number, exponent: Number) -> Number:
    """``base ** exponent``: exact for small integer exponents of a fraction, else a real float."""
    if exponent > _MAX_EXPONENT or exponent < -_MAX_EXPONENT:  # abs(exponent) > _MAX_EXPONENT, typed
        raise ValueError("exponent too large")
    if (
        isinstance(base, Fraction)
        and isinstance(exponent, Fraction)
        and exponent.denominator == 1
        and max(abs(base.numerator), base.denominator).bit_length() * abs(exponent) <= _MAX_EXACT_BITS
    ):
        return base ** int(exponent)
    return math.pow(float(base), float(exponent))  # ValueError for a complex result, OverflowError when huge


_BINARY_OPS: dict[type, Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: _power,
}


def _evaluate(node: ast.AST) -> Number:
    """Evaluate a whitelisted arithmetic AST (numbers, ``+ - * / **``, ``sqrt``, ``pi``); raise otherwise."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(repr(node.value))
    if isinstance(node, ast.Name) and node.id == "pi":
        return math.pi
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        return _BINARY_OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "sqrt"
        and len(node.args) == 1
    ):
        return math.sqrt(_evaluate(node.args[0]))
    raise ValueError(f"unsupported expression node {type(node).__name__}")


def fallback_value(text: str) -> tuple[Number, bool] | None:
    r"""The fallback's value of a normalised answer: ``(number, is_percentage)``, or ``None`` if not a number.

    Handles integers, decimals, ``a/b``, ``\frac``/``\dfrac``, ``\sqrt``, powers, ``\pi``, a trailing ``%`` and a
    leading ``x =``. Exact values are :class:`~fractions.Fraction`; values involving roots or ``\pi`` are floats.
    Expressions are evaluated from a whitelisted AST, never with ``eval``.

    Args:
        text: a normalised answer text.
    """
    text = re.sub(r"^[A-Za-z]\s*=\s*", "", text)  # x = 5
    percent = re.search(r"\\?%$", text)
    expr = _latex_to_python(text[: percent.start()] if percent else text)
    if expr is None:
        return None
    try:
        value = _evaluate(ast.parse(expr, mode="eval").body)
    except (ValueError, ZeroDivisionError, OverflowError, SyntaxError, RecursionError, TypeError):
        return None
    return (value, percent is not None) if math.isfinite(value) else None


def _numbers_equal(a: Number, b: Number) -> bool:
    """Exact equality of fractions; relative tolerance ``1e-9`` once a float is involved."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def _fallback_match(prediction: str, gold: str) -> bool:
    """The fallback's verdict: numeric equality (a percentage also matches its hundredth), else equal texts."""
    pred, ref = fallback_value(prediction), fallback_value(gold)
    if pred is None or ref is None:
        return bool(gold) and _squash(prediction) == _squash(gold)
    (p, p_percent), (g, g_percent) = pred, ref
    candidates = [(p, g)] + [(p / 100, g)] * p_percent + [(p, g / 100)] * g_percent
    return any(_numbers_equal(x, y) for x, y in candidates)


def _squash(text: str) -> str:
    """Lower-case text without whitespace, for the fallback's textual comparison."""
    return re.sub(r"\s+", "", text).lower()


def _fallback_parses(text: str) -> bool:
    """Whether the fallback can use ``text`` as a gold answer: a number, or a text with a letter or digit."""
    return fallback_value(text) is not None or re.search(r"[A-Za-z0-9]", text) is not None


# ----- public API ------------------------------------------------------------------------------------------------


def extract_gold(answer: Any, style: GoldStyle = "plain") -> ParsedAnswer:
    r"""Find, normalise and parse a reference answer.

    Args:
        answer: the dataset's answer field (converted with ``str``), e.g. ``"#### 1,234"`` for ``style="gsm8k"``.
        style: ``"plain"``, ``"gsm8k"`` or ``"boxed"`` (see :func:`gold_text`).

    Returns:
        The parsed answer.

    Raises:
        GoldAnswerError: if the answer is missing (``None``, NaN, empty), can be parsed neither by math-verify nor
            by the fallback, or (``gsm8k`` style) is not a number; the message quotes the gold text.
    """
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        raise GoldAnswerError(f"the gold answer is missing ({answer!r})")
    raw = str(answer)
    text = normalize_answer(gold_text(raw, style))
    parsed = _mv_parse(text)
    numeric_ok = style != "gsm8k" or fallback_value(text) is not None
    if not text or not numeric_ok or not (_has_math(parsed) or _fallback_parses(text)):
        raise GoldAnswerError(f"cannot parse the gold answer {_quote(raw)} (style {style!r}, extracted {text!r})")
    return ParsedAnswer(text, parsed)


def extract_prediction(completion: str, fallback_to_last_number: bool = True) -> ParsedAnswer | None:
    r"""Find, normalise and parse a completion's final answer (rules in the module docstring).

    Args:
        completion: generated text.
        fallback_to_last_number: whether to use the last number when there is no ``\boxed{}`` and no marker.

    Returns:
        The parsed answer, or ``None`` when there is none (or it is longer than :data:`MAX_ANSWER_CHARS`).
    """
    raw = prediction_text(completion, fallback_to_last_number)
    if raw is None or len(raw) > MAX_ANSWER_CHARS:
        return None
    text = normalize_answer(raw)
    return ParsedAnswer(text, _mv_parse(text)) if text else None


def answers_match(prediction: ParsedAnswer | None, gold: ParsedAnswer) -> bool:
    """Whether a predicted answer equals the gold answer: math-verify's verdict, else the fallback's.

    Args:
        prediction: from :func:`extract_prediction`; ``None`` never matches.
        gold: from :func:`extract_gold`.
    """
    if prediction is None:
        return False
    verdict = _mv_verify(prediction, gold)
    return verdict if verdict is not None else _fallback_match(prediction.text, gold.text)


def is_equivalent(completion: str, gold: Any, gold_style: GoldStyle = "plain") -> bool:
    """Whether a completion's final answer matches a reference answer (extraction plus :func:`answers_match`).

    Args:
        completion: generated text.
        gold: the reference answer field.
        gold_style: how to read ``gold`` (see :func:`gold_text`).

    Raises:
        GoldAnswerError: if the gold answer cannot be parsed.
    """
    return answers_match(extract_prediction(completion), extract_gold(gold, gold_style))
