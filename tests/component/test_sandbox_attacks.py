"""Deliberate attacks on the code reward, as a policy searching for reward hacks would write them.

Each attack is a completion that *asserts its attack worked* (or returns a wrong answer that only a successful
hack could make pass), so reward 1 would mean the attack succeeded; the side effects (files outside, surviving
processes, the trainer, the network) are checked from the host. Controls show the attacks are real: the same
program run as one interpreter (solution and tests together, the old design) does pass.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gcpo_lightning.rewards.code import CodeExecution, build_program
from gcpo_lightning.rewards.sandbox import SandboxResult, isolation_layers, run_python, run_tests

TIMEOUT = 5.0
TEST = "def check(candidate):\n    assert abs(candidate(2, 3) - 5) < 1e-9\n    assert candidate(-1, 1) == 0\n"
PROMPT = 'def add(a, b):\n    """a + b"""\n'


def judge(code: str, **kwargs: object) -> SandboxResult:
    """Judge a full solution of ``add`` against TEST in the default jail."""
    kwargs.setdefault("timeout_s", TIMEOUT)
    return run_tests(code, TEST, "add", PROMPT, **kwargs)  # type: ignore[arg-type]


def one_interpreter(code: str) -> SandboxResult:
    """The old design: solution and tests in one interpreter (here still jailed), for the controls."""
    return run_python(build_program(code, TEST, "add", PROMPT), timeout_s=TIMEOUT)


def comm_names() -> set[str]:
    """The ``comm`` of every host process."""
    names = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                names.add(Path(f"/proc/{pid}/comm").read_text().strip())
            except OSError:
                pass
    return names


def wait_gone(name: str, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while name in comm_names():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_correct_solution_scores_one() -> None:
    result = judge("def add(a, b):\n    return a + b\n")
    assert result.passed, result.detail
    reward = CodeExecution(timeout_s=TIMEOUT)
    completion = "```python\ndef add(a, b):\n    return a + b\n```"
    assert reward(prompts=["p"], completions=[completion], test=[TEST], entry_point=["add"], code_prompt=[PROMPT]) == [
        1.0
    ]


FRAME_ATTACK = """
import json, os, sys
def add(a, b):
    return 0
found = {}
frame = sys._getframe(0)
while frame is not None:  # every local of every caller: tokens, pipes, config
    found.update({k: v for k, v in frame.f_locals.items() if isinstance(v, (int, str, dict))})
    frame = frame.f_back
cfg = next((v for v in found.values() if isinstance(v, dict) and "resp_fd" in v), {})
forged = json.dumps({"kind": "status", "reason": "passed", "summary": "", "token": cfg.get("token")}).encode()
report = json.dumps({"reason": "passed", "token": cfg.get("token"), "isolation": []}).encode() + b"\\n"
for fd in range(3, 64):
    for data in (len(forged).to_bytes(4, "big") + forged, report):
        try:
            os.write(fd, data)
        except OSError:
            pass
os._exit(0)
"""


def test_frame_inspection_and_forged_reports_do_not_pass() -> None:
    result = judge(FRAME_ATTACK)
    assert not result.passed and result.reason in ("error", "exit"), result


BUILTINS_ATTACK = """
import builtins, sys
builtins.abs = lambda x: 0            # every abs(...) < eps check passes
builtins.AssertionError = type("AssertionError", (Exception,), {})
sys.settrace(None)
def add(a, b):
    return 0 if a == -1 else a * b    # wrong
"""


def test_patched_builtins_do_not_reach_the_tests() -> None:
    assert one_interpreter(BUILTINS_ATTACK).passed  # control: in one interpreter the hack works
    result = judge(BUILTINS_ATTACK)
    assert (result.passed, result.reason) == (False, "failed"), result


ALWAYS_EQUAL = """
class Anything(float):
    def __eq__(self, other): return True
    def __sub__(self, other): return 0.0
    __hash__ = float.__hash__
