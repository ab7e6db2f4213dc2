"""The code sandbox: every failure mode maps to passed=False with its reason, in time, leaving nothing behind.

These run in the default jail (bubblewrap) unless they test the ``unsafe-guard-only`` mode; deliberate attacks on
the jail and the verdict are in ``tests/component/test_sandbox_attacks.py``.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gcpo_lightning.rewards import sandbox
from gcpo_lightning.rewards.code import CodeExecution, build_program, extract_code
from gcpo_lightning.rewards.sandbox import (
    HARDENING_LAYERS,
    REASONS,
    REQUIRED_LAYERS,
    IsolationError,
    SandboxResult,
    check_isolation,
    isolation_layers,
    run_many,
    run_python,
)

TIMEOUT = 2.0
SLACK = 3.0  # interpreter start and process cleanup on a loaded 2-core machine
GUARD = {"isolation": "unsafe-guard-only"}


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """``(sandbox_root, outside)``: where the sandboxes' working dirs go, and a folder they must not write into."""
    sandbox_root, outside = tmp_path / "sandboxes", tmp_path / "outside"
    sandbox_root.mkdir()
    outside.mkdir()
    return sandbox_root, outside


def run(program: str, sandbox_root: Path, **kwargs: object) -> SandboxResult:
    """Run in the sandbox and check the invariants of every run: in time, reason valid, working dir removed."""
    kwargs.setdefault("timeout_s", TIMEOUT)
    result = run_python(program, tmp_root=sandbox_root, **kwargs)  # type: ignore[arg-type]
    assert result.reason in REASONS
    assert result.passed == (result.reason == "passed")
    assert result.duration_s < kwargs["timeout_s"] + SLACK  # type: ignore[operator]
    assert list(sandbox_root.iterdir()) == []  # the throwaway working directory is gone
    return result


def test_correct_program_passes(roots: tuple[Path, Path]) -> None:
    result = run("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n", roots[0])
    assert result.passed and result.reason == "passed"


@pytest.mark.parametrize(
    ("program", "reason"),
    [
        ("assert 1 + 1 == 3, 'wrong'\n", "failed"),
        ("raise KeyError('boom')\n", "error"),
        ("def f(:\n    pass\n", "syntax_error"),
        ("x = 'unterminated\n", "syntax_error"),
        ("import sys\nsys.exit(0)\nassert False\n", "exit"),  # exits before the tests: no pass
        ("raise SystemExit(0)\n", "exit"),
        ("import os\nos._exit(0)\n", "exit"),  # skips the runner's report entirely
        ("import sys, os\nos.close(1)\nos.close(2)\nsys.exit(0)\n", "exit"),
        ("x = bytearray(2 * 1024**3)\n", "memory"),
        ("x = [0] * (10**9)\n", "memory"),
        ("def f(n):\n    return f(n + 1)\nf(0)\n", "error"),  # RecursionError
    ],
)
def test_failure_modes(roots: tuple[Path, Path], program: str, reason: str) -> None:
    result = run(program, roots[0])
    assert (result.passed, result.reason) == (False, reason)
    assert result.detail


def test_detail_has_the_traceback(roots: tuple[Path, Path]) -> None:
    result = run("def f():\n    raise ValueError('precise message')\nf()\n", roots[0])
    assert result.reason == "error"
    assert result.detail.splitlines()[0] == "ValueError: precise message"
    assert "Traceback" in result.detail and "line 2" in result.detail


def test_failure_modes_in_guard_mode(roots: tuple[Path, Path]) -> None:
    for program, reason in [("assert False\n", "failed"), ("import os\nos._exit(0)\n", "exit"), ("pass\n", "passed")]:
        assert run(program, roots[0], **GUARD).reason == reason


def test_catching_the_guard_does_not_help(roots: tuple[Path, Path]) -> None:
    program = "import os\ntry:\n    os.system('true')\nexcept BaseException:\n    pass\n"
    assert run(program, roots[0], **GUARD).reason == "forbidden"


def test_infinite_loop_times_out(roots: tuple[Path, Path]) -> None:
    result = run("while True:\n    pass\n", roots[0], timeout_s=1.0)
    assert result.reason == "timeout" and 1.0 <= result.duration_s


