"""Code-execution rewards: run a completion's code against the problem's tests in a sandbox, 1.0 if they pass.

Follows the HumanEval convention: the program is ``<prompt> + <completion code> + "\\n" + <test> +
"\\ncheck(<entry_point>)\\n"``, where ``prompt`` is the problem's function signature and docstring and ``test``
defines ``check(candidate)``. Through :mod:`gcpo_lightning.rewards.sandbox` the untrusted part (prompt + completion)
runs in one jailed process and the trusted part (prompt + tests) in another, which reaches the solution only
through call-by-value proxies and alone decides the verdict (see that module for the threat model).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any

from gcpo_lightning.rewards.sandbox import ISOLATION_MODES, Isolation, SandboxResult, TestJob, check_isolation, run_many

logger = logging.getLogger(__name__)

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}


def extract_code(completion: str) -> str:
    """The code in a completion: the last fenced block tagged Python, else the whole completion.

    Blocks tagged ``python``, ``py``, ``python3`` or ``py3`` count; a block cut off by the length limit (no closing
    fence) runs to the end of the text. Without a Python block, the last untagged fenced block is used; without
    any, the completion is taken as code as it is (a bare function body continuing the prompt, HumanEval style).

    Args:
        completion: The model's generated text.

    Returns:
        The Python source to run.
    """
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(completion)]
    for wanted in (lambda tag: tag in _PYTHON_TAGS, lambda tag: tag == ""):
        chosen = [body for tag, body in blocks if wanted(tag)]
        if chosen:
            return chosen[-1]
    return completion


def defines_function(code: str, name: str) -> bool:
    """Whether ``code`` has a top-level ``def name(`` (or ``async def``)."""
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.MULTILINE) is not None


def _compiles(source: str) -> bool:
    try:
        compile(source, "<prompt>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    return True


def build_solution(code: str, entry_point: str | None = None, prompt: str | None = None) -> str:
    """The untrusted part of :func:`build_program`: the prompt (by the prompt rule there) + the completion's code."""
    prompt = prompt or ""
    if prompt and entry_point and defines_function(code, entry_point) and not _compiles(prompt):
        prompt = ""
    if prompt and not prompt.endswith("\n"):
        prompt += "\n"
    return prompt + code


def build_program(code: str, test: str, entry_point: str | None = None, prompt: str | None = None) -> str:
    """Assemble the program that runs a solution against its tests (for display: the sandbox runs the two apart).

    The prompt rule: a completion that is a bare function body continues the prompt, so the prompt goes first. A
    completion that already defines ``def <entry_point>(`` at top level is complete: the prompt is still prepended
    when it compiles on its own (its stub, a function whose body is its docstring, is then overridden by the
    completion's definition while the prompt's imports and helper functions stay available), and dropped when it
    does not compile (e.g. a signature without docstring).

    Args:
        code: The extracted solution code.
        test: The test code; with ``entry_point`` it defines ``check(candidate)``, without it it is plain asserts.
        entry_point: The function under test; ``check(<entry_point>)`` is appended when given.
        prompt: The problem's prompt code (signature + docstring); ``None`` or empty when there is none.

    Returns:
        The program's Python source.
    """
    program = build_solution(code, entry_point, prompt) + "\n" + test
    if entry_point:
        program += f"\ncheck({entry_point})\n"
    return program


class CodeExecution:
    """Reward 1.0 when the completion's code passes the problem's tests in a sandbox, else 0.0.

    Failure reasons (:data:`gcpo_lightning.rewards.sandbox.REASONS`) are counted and logged after every call and kept in
    :attr:`last_reasons` (one per completion) for metrics. The first call checks the sandbox's isolation layers
    (:func:`~gcpo_lightning.rewards.sandbox.check_isolation`) and raises
    :class:`~gcpo_lightning.rewards.sandbox.IsolationError` when the jail is not available, so training stops at
    set-up instead of running model code unconfined; ``isolation="unsafe-guard-only"`` opts in to the weak mode,
    which is then logged at every call and reported as the metric ``isolation_weak = 1``.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        memory_mb: int = 512,
        max_workers: int = 4,
        test_column: str = "test",
        entry_point_column: str = "entry_point",
        prompt_column: str | None = "code_prompt",
        log_failures: bool = True,
        isolation: Isolation = "jail",
    ) -> None:
        """Configure the sandbox and the data columns.

        Args:
            timeout_s: Wall-clock limit per program, interpreter start included.
            memory_mb: Address-space limit per sandboxed interpreter in MiB.
            max_workers: How many sandboxed programs run at once.
            test_column: Data column with the test code (HumanEval: defines ``check(candidate)``).
            entry_point_column: Data column with the function name passed to ``check``; if the column is missing
                the tests run as plain asserts.
            prompt_column: Data column with the problem's code prompt (signature + docstring) that a body-only
                completion continues; ``None`` (or a missing column) means completions are whole programs.
            log_failures: Log each failing completion's reason and detail at INFO level (counts always are).
            isolation: ``"jail"`` (bubblewrap; required layers checked at the first call) or, by name only, the
                weaker ``"unsafe-guard-only"`` (a Python guard, no kernel jail; see docs/rewards.md).

        Raises:
            ValueError: An unknown ``isolation``.
        """
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"CodeExecution isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_workers = max_workers
        self.test_column = test_column
        self.entry_point_column = entry_point_column
        self.prompt_column = prompt_column
        self.log_failures = log_failures
        self.isolation: Isolation = isolation
        self.layers: tuple[str, ...] | None = None  # set by the first call's check
        self.last_reasons: list[str] = []
        self.last_results: list[SandboxResult] = []
        self.__name__ = "code_execution"  # the name in logged metrics (rewards/code_execution/...)

    @property
    def weak(self) -> bool:
        """Whether this reward runs model code without the jail."""
        return self.isolation != "jail"

    def check(self) -> tuple[str, ...]:
        """Check (once) that the sandbox has the layers ``isolation`` needs; the active layers.

        Raises:
            IsolationError: The jail is not available (the message says which layer is missing and what to do).
        """
        if self.layers is None:
            self.layers = check_isolation(self.isolation)
            if self.weak:
                logger.warning(
                    "CodeExecution runs model code with isolation=%r (layers %s): a Python guard only, no jail",
                    self.isolation,
                    list(self.layers),
                )
        return self.layers

    def _columns(self, n: int, columns: dict[str, Any]) -> tuple[list[str], list[Any], list[Any]]:
        if self.test_column not in columns:
            raise KeyError(f"CodeExecution needs the test column {self.test_column!r}; got {sorted(columns)}")
        tests = columns[self.test_column]
        entry_points = columns.get(self.entry_point_column) or [None] * n
        prompts = (columns.get(self.prompt_column) if self.prompt_column else None) or [None] * n
        return tests, entry_points, prompts

    def programs(self, completions: list[str], columns: dict[str, Any]) -> list[str]:
        """The whole program of each completion, for display (see :func:`build_program`; :meth:`jobs` is what runs)."""
        tests, entry_points, prompts = self._columns(len(completions), columns)
        return [
            build_program(extract_code(c), t, e, p) for c, t, e, p in zip(completions, tests, entry_points, prompts)
        ]

    def jobs(self, completions: list[str], columns: dict[str, Any]) -> list[TestJob]:
        """What the sandbox runs per completion: untrusted prompt + code apart from the trusted prompt + tests."""
        tests, entry_points, prompts = self._columns(len(completions), columns)
        return [
            TestJob(build_solution(extract_code(c), e, p), t, e, p)
            for c, t, e, p in zip(completions, tests, entry_points, prompts)
        ]

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        """Score each completion: 1.0 if its code passes the tests in the sandbox, else 0.0.

        Args:
            prompts: The chat / text prompts (unused: the code prompt comes from ``prompt_column``).
            completions: The generated texts.
            **columns: Data-row fields, one value per completion (``test``, ``entry_point``, ``code_prompt``, ...).

        Returns:
            One reward per completion.

        Raises:
            IsolationError: At the first call, when the jail is not available (see :meth:`check`).
        """
        jobs = self.jobs(completions, columns)
        self.check()
        if self.weak:
            logger.warning("code execution without the jail (isolation=%r)", self.isolation)
        results = run_many(
            jobs,
            max_workers=self.max_workers,
            timeout_s=self.timeout_s,
            memory_mb=self.memory_mb,
            isolation=self.isolation,
        )
        self.last_results = results
        self.last_reasons = [r.reason for r in results]
        self._log(results)
        return [1.0 if r.passed else 0.0 for r in results]

    def metrics(self) -> dict[str, float]:
        """Share of the last call's completions per outcome (``passed``, ``timeout``, ``error``, ...), for logging,
        and ``isolation_weak`` (1.0 when the code ran without the jail, else 0.0).

        ``GCPOModule`` logs these as ``rewards/code_execution/<outcome>`` at every step.
        """
        n = max(len(self.last_reasons), 1)
        shares = {reason: count / n for reason, count in Counter(self.last_reasons).items()}
        return shares | {"isolation_weak": 1.0 if self.weak else 0.0}

    def _log(self, results: list[SandboxResult]) -> None:
        counts = Counter(r.reason for r in results)
        logger.info("code execution: %s", ", ".join(f"{reason}={n}" for reason, n in counts.most_common()))
        if not self.log_failures:
            return
        for k, r in enumerate(results):
            if not r.passed:
                first_line = r.detail.splitlines()[0] if r.detail else ""
                logger.info("completion %d failed (%s, %.2fs): %s", k, r.reason, r.duration_s, first_line[:300])