class Object:
    def __eq__(self, other): return True
def add(a, b):
    return Anything(7.0) if a == 2 else Object()
"""


def test_objects_with_a_lying_eq_do_not_cross() -> None:
    assert one_interpreter(ALWAYS_EQUAL).passed  # control
    result = judge(ALWAYS_EQUAL)
    assert not result.passed and result.reason in ("failed", "error"), result
    assert "cannot cross the sandbox boundary" in result.detail or result.reason == "failed"


def test_redefined_prompt_helpers_are_not_used_by_the_tests() -> None:
    """HumanEval-style helpers in the prompt (encode_cyclic...) come from the trusted prompt, not the completion."""
    prompt = "def encode(s):\n    return s[::-1]\n\ndef decode(s):\n    pass\n"
    test = "def check(candidate):\n    assert candidate(encode('abc')) == 'abc'\n"
    cheat = "def encode(s):\n    return s\n\ndef decode(s):\n    return s\n"
    assert run_python(build_program(cheat, test, "decode", prompt), timeout_s=TIMEOUT).passed  # control
    assert not run_tests(cheat, test, "decode", prompt, timeout_s=TIMEOUT).passed
    assert run_tests("def decode(s):\n    return s[::-1]\n", test, "decode", prompt, timeout_s=TIMEOUT).passed


def test_exit_during_the_tests_is_not_a_pass() -> None:
    code = "import sys\ndef add(a, b):\n    sys.exit(0)\n"
    test = "def check(candidate):\n    try:\n        candidate(1, 2)\n    except BaseException:\n        pass\n"
    result = run_tests(code, test, "add", timeout_s=TIMEOUT)
    assert (result.passed, result.reason) == (False, "exit"), result


def _daemon(name: str, via: str) -> str:
    return f"""
import ctypes, time
libc = {via}
pid = libc.fork()
if pid == 0:
    libc.setsid()
    if libc.fork() == 0:
        libc.prctl(15, ctypes.c_char_p({name!r}.encode()), 0, 0, 0)  # PR_SET_NAME, visible in /proc/<pid>/comm
        while True:
            time.sleep(0.05)
    libc._exit(0)
time.sleep(1.5)
def add(a, b):
    return a + b
"""


@pytest.mark.parametrize("via", ["ctypes.CDLL(None)", "ctypes.CDLL(None, handle=ctypes._dlopen(None, 0))"])
def test_ctypes_daemon_does_not_outlive_the_run(via: str) -> None:
    name = "gcpo-" + secrets.token_hex(5)
    seen = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not seen.is_set():
            if name in comm_names():
                seen.set()
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    result = judge(_daemon(name, via))
    watcher.join()
    assert seen.is_set(), "the daemon never started: the test proves nothing"
    assert result.passed, result.detail  # forking inside the jail is allowed ...
    assert wait_gone(name), f"a daemon {name} outlived the run"  # ... but nothing survives it


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A host process standing in for the trainer's other processes."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_signals_cannot_reach_the_trainer_or_host(bystander: subprocess.Popen[bytes]) -> None:
    code = f"""
import os, signal
hits = []
for target in ({bystander.pid}, {os.getpid()}, os.getppid()):
    try:
        fd = os.open(f"/proc/{{target}}", os.O_RDONLY)
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        hits.append(target)
    except OSError:
        pass
    try:
        os.kill(target, signal.SIGKILL)
        hits.append(target)
    except OSError:
        pass
def add(a, b):
    assert {bystander.pid} in hits or {os.getpid()} in hits, hits
    return a + b
"""
    result = judge(code)
    assert not result.passed, result
    assert bystander.poll() is None  # alive
    kill_all = "import os, signal\nos.kill(-1, signal.SIGKILL)\ndef add(a, b):\n    return a + b\n"
    result = judge(kill_all)
    assert not result.passed
    assert bystander.poll() is None


def test_host_processes_and_files_are_invisible(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root only")
    secret.chmod(0o600)
    code = f"""
