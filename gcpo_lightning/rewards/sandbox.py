"""Run untrusted Python (model-generated code) in a separate, limited process and report pass / fail.

Model output is never ``exec``-ed in the training process. :func:`run_python` starts a fresh interpreter
(``python -I -S -B -c <runner>``: isolated mode, no site-packages, no ``.pyc`` writes) in a throwaway working
directory with a minimal environment, its own session / process group, and these layers, in this order:

1. **Kernel isolation** (Linux, best effort, reported in :attr:`SandboxResult.isolation`): the runner calls
   ``unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET)``. In the new network namespace there is no usable
   interface, not even loopback (``"net"``). In the new mount namespace every mount is remounted read-only
   except a bind mount of the working directory (``"fs"``), so nothing can be written outside it. Where user
   namespaces are disabled it falls back to a network namespace only, then to nothing (the guard remains).
   It also sets ``PR_SET_PDEATHSIG`` (dies with the trainer), ``PR_SET_NO_NEW_PRIVS`` and non-dumpable.
2. **Resource limits** (``setrlimit``, soft = hard where possible): address space ``memory_mb``, CPU time
   ``ceil(timeout_s) + 1`` s, file size ``max_file_bytes``, no core dumps, ``RLIMIT_NPROC = 1`` (no new processes
   or threads; the kernel ignores it for root, so the guard and the process-group kill matter there).
3. **Guard** (like HumanEval's ``reliability_guard``, applied after the runner has set itself up, so it cannot
   break the runner): process creation / signalling / exec (``os.system``, ``os.fork``, ``subprocess``,
   ``os.kill`` ...), sockets, loading libraries with ``ctypes``, permission / ownership changes, ``chdir`` and
   ``setrlimit`` raise :data:`REASONS` ``"forbidden"``; file writes, creations, renames and deletions are allowed
   inside the working directory only. A blocked call is recorded, so catching the exception does not help: the
   run reports ``"forbidden"``. The guard's exception derives from ``BaseException``, so ``except Exception`` misses it.
4. **Parent-side limits**: wall-clock ``timeout_s`` for the whole child lifetime (interpreter start included),
   stdout + stderr streamed and capped at ``max_output_bytes``; on timeout, cap or exit, the whole process
   group gets ``SIGKILL``; the working directory is then deleted.

A pass is proven by a random token that the parent sends on stdin (not in argv / environment) and that the
runner writes to a private pipe only after the whole program (tests included) ran without exception, so
``sys.exit(0)``, ``os._exit(0)``, closing stdout or crashing before the tests never count as a pass.

What this does **not** protect against (it is a tripwire for reward hacking and accidents, not a jail for a
determined attacker): code that deliberately inspects the runner's frames can find the token; the guard is pure
Python and can be bypassed (e.g. ``_io.FileIO``, re-importing extension modules), so without the kernel layers
(check :func:`isolation_layers`) file writes outside the directory and network access are only guarded, not
prevented; files readable by the training user can be read (the environment is minimal, but e.g. ``~/.cache``
is readable); a process that escapes the process group (only possible with the guard bypassed) survives the
kill; CPU, memory and disk bandwidth of the host are shared. For hostile code at scale use a container / gVisor /
nsjail around the trainer as well.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

Reason = Literal[
    "passed", "failed", "error", "syntax_error", "timeout", "memory", "output_limit", "killed", "forbidden", "exit"
]
REASONS: tuple[str, ...] = (
    "passed",  # the program ran to its end without an exception
    "failed",  # an AssertionError escaped (a test failed)
    "error",  # any other exception escaped
    "syntax_error",  # the program does not compile
    "timeout",  # wall-clock timeout_s or the CPU-time limit was exceeded
    "memory",  # MemoryError (the address-space limit memory_mb was hit)
    "output_limit",  # stdout + stderr exceeded max_output_bytes
    "killed",  # the interpreter died from a signal (segfault, abort, SIGKILL from outside, ...)
    "forbidden",  # the program called something the guard disables (subprocess, socket, write outside, ...)
    "exit",  # the interpreter exited before the program finished (sys.exit, os._exit, ...)
)
"""The fixed vocabulary of :attr:`SandboxResult.reason`."""

_CHUNK = 65536
_STDERR_TAIL = 2048
_RESULT_CAP = 65536


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one sandboxed run.

    Attributes:
        passed: Whether the program ran to its end without an exception (and the runner proved it).
        reason: One of :data:`REASONS`; ``"passed"`` iff ``passed``.
        detail: A one-line summary when the sandbox knows more, then the tail of stderr (tracebacks land there).
        duration_s: Wall-clock seconds from process start to cleanup.
        isolation: Kernel layers that were active (``"net"``, ``"fs"``); empty when unknown (the runner did not
            report, e.g. on timeout) or unavailable.
    """

    passed: bool
    reason: Reason
    detail: str
    duration_s: float
    isolation: tuple[str, ...] = ()