def test_infinite_output_is_cut(roots: tuple[Path, Path]) -> None:
    result = run("while True:\n    print('spam' * 100)\n", roots[0], max_output_bytes=10_000)
    assert result.reason == "output_limit"
    assert result.duration_s < TIMEOUT  # cut at the cap, not by the timeout


def test_crash_is_killed(roots: tuple[Path, Path]) -> None:
    result = run("import os\nos.abort()\n", roots[0])
    assert result.reason == "killed" and "SIGABRT" in result.detail


@pytest.mark.parametrize(
    "program",
    [
        "import os\nos.system('touch {target}')\n",
        "import subprocess\nsubprocess.run(['touch', '{target}'])\n",
        "import os\nos.execv('/usr/bin/touch', ['touch', '{target}'])\n",
        "import os\nos.kill(os.getpid(), 9)\n",
        "import os\nos.remove('{existing}')\n",
        "import shutil\nshutil.rmtree('{outside}')\n",
        "import os\nos.rename('{existing}', 'stolen.txt')\n",
        "open('{target}', 'w').write('escaped')\n",
        "from pathlib import Path\nPath('{target}').write_text('escaped')\n",
        "import os\nos.chdir('{outside}')\nopen('x', 'w').write('escaped')\n",
        "import os\nos.symlink('{outside}', 'link')\nopen('link/written.txt', 'w').write('escaped')\n",
        "import ctypes\nctypes.CDLL(None).system(b'touch {target}')\n",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
    ],
)
@pytest.mark.parametrize("isolation", ["jail", "unsafe-guard-only"])
def test_forbidden_calls_leave_the_outside_untouched(roots: tuple[Path, Path], program: str, isolation: str) -> None:
    """The guard refuses these calls (``forbidden``); the jail lets them fail or do nothing outside it."""
    sandbox_root, outside = roots
    target, existing = outside / "written.txt", outside / "keep.txt"
    existing.write_text("keep me")
    result = run(program.format(target=target, existing=existing, outside=outside), sandbox_root, isolation=isolation)
    if isolation == "unsafe-guard-only":
        assert result.reason == "forbidden", result.detail
    assert not target.exists()
    assert existing.read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("isolation", ["jail", "unsafe-guard-only"])
def test_files_inside_the_working_dir_are_fine(roots: tuple[Path, Path], isolation: str) -> None:
    """Scratch files, renames, chdir and symlinks inside the work folder are harmless and pass in both modes."""
    program = (
        "import os, tempfile, shutil\n"
        "open('a.txt', 'w').write('x')\nos.rename('a.txt', 'b.txt')\nos.remove('b.txt')\n"
        "with tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'c'), 'w').write('y')\n"
        "os.makedirs('d/e')\nos.symlink('d', 'link')\nos.symlink('e', 'd/rel')\n"
        "os.chdir('link/e')\nopen('f', 'w').write('z')\nos.chdir('../..')\n"
        "assert open('d/e/f').read() == 'z' and os.path.islink('link')\n"
        "shutil.rmtree('d')\nos.remove('link')\n"
    )
    result = run(program, roots[0], isolation=isolation)
    assert result.reason == "passed", result.detail


def test_fork_bomb_is_refused_by_the_guard(roots: tuple[Path, Path]) -> None:
    program = "import os\nwhile True:\n    os.fork()\n"
    result = run(program, roots[0], **GUARD)
    assert result.reason == "forbidden"
    program = "import multiprocessing\nmultiprocessing.Process(target=print).start()\n"
    assert run(program, roots[0], **GUARD).reason == "forbidden"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "State:\tZ" not in state


def test_process_group_is_killed_without_the_guard(roots: tuple[Path, Path]) -> None:
    """With the guard off, a few (bounded) forked sleepers still die with the run: the whole group is killed."""
    program = (
        "import os, sys, time\n"
        "for _ in range(4):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    print('child', pid, file=sys.stderr, flush=True)\n"
        "while True:\n"
        "    pass\n"
    )
    result = run(program, roots[0], timeout_s=1.0, guard=False, **GUARD)
    assert result.reason == "timeout"
    pids = [int(line.split()[1]) for line in result.detail.splitlines() if line.startswith("child ")]
    assert len(pids) == 4
    deadline = time.monotonic() + 2.0
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A local TCP server the sandboxed program tries to reach."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield server
    server.close()