import os
pids = [p for p in os.listdir("/proc") if p.isdigit()]
cmdlines = []
for p in pids:
    try:
        cmdlines.append(open(f"/proc/{{p}}/cmdline", "rb").read())
    except OSError:
        pass
def readable(path):
    try:
        open(path).read()
        return True
    except OSError:
        return False
def add(a, b):
    assert len(pids) > 4 or any(b"pytest" in c for c in cmdlines) or os.getuid() == 0 \\
        or readable({str(secret)!r}) or readable("/etc/shadow") or readable("/root/.bashrc"), (pids, os.getuid())
    return a + b
"""
    result = judge(code)
    assert (result.passed, result.reason) == (False, "failed"), result


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield server
    server.close()


def test_no_network(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    code = f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=1).sendall(b"hi")
    reached = True
except OSError:
    reached = False
def add(a, b):
    assert reached
    return a + b
"""
    assert judge(code).reason == "failed"
    with pytest.raises(TimeoutError):
        listener.accept()


def test_no_writes_outside_the_work_folder(tmp_path: Path) -> None:
    target = tmp_path / "written.txt"
    code = f"""
import os
written = []
for path in ({str(target)!r}, "/written.txt", "/usr/lib/written.txt", "/proc/written", "/dev/written"):
    try:
        with open(path, "w") as f:
            f.write("escaped")
        written.append(path)
    except OSError:
        pass
def add(a, b):
    assert written, "nothing written"
    return a + b
"""
    result = judge(code)
    assert (result.passed, result.reason) == (False, "failed"), result
    assert list(tmp_path.iterdir()) == []


def test_seccomp_refuses_ptrace() -> None:
    if "seccomp" not in isolation_layers():
        pytest.skip("libseccomp is not installed here: the jail runs without its seccomp filter")
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "traced = libc.ptrace(0, 0, 0, 0) == 0\n"  # PTRACE_TRACEME succeeds without the filter
        "def add(a, b):\n    assert traced, ctypes.get_errno()\n    return a + b\n"
    )
    assert judge(code).reason == "failed"
    assert run_tests(code, TEST, "add", PROMPT, isolation="unsafe-guard-only", guard=False).passed  # control


def test_fork_bomb_is_bounded_by_the_cgroup() -> None:
    if "cgroup" not in isolation_layers():
        pytest.skip("no writable cgroup (v2 with pids+memory delegated, or v1) here")
    name = "gcpo-" + secrets.token_hex(5)
    code = (
        f"import ctypes, os\nctypes.CDLL(None).prctl(15, ctypes.c_char_p({name!r}.encode()), 0, 0, 0)\n"
        "n = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
        "            import time\n            time.sleep(60)\n"
        "        n += 1\nexcept OSError:\n    pass\n"
        "def add(a, b):\n    assert n > 1000, n\n    return a + b\n"
    )
    start = time.monotonic()
    result = judge(code)
    assert (result.passed, result.reason) == (False, "failed"), result
    assert time.monotonic() - start < TIMEOUT
    assert wait_gone(name)


def test_memory_is_limited_for_the_whole_tree() -> None:
    if "cgroup" not in isolation_layers():
        pytest.skip("no writable cgroup (v2 with pids+memory delegated, or v1) here")
    code = (
        "import os\nchildren = []\nfor _ in range(6):\n    pid = os.fork()\n    if pid == 0:\n"
        "        block = b'x' * (100 * 2**20)\n        import time\n        time.sleep(1.0)\n        os._exit(0)\n"
        "    children.append(pid)\n"
        "ok = all(os.waitpid(pid, 0)[1] == 0 for pid in children)\n"
        "def add(a, b):\n    assert ok, 'a child was killed'\n    return a + b\n"
    )
    result = judge(code, memory_mb=128)
    assert (result.passed, result.reason) == (False, "failed"), result