# ----- the runner: executed in the child as ``python -I -S -B -c _RUNNER`` ---------------------------------------
# Stdlib only, no ``from __future__``; reads its configuration (JSON) from stdin, which the parent then closes.

_RUNNER = r'''
import builtins, io, json, os, resource, sys, traceback
import ctypes, _ctypes, socket, subprocess, _posixsubprocess, _socket  # imported, then disabled by the guard


class Forbidden(BaseException):
    """Raised by the guard; a BaseException, so ``except Exception`` in the program does not catch it."""


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _harden(libc, parent_pid):
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL: die with the process that started us
    if os.getppid() != parent_pid:
        os._exit(3)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0: no core dumps, no ptrace by others


def _unescape(field):
    for code, char in ((b"\\040", b" "), (b"\\011", b"\t"), (b"\\012", b"\n"), (b"\\134", b"\\")):
        field = field.replace(code, char)
    return field


def _readonly_mounts(libc, workdir):
    """Remount every mount read-only except a bind mount of ``workdir``; only inside a fresh mount namespace."""
    remount_ro, private = 32 | 4096 | 1, 16384 | (1 << 18)  # MS_REMOUNT|MS_BIND|MS_RDONLY, MS_REC|MS_PRIVATE
    keep = {b"nosuid": 2, b"nodev": 4, b"noexec": 8, b"noatime": 1024, b"nodiratime": 2048, b"relatime": 1 << 21}
    wd = os.fsencode(workdir)
    if libc.mount(None, b"/", None, private, None) != 0 or libc.mount(wd, wd, None, 4096, None) != 0:
        return False
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    ok = True
    for line in lines:
        fields = line.split()
        point = _unescape(fields[4])
        if point == wd:
            continue
        flags = remount_ro
        for option in fields[5].split(b","):
            flags |= keep.get(option, 0)
        ok = libc.mount(None, point, None, flags, None) == 0 and ok
    os.chdir(workdir)  # the old cwd still points into the (now read-only) parent mount; re-enter via the bind
    return ok


def _isolate(libc, workdir):
    if libc.unshare(0x10000000 | 0x00020000 | 0x40000000) == 0:  # CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET
        return ["net", "fs"] if _readonly_mounts(libc, workdir) else ["net"]
    if libc.unshare(0x10000000 | 0x40000000) == 0 or libc.unshare(0x40000000) == 0:
        return ["net"]
    return []


def _limit(which, value, hard=None):
    hard = value if hard is None else hard
    current = resource.getrlimit(which)[1]
    if current != resource.RLIM_INFINITY:
        hard = min(hard, current)
    try:
        resource.setrlimit(which, (min(value, hard), hard))
    except (ValueError, OSError):
        pass


def _set_limits(cfg):
    memory = cfg["memory_mb"] * 2**20
    _limit(resource.RLIMIT_AS, memory)
    _limit(resource.RLIMIT_DATA, memory)
    _limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)  # SIGXCPU at soft, SIGKILL at hard
    _limit(resource.RLIMIT_FSIZE, cfg["max_file_bytes"])
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, 1)


_PROCESS_CALLS = (
    "system popen fork forkpty vfork kill killpg setsid setpgid setpgrp setuid setgid seteuid setegid setreuid "
    "setregid setresuid setresgid chroot chdir fchdir execv execve execl execle execlp execlpe execvp execvpe "
    "spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp "
    "chown lchown fchown chmod lchmod fchmod symlink link mkfifo mknod pidfd_open"
).split()
_BLOCKED = {
    "subprocess": "Popen run call check_call check_output getoutput getstatusoutput".split(),
    "_posixsubprocess": ["fork_exec"],
    "socket": "socket create_connection create_server socketpair fromfd SocketType".split(),
    "_socket": "socket socketpair SocketType".split(),
    "resource": "setrlimit prlimit".split(),
    "_ctypes": "dlopen dlsym".split(),
}


def _guard(workdir, violations):
    """Disable dangerous calls; allow writes / deletions inside ``workdir`` only."""

    def deny(name, why="is disabled in the sandbox"):
        violations.append(name)
        raise Forbidden(name + " " + why)

    def blocked(name):
        def call(*args, **kwargs):
            deny(name)
        return call

    def inside(path, dir_fd=None):
        if isinstance(path, int):
            return True  # an already-open descriptor
        base = os.getcwd() if dir_fd is None else os.readlink("/proc/self/fd/%d" % dir_fd)
        full = os.path.realpath(os.path.join(base, os.fsdecode(os.fspath(path))))
        return full == workdir or full.startswith(workdir + os.sep)

    def one_path(name, func, writes=None):
        def call(path, *args, **kwargs):
            if (writes is None or writes(*args, **kwargs)) and not inside(path, kwargs.get("dir_fd")):
                deny(name, "outside the sandbox directory")
            return func(path, *args, **kwargs)
        return call

    def two_paths(name, func):
        def call(src, dst, *args, **kwargs):
            if not (inside(src, kwargs.get("src_dir_fd")) and inside(dst, kwargs.get("dst_dir_fd"))):
                deny(name, "outside the sandbox directory")
            return func(src, dst, *args, **kwargs)
        return call

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def open_writes(mode="r", *args, **kwargs):
        return any(c in kwargs.get("mode", mode) for c in "wax+")

    def os_open_writes(flags, *args, **kwargs):
        return bool(flags & write_flags)

    posix = sys.modules[os.name]
    for module in (os, posix):
        for name in _PROCESS_CALLS:
            if hasattr(module, name):
                setattr(module, name, blocked("os." + name))
        for name in ("remove", "unlink", "rmdir", "mkdir", "truncate"):
            setattr(module, name, one_path("os." + name, getattr(module, name)))
        for name in ("rename", "replace"):
            setattr(module, name, two_paths("os." + name, getattr(module, name)))
        module.open = one_path("os.open", module.open, os_open_writes)
    builtins.open = io.open = one_path("open", io.open, open_writes)
    for module_name, names in _BLOCKED.items():
        module = sys.modules[module_name]
        for name in names:
            if hasattr(module, name):
                setattr(module, name, blocked(module_name + "." + name))

    class Denied:
        def __init__(self, name):
            self._name = name

        def __getattr__(self, attr):
            deny(self._name + "." + attr)

    ctypes = sys.modules["ctypes"]  # importable (numpy needs it), but it cannot load libraries
    ctypes.CDLL.__init__ = blocked("ctypes.CDLL")  # also PyDLL, cdll.<name>, LoadLibrary
    ctypes.pythonapi = Denied("ctypes.pythonapi")


def _classify(err, violations):
    if violations or isinstance(err, Forbidden):
        return "forbidden"
    if err is None:
        return "passed"
    if isinstance(err, SystemExit):
        return "exit"
    if isinstance(err, AssertionError):
        return "failed"
    if isinstance(err, MemoryError):
        return "memory"
    if isinstance(err, (SyntaxError, ValueError)) and getattr(err, "_sandbox_compile", False):
        return "syntax_error"
    return "error"


def _main():
    cfg = json.loads(sys.stdin.buffer.read())
    token, result_fd, workdir = cfg["token"], cfg["result_fd"], os.path.realpath(cfg["workdir"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdin = open(0, closefd=False)
    write, dumps, format_exception = os.write, json.dumps, traceback.format_exception
    isolation = []
    if sys.platform.startswith("linux"):
        libc = _libc()
        _harden(libc, cfg["parent_pid"])
        if cfg["isolate"]:
            isolation = _isolate(libc, workdir)
        del libc
    _set_limits(cfg)
    violations, err = [], None
    with open(cfg["program_path"], "rb") as f:
        source = f.read()
    try:
        code = compile(source, cfg["program_path"], "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        e._sandbox_compile, code, err = True, None, e
    if code is not None:
        if cfg["guard"]:
            _guard(workdir, violations)
        try:
            exec(code, {"__name__": "__main__", "__builtins__": builtins})
        except BaseException as e:  # noqa: BLE001 - every outcome is reported
            err = e
    reason = _classify(err, violations)
    summary = ""
    if err is not None:
        lines = format_exception(type(err), err, err.__traceback__.tb_next if err.__traceback__ else None)
        summary = lines[-1].strip() if lines else type(err).__name__
        try:
            write(2, "".join(lines[-20:]).encode("utf-8", "replace"))
        except OSError:
            pass
    if violations:
        summary = "forbidden: " + ", ".join(sorted(set(violations)))
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    message = dumps({"token": token, "reason": reason, "summary": summary[:500], "isolation": isolation})
    write(result_fd, (message + "\n").encode())
    os._exit(0)


_main()
'''