def _accepted(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
    except TimeoutError:
        return False
    return True


@pytest.mark.parametrize(("isolation", "reason"), [("jail", "error"), ("unsafe-guard-only", "forbidden")])
def test_network_is_blocked(roots: tuple[Path, Path], listener: socket.socket, isolation: str, reason: str) -> None:
    port = listener.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
    result = run(program, roots[0], isolation=isolation)
    assert result.reason == reason, result.detail
    assert not _accepted(listener)


def test_kernel_isolation_without_the_guard(roots: tuple[Path, Path], listener: socket.socket) -> None:
    """Guard mode's best-effort unshare: the network and mount namespaces hold without the guard where it works."""
    layers = isolation_layers("unsafe-guard-only")
    if not {"net", "fs"} & set(layers):
        pytest.skip("the kernel refuses unshare(CLONE_NEWUSER | CLONE_NEWNET) here: guard mode has only the guard")
    sandbox_root, outside = roots
    port = listener.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
    result = run(program, sandbox_root, guard=False, **GUARD)
    assert result.reason == "error" and "OSError" in result.detail and not _accepted(listener)
    if "fs" in layers:
        target = outside / "written.txt"
        result = run(f"open('{target}', 'w').write('escaped')\n", sandbox_root, guard=False, **GUARD)
        assert result.reason == "error" and "Read-only file system" in result.detail
        assert not target.exists()
        assert run("open('inside.txt', 'w').write('ok')\n", sandbox_root, guard=False, **GUARD).passed


def test_run_many_keeps_order(roots: tuple[Path, Path]) -> None:
    programs = ["assert True\n", "assert False\n", "while True: pass\n", "raise SystemExit(0)\n"]
    start = time.monotonic()
    results = run_many(programs, max_workers=4, timeout_s=1.5, tmp_root=roots[0])
    assert [r.reason for r in results] == ["passed", "failed", "timeout", "exit"]
    assert time.monotonic() - start < 1.5 + SLACK
    assert list(roots[0].iterdir()) == []


# ----- the reward -------------------------------------------------------------------------------------------------

PROBLEM = {
    "code_prompt": (
        "from typing import List\n\n\n"
        "def running_peak(values: List[int]) -> List[int]:\n"
        '    """For each position, the largest value seen so far.\n'
        "    >>> running_peak([1, 3, 2, 5, 4])\n"
        "    [1, 3, 3, 5, 5]\n"
        '    """\n'
    ),
    "test": (
        "def check(candidate):\n"
        "    assert candidate([]) == []\n"
        "    assert candidate([1, 3, 2, 5, 4]) == [1, 3, 3, 5, 5]\n"
        "    assert candidate([-2, -5, -1]) == [-2, -2, -1]\n"
        "    assert candidate([7]) == [7]\n"
    ),
    "entry_point": "running_peak",
}
BODY = (
    "    out, best = [], None\n"
    "    for v in values:\n"
    "        best = v if best is None else max(best, v)\n"
    "        out.append(best)\n"
    "    return out\n"
)
CORRECT_BODY = f"Here is the body:\n```python\n{BODY}```"
CORRECT_FULL = (  # defines the entry point itself and relies on the prompt's `List` import
    "```python\ndef running_peak(values: List[int]) -> List[int]:\n"
    "    out = []\n    for v in values:\n        out.append(v if not out else max(out[-1], v))\n    return out\n```"
)
WRONG = "```python\ndef running_peak(values):\n    return sorted(values)\n```"
CRASHING = "```python\ndef running_peak(values):\n    return values[0]\n```"
CHEATING = "```python\nimport sys\nsys.exit(0)\n```"


def test_extract_code() -> None:
    assert extract_code("no fences\n    return 1\n") == "no fences\n    return 1\n"
    assert extract_code("a\n```python\nx = 1\n```\nb\n```py\nx = 2\n```\n") == "x = 2\n"
    assert extract_code("```\nx = 0\n```\n```python\nx = 1\n```\n```text\nnot code\n```") == "x = 1\n"
    assert extract_code("```\nx = 3\n```") == "x = 3\n"
    assert extract_code("intro\n```python\ndef f():\n    return 1") == "def f():\n    return 1"  # truncated


def test_build_program_prompt_rule() -> None:
    prompt, test = PROBLEM["code_prompt"], PROBLEM["test"]
    body_program = build_program(BODY, test, "running_peak", prompt)
    assert body_program.startswith(prompt + BODY) and body_program.endswith("\ncheck(running_peak)\n")
    full = extract_code(CORRECT_FULL)
    assert build_program(full, test, "running_peak", prompt).startswith(prompt)  # the stub compiles: kept
    assert build_program(full, test, "running_peak", "def running_peak(v):\n").startswith(full)  # dropped
    assert build_program("assert 1\n", "assert 2\n") == "assert 1\n\nassert 2\n"


def test_code_execution_reward(caplog: pytest.LogCaptureFixture) -> None:
    completions = [CORRECT_BODY, CORRECT_FULL, WRONG, CRASHING, CHEATING]
    columns = {key: [value] * len(completions) for key, value in PROBLEM.items()}
    reward = CodeExecution(timeout_s=TIMEOUT, max_workers=2)
    with caplog.at_level(logging.INFO, logger="gcpo_lightning.rewards.code"):
        values = reward(prompts=["Complete the function."] * len(completions), completions=completions, **columns)
    assert values == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert reward.last_reasons == ["passed", "passed", "failed", "error", "exit"]
    assert "passed=2" in caplog.text and "IndexError" in caplog.text


def test_code_execution_needs_the_test_column() -> None:
    with pytest.raises(KeyError, match="test"):
        CodeExecution()(prompts=["p"], completions=["x = 1"], entry_point=["f"])


def test_jail_layers_are_all_up() -> None:
    """This machine (and CI: scripts/setup.sh installs bubblewrap) has every required layer of the jail."""
    layers = check_isolation("jail")
    assert set(REQUIRED_LAYERS) <= set(layers) <= set(REQUIRED_LAYERS) | set(HARDENING_LAYERS)
    assert set(isolation_layers("unsafe-guard-only")) <= {"guard", "net", "fs"}
    assert "guard" in isolation_layers("unsafe-guard-only")


def test_missing_bubblewrap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "bwrap_executable", lambda: None)
    with pytest.raises(IsolationError, match="bubblewrap.*apt-get install bubblewrap.*unsafe-guard-only"):
        check_isolation("jail")
    with pytest.raises(IsolationError, match="bubblewrap"):
        run_python("pass\n")
    with pytest.raises(IsolationError, match="bubblewrap"):
        CodeExecution()(prompts=["p"], completions=["x = 1"], test=["assert x == 1"])
    assert check_isolation("unsafe-guard-only")  # the weak mode is there, but only by name


def test_missing_layer_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """E.g. no user namespaces: the jail does not silently degrade, it refuses and names what is missing."""
    monkeypatch.setattr(sandbox, "isolation_layers", lambda isolation="jail": ("net", "mount", "ro-root"))
    with pytest.raises(IsolationError, match=r"missing the layers \['user', 'uid', 'pid', 'ipc'\]"):
        check_isolation("jail")
    reward = CodeExecution()
    with pytest.raises(IsolationError, match="unsafe-guard-only"):
        reward(prompts=["p"], completions=["x = 1"], test=["assert x == 1"])


def test_unknown_isolation_is_an_error() -> None:
    with pytest.raises(ValueError, match="isolation must be one of"):
        CodeExecution(isolation="none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="isolation must be one of"):
        run_python("pass\n", isolation="docker")


def test_weak_mode_is_reported_at_every_step(caplog: pytest.LogCaptureFixture) -> None:
    completions = [CORRECT_BODY, WRONG]
    columns = {key: [value] * len(completions) for key, value in PROBLEM.items()}
    weak = CodeExecution(timeout_s=TIMEOUT, max_workers=2, isolation="unsafe-guard-only")
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="gcpo_lightning.rewards.code"):
            caplog.clear()
            assert weak(prompts=["p"] * 2, completions=completions, **columns) == [1.0, 0.0]
        assert "without the jail" in caplog.text
        assert weak.metrics() == {"passed": 0.5, "failed": 0.5, "isolation_weak": 1.0}
    strong = CodeExecution(timeout_s=TIMEOUT, max_workers=2)
    assert strong(prompts=["p"] * 2, completions=completions, **columns) == [1.0, 0.0]
    assert strong.metrics() == {"passed": 0.5, "failed": 0.5, "isolation_weak": 0.0}
    assert "seccomp" in strong.check() or "seccomp" not in HARDENING_LAYERS