# ----- the parent side ---------------------------------------------------------------------------------------------


@dataclass
class _Collected:
    stopped: str | None  # "timeout" / "output_limit" when the parent cut the run short
    stderr_tail: bytes
    result: bytes


def _command(site_packages: bool) -> list[str]:
    flags = ["-I", "-B"] if site_packages else ["-I", "-S", "-B"]
    return [sys.executable, *flags, "-c", _RUNNER]


def _environment(workdir: str) -> dict[str, str]:
    """A minimal environment: no tokens or credentials of the trainer leak into the child; one BLAS / OpenMP thread."""
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    return env | {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child has exited, without reaping it (so its pid, the process group id, stays reserved)."""
    if not hasattr(os, "waitid"):  # not on macOS: reaping is fine there (no process-group reuse race handled)
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _collect(proc: subprocess.Popen[bytes], result_fd: int, deadline: float, max_output_bytes: int) -> _Collected:
    """Stream stdout / stderr / the result pipe until the child is done, the deadline passes or output overflows."""
    assert proc.stdout is not None and proc.stderr is not None
    names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr", result_fd: "result"}
    total, tail, result, stopped = 0, b"", b"", None
    with selectors.DefaultSelector() as sel:
        for fd, name in names.items():
            sel.register(fd, selectors.EVENT_READ, name)
        while sel.get_map() and stopped is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = "timeout"
                break
            for key, _ in sel.select(remaining):
                data = os.read(key.fd, _CHUNK)
                if not data:
                    sel.unregister(key.fd)
                elif key.data == "result":
                    result = (result + data)[:_RESULT_CAP]
                else:
                    total += len(data)
                    tail = (tail + data)[-_STDERR_TAIL:] if key.data == "stderr" else tail
            if total > max_output_bytes:
                stopped = "output_limit"
            elif result_fd not in sel.get_map() and _has_exited(proc):
                break  # done; a leftover grandchild holding stdout must not make us wait
    while stopped is None and not _has_exited(proc):
        if time.monotonic() >= deadline:
            stopped = "timeout"
        time.sleep(0.005)
    return _Collected(stopped, tail, result)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's whole process group (before reaping it, so the group id cannot have been reused)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _message(result: bytes, token: str) -> dict[str, Any] | None:
    """The runner's report: the last line of the result pipe that carries the right token."""
    for line in reversed(result.splitlines()):
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("token") == token and message.get("reason") in REASONS:
            return message
    return None


def _classify(
    collected: _Collected, message: dict[str, Any] | None, returncode: int, timeout_s: float
) -> tuple[str, str]:
    """``(reason, summary)`` from what the parent saw; the runner's report wins unless the parent cut the run."""
    if collected.stopped == "output_limit":
        return "output_limit", "stdout + stderr exceeded the output limit"
    if message is not None:
        return message["reason"], str(message.get("summary", ""))
    if collected.stopped == "timeout":
        return "timeout", f"wall-clock limit of {timeout_s:g} s exceeded"
    if returncode < 0:
        sig = signal.Signals(-returncode)
        reason = "timeout" if sig == signal.SIGXCPU else "killed"
        return reason, f"killed by {sig.name}"
    return "exit", f"exited with status {returncode} before the program finished"


def _detail(summary: str, stderr_tail: bytes) -> str:
    tail = stderr_tail.decode("utf-8", "replace").strip()
    return "\n".join(part for part in (summary, tail) if part)


def run_python(
    program: str,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 65536,
    *,
    max_file_bytes: int = 16 * 2**20,
    site_packages: bool = False,
    isolate: bool = True,
    guard: bool = True,
    tmp_root: str | os.PathLike[str] | None = None,
) -> SandboxResult:
    """Run ``program`` (Python source) in a sandboxed interpreter; it passes when it runs to its end.

    Args:
        program: Python source; a test failure must raise (e.g. ``assert``), as in HumanEval.
        timeout_s: Wall-clock limit for the whole child process, interpreter start included.
        memory_mb: Address-space limit of the child in MiB (``RLIMIT_AS``).
        max_output_bytes: Cap on stdout + stderr together; beyond it the run is killed (``"output_limit"``).
        max_file_bytes: Largest file the program may write (``RLIMIT_FSIZE``).
        site_packages: Let the program import installed packages (drops ``-S``); the standard library always.
        isolate: Try the kernel namespaces (network, read-only file system); turn off only to test the guard.
        guard: Disable dangerous calls in the child; turn off only to test the other layers.
        tmp_root: Folder for the throwaway working directory (default: the system temp folder).

    Returns:
        A :class:`SandboxResult`; every failure is ``passed=False`` with a reason from :data:`REASONS`.
    """
    token = secrets.token_hex(16)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gcpo-sandbox-", dir=tmp_root, ignore_cleanup_errors=True) as workdir:
        program_path = os.path.join(workdir, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                _command(site_packages),
                cwd=workdir,
                env=_environment(workdir),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        config = {
            "token": token,
            "result_fd": write_fd,
            "workdir": workdir,
            "program_path": program_path,
            "parent_pid": os.getpid(),
            "memory_mb": memory_mb,
            "cpu_s": math.ceil(timeout_s) + 1,
            "max_file_bytes": max_file_bytes,
            "guard": guard,
            "isolate": isolate,
        }
        try:
            _send_config(proc, config)
            collected = _collect(proc, read_fd, start + timeout_s, max_output_bytes)
        finally:
            _kill_group(proc)
            os.close(read_fd)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    message = _message(collected.result, token)
    reason, summary = _classify(collected, message, proc.returncode, timeout_s)
    isolation = tuple(message.get("isolation", ())) if message else ()
    return SandboxResult(
        passed=reason == "passed",
        reason=reason,  # type: ignore[arg-type]
        detail=_detail(summary, collected.stderr_tail),
        duration_s=time.monotonic() - start,
        isolation=isolation,
    )


def _send_config(proc: subprocess.Popen[bytes], config: dict[str, Any]) -> None:
    """Write the (small: well under the pipe buffer, so this never blocks) configuration and close stdin."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(json.dumps(config).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the child died at start; the exit status tells why


def run_many(programs: Sequence[str], max_workers: int = 4, **kwargs: Any) -> list[SandboxResult]:
    """Run several programs concurrently, each in its own sandboxed process; results in input order.

    Args:
        programs: Python sources.
        max_workers: How many sandboxes run at once (threads that wait on child processes).
        **kwargs: Passed to :func:`run_python` (``timeout_s``, ``memory_mb``, ...).

    Returns:
        One :class:`SandboxResult` per program.
    """
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(programs)))) as pool:
        return list(pool.map(lambda program: run_python(program, **kwargs), programs))


@functools.cache
def isolation_layers() -> tuple[str, ...]:
    """The kernel layers (``"net"``, ``"fs"``) this machine gives the sandbox; probed once with a trivial run."""
    return run_python("pass", timeout_s=10.0).isolation
