"""Run model-written Python against test cases in a jailed process (see docs/code_reward.md).

Processes
---------
A :class:`Sandbox` owns a :class:`~vespo.tasks.procpool.ProcessPool` of small *supervisor*
processes (started with an almost empty environment, never shown expected outputs). For every
evaluation a supervisor forks one jailed process, which:

1. becomes PID 1 of a new PID namespace (when the kernel allows it), so that killing it kills
   every process it forked;
2. enters new network, mount, IPC and UTS namespaces: no network interface but a loopback
   that is down (fallback: ``socket`` blocked in Python, which ``ctypes`` can bypass);
3. mounts a small tmpfs on an empty temporary directory, ``chroot``-s into it and works there
   (fallback: ``chdir`` only);
4. sets ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``
   and no core dumps; drops to the ``nobody`` user when started as root (RLIMIT_NPROC is only
   enforced for a non-root user), clears the environment, closes every inherited descriptor;
5. runs the code and then each test case, streaming each case's *output* back over a pipe.

The supervisor enforces the wall-time limit per case (and for loading the code) by killing the
jailed process; cases after one that timed out or crashed run in a fresh jailed process. The
caller compares outputs with the expected values, so code cannot report its own success.

Test cases
----------
:class:`CodeTests` follows the APPS / Eurus-2-RL-Data / PRIME schema: ``inputs`` and
``outputs`` lists and an optional ``fn_name``. With ``fn_name`` ("call" mode) each input is the
list of positional arguments and the output the expected return value; without it ("stdio"
mode) each input is the program's stdin and the output its expected stdout.
"""

from __future__ import annotations

import _socket
import builtins
import ctypes
import importlib
import io
import json
import logging
import math
import os
import resource
import select
import shutil
import signal
import socket as socket_mod
import struct
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vespo.tasks.procpool import OK, ProcessPool, describe_exit

logger = logging.getLogger(__name__)

# stdlib modules imported before the jail closes (a chroot leaves no files to import from)
DEFAULT_PRELOAD: tuple[str, ...] = (
    "abc",
    "array",
    "bisect",
    "calendar",
    "cmath",
    "collections",
    "collections.abc",
    "contextlib",
    "copy",
    "dataclasses",
    "datetime",
    "encodings.idna",
    "decimal",
    "enum",
    "fractions",
    "functools",
    "hashlib",
    "heapq",
    "itertools",
    "json",
    "math",
    "numbers",
    "operator",
    "queue",
    "random",
    "re",
    "statistics",
    "string",
    "struct",
    "textwrap",
    "types",
    "typing",
    "unicodedata",
)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 38, 36

_HEADER = struct.Struct("<I")
_MAX_MESSAGE = 4 << 20


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one evaluation.

    Attributes:
        case_timeout_s: wall time per test case, and for loading (executing) the code.
        total_timeout_s: wall time of the whole evaluation (default ``(cases + 1) * case_timeout_s``).
        memory_mb: address space allowed above the interpreter's own (RLIMIT_AS).
        max_processes: RLIMIT_NPROC of the sandbox user (processes and threads).
        file_size_mb: largest file the code may write (RLIMIT_FSIZE).
        disk_mb: size of the tmpfs working directory (with a mount namespace).
        max_open_files: RLIMIT_NOFILE.
        max_output_bytes: stdout kept per case, and the largest return value accepted.
        max_code_bytes: longer code is rejected without running it.
        preload: modules imported before the jail closes (the only ones code can import
            when the chroot is in force).
        user: account to run as when the supervisor is root (None: stay root, not advised).
    """

    case_timeout_s: float = 2.0
    total_timeout_s: float | None = None
    memory_mb: int = 256
    max_processes: int = 8
    file_size_mb: float = 1.0
    disk_mb: int = 8
    max_open_files: int = 64
    max_output_bytes: int = 65536
    max_code_bytes: int = 100_000
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    user: str | None = "nobody"


@dataclass
class CodeTests:
    """Test cases: ``fn_name`` set -> call mode (inputs = argument lists), else stdin/stdout."""

    inputs: list[Any]
    outputs: list[Any]
    fn_name: str | None = None

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.outputs):
            raise ValueError(f"{len(self.inputs)} test inputs but {len(self.outputs)} outputs")
        if self.fn_name is not None and not all(isinstance(a, (list, tuple)) for a in self.inputs):
            raise ValueError("call-mode test inputs must be lists of positional arguments")
        if self.fn_name is None and not all(isinstance(a, str) for a in self.inputs):
            raise ValueError("stdio test inputs must be strings (the program's stdin)")

    @property
    def mode(self) -> str:
        return "stdio" if self.fn_name is None else "call"

    def to_json(self) -> str:
        """The Eurus/APPS ``ground_truth`` string."""
        obj: dict[str, Any] = {"inputs": self.inputs, "outputs": self.outputs}
        if self.fn_name is not None:
            obj["fn_name"] = self.fn_name
        return json.dumps(obj)

    @classmethod
    def parse(cls, value: Any) -> CodeTests:
        """From a dict or JSON string with ``inputs``/``outputs`` (``input_output`` also read)."""
        if isinstance(value, CodeTests):
            return value
        if isinstance(value, (str, bytes)):
            value = json.loads(value)
        if isinstance(value, dict) and "input_output" in value and "inputs" not in value:
            return cls.parse(value["input_output"])
        if not isinstance(value, dict) or "inputs" not in value or "outputs" not in value:
            raise ValueError("test cases need 'inputs' and 'outputs' lists")
        fn_name = value.get("fn_name") or None
        return cls(list(value["inputs"]), list(value["outputs"]), fn_name)


@dataclass
class CaseResult:
    """One test case: ``status`` ok (ran) / error (raised) / timeout / crash / not_run."""

    status: str
    passed: bool = False
    message: str = ""
    seconds: float = 0.0


@dataclass
class SandboxResult:
    """An evaluation: ``status`` ok (code loaded, cases ran) / rejected / load_error /
    load_timeout / crash; ``mode`` says which protections were in force."""

    status: str
    cases: list[CaseResult] = field(default_factory=list)
    message: str = ""
    mode: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.cases)

    @property
    def total(self) -> int:
        return len(self.cases)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total

    def score(self, partial_credit: bool = False) -> float:
        """Fraction of cases passed (``partial_credit``) or 1.0 only if all passed."""
        if not self.total:
            return 0.0
        return self.passed / self.total if partial_credit else float(self.all_passed)


# --------------------------------------------------------------------------- comparing outputs


def _json_equal(got: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return isinstance(want, bool) and isinstance(got, bool) and got == want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        if isinstance(want, int) and isinstance(got, int):
            return got == want
        return math.isclose(float(got), float(want), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(want) and all(_json_equal(g, w) for g, w in zip(got, want))
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(_json_equal(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want


def outputs_match(got: Any, want: Any, mode: str) -> bool:
    """Whether a case's output equals the expected one.

    call: JSON values equal (tuples as lists, floats to 1e-6 relative), also accepting APPS's
    habit of wrapping the expected value in a one-element list. stdio: equal after stripping
    trailing whitespace of every line and trailing blank lines, or token by token with numeric
    tolerance.
    """
    if mode == "call":
        return _json_equal(got, want) or (isinstance(want, list) and len(want) == 1 and _json_equal(got, want[0]))
    if not isinstance(got, str):
        return False
    want_s = "\n".join(want) if isinstance(want, list) else str(want)

    def lines(text: str) -> list[str]:
        out = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
        while out and not out[-1]:
            out.pop()
        return out

    if lines(got) == lines(want_s):
        return True
    got_t, want_t = got.split(), want_s.split()
    if len(got_t) != len(want_t):
        return False
    for g, w in zip(got_t, want_t):
        if g == w:
            continue
        try:
            if not math.isclose(float(g), float(w), rel_tol=1e-6, abs_tol=1e-9):
                return False
        except ValueError:
            return False
    return True


# --------------------------------------------------------------------------- jailed process

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _setns(fd: int, flags: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(flags)), "setns")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    ret = _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(ret, f"mount {target}")


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _count_tasks(uid: int) -> int:
    """Processes + threads owned by ``uid`` (what RLIMIT_NPROC counts)."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as fh:
                text = fh.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            total += int(fields.get("Threads", "1").strip() or 1)
    return total


class _CappedRaw(io.RawIOBase):
    """A writable sink that keeps the first ``cap`` bytes and drops the rest."""

    def __init__(self, cap: int):
        self.cap = cap
        self.data = bytearray()
        self.truncated = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        n = len(b)
        room = self.cap - len(self.data)
        if room > 0:
            self.data += bytes(b[:room])
        if n > room:
            self.truncated = True
        return n


def _text_sink(cap: int) -> tuple[io.TextIOWrapper, _CappedRaw]:
    raw = _CappedRaw(cap)
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", errors="replace", write_through=True), raw


def _to_json_value(value: Any, depth: int = 0) -> Any:
    if depth > 50:
        raise ValueError("return value nested too deeply")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v, depth + 1) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _to_json_value(v, depth + 1) for k, v in value.items()}
    raise TypeError(f"return value of type {type(value).__name__} is not a JSON value")


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


class _Jailer:
    """Supervisor-side state: forks one jailed process per evaluation (runs in a pool worker)."""

    def __init__(self, setup: dict[str, Any]):
        self.limits = SandboxLimits(**setup["limits"])
        for name in self.limits.preload:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        self.root = os.geteuid() == 0
        self.outer_uid = os.geteuid()
        self.userns = False
        if not self.root:
            # an unprivileged user namespace gives the capabilities the namespaces below need
            try:
                uid, gid = os.geteuid(), os.getegid()
                _unshare(CLONE_NEWUSER)
                with open("/proc/self/setgroups", "w") as fh:
                    fh.write("deny")
                with open("/proc/self/uid_map", "w") as fh:
                    fh.write(f"0 {uid} 1")
                with open("/proc/self/gid_map", "w") as fh:
                    fh.write(f"0 {gid} 1")
                self.userns = True
            except OSError:
                pass
        self.uid = self.gid = None
        if self.root and self.limits.user:
            import pwd

            entry = pwd.getpwnam(self.limits.user)
            self.uid, self.gid = entry.pw_uid, entry.pw_gid
        # One empty network namespace for the supervisor and every process it forks: creating
        # one per evaluation costs ~4 ms. The supervisor talks to its parent over an inherited
        # socket pair, which works across namespaces; jailed processes run as nobody (no
        # CAP_NET_ADMIN to bring up even the loopback) and leave nothing behind (PID namespace).
        try:
            _unshare(CLONE_NEWNET)
            self.netns = True
        except OSError:
            self.netns = False
        # A fresh PID namespace per evaluation: unshare(CLONE_NEWPID) before each fork, then
        # setns back to our own. setns needs CAP_SYS_ADMIN in the namespace's owner, i.e. real
        # root; inside a user namespace of our own it fails, so there is no PID namespace there.
        self.own_pidns: int | None = None
        if self.root:
            try:
                self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY)
                _unshare(CLONE_NEWPID)
                _setns(self.own_pidns, CLONE_NEWPID)
            except OSError:
                self.own_pidns = None
        try:
            _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl")
        except OSError:
            pass
        self.base = tempfile.mkdtemp(prefix="supervisor-", dir=setup["base"])  # removed by the Sandbox
        os.chmod(self.base, 0o711)
        self.real_uid = os.getuid()
        self.pid = os.getpid()

    # ---------------------------------------------------------------- supervisor

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        n = len(job["inputs"])
        lim = self.limits
        total = lim.total_timeout_s or (n + 1) * lim.case_timeout_s
        deadline = time.monotonic() + total
        cases: list[dict[str, Any] | None] = [None] * n
        start = 0
        load: dict[str, Any] | None = None
        mode: dict[str, str] = {}
        while start < n or (n == 0 and load is None):
            ran, end, mode = self._run_child(job, start, deadline)
            for i, rec in ran:
                cases[i] = rec
            kind = end[0]
            if kind in ("load_error", "load_timeout", "crash_loading", "setup_error"):
                load = {"status": kind, "message": end[1]}
                break
            if kind == "done" or n == 0:
                break
            if kind in ("timeout", "crash"):
                index, message = end[1], end[2]
                if index < n:
                    cases[index] = {"status": kind, "message": message, "seconds": end[3]}
                start = index + 1
                if job.get("stop_at_failure"):
                    break
                continue
            if kind == "total_timeout":
                break
        if load is not None:
            why = "the code did not load"
        elif job.get("stop_at_failure") and start < n:
            why = "not run after a failed case (pass/fail scoring)"
        else:
            why = "evaluation time limit reached"
        for i in range(n):
            if cases[i] is None:
                cases[i] = {"status": "not_run", "message": why}
        return {"load": load, "cases": cases, "mode": mode}

    def _run_child(
        self, job: dict[str, Any], start: int, deadline: float
    ) -> tuple[list[tuple[int, dict[str, Any]]], tuple, dict[str, str]]:
        lim = self.limits
        r, w = os.pipe()
        pidns = self.own_pidns is not None
        if pidns:
            _unshare(CLONE_NEWPID)
        try:
            pid = os.fork()
        except OSError:
            if pidns:
                _setns(self.own_pidns, CLONE_NEWPID)
            raise
        if pid == 0:  # the jailed process
            try:
                os.close(r)
                self._jail(w, job, start, pidns)
            finally:
                os._exit(70)
        if pidns:
            _setns(self.own_pidns, CLONE_NEWPID)
        os.close(w)
        ran: list[tuple[int, dict[str, Any]]] = []
        mode: dict[str, str] = {}
        index = start
        loaded = False
        last = time.monotonic()
        phase = last + lim.case_timeout_s + 1.0  # jail setup + loading the code
        buf = bytearray()
        end: tuple | None = None
        try:
            while end is None:
                now = time.monotonic()
                limit = min(phase, deadline)
                if now >= limit:
                    if now >= deadline and now < phase:
                        end = ("total_timeout",)
                    elif not loaded:
                        end = ("load_timeout", f"loading the code exceeded {lim.case_timeout_s}s")
                    else:
                        end = ("timeout", index, f"exceeded {lim.case_timeout_s}s", now - last)
                    break
                readable, _, _ = select.select([r], [], [], limit - now)
                if not readable:
                    continue
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    status = self._reap(pid)
                    msg = f"process {describe_exit(status)}"
                    if status == -signal.SIGXCPU:
                        msg += " (CPU time limit)"
                    end = ("crash", index, msg, time.monotonic() - last) if loaded else ("crash_loading", msg)
                    break
                buf += chunk
                while len(buf) >= _HEADER.size:
                    (size,) = _HEADER.unpack_from(buf)
                    if size > _MAX_MESSAGE:
                        end = ("crash", index, "protocol violation (oversized message)", 0.0)
                        break
                    if len(buf) < _HEADER.size + size:
                        break
                    try:
                        msg = json.loads(bytes(buf[_HEADER.size : _HEADER.size + size]))
                        kind = msg["t"]
                    except (ValueError, KeyError, TypeError):
                        end = ("crash", index, "protocol violation (bad message)", 0.0)
                        break
                    del buf[: _HEADER.size + size]
                    now = time.monotonic()
                    if kind == "loaded" and not loaded:
                        loaded = True
                        mode = {k: str(v) for k, v in msg.get("mode", {}).items()}
                    elif kind == "case" and loaded and msg.get("i") == index:
                        rec = {k: msg.get(k) for k in ("status", "out", "message")}
                        rec["seconds"] = now - last
                        ran.append((index, rec))
                        index += 1
                    elif kind == "done" and loaded:
                        end = ("done",)
                        break
                    elif kind in ("load_error", "setup_error") and not loaded:
                        end = (kind, str(msg.get("message", ""))[:1000])
                        break
                    else:
                        end = ("crash", index, "protocol violation (unexpected message)", 0.0)
                        break
                    last = now
                    phase = now + lim.case_timeout_s
        finally:
            os.close(r)
            self._kill(pid)
            self._cleanup()
        return ran, end, mode

    def _reap(self, pid: int) -> int | None:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return None
        return os.waitstatus_to_exitcode(status)

    def _kill(self, pid: int) -> None:
        for target in (lambda: os.kill(pid, signal.SIGKILL), lambda: os.killpg(pid, signal.SIGKILL)):
            try:
                target()
            except (ProcessLookupError, PermissionError):
                pass
        self._reap(pid)
        if self.own_pidns is None:
            # no PID namespace: descendants that left the process group were re-parented to
            # this subreaper; kill them too
            for _ in range(20):
                orphans = self._children()
                if not orphans:
                    break
                for child in orphans:
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.01)
        while True:  # reap what was killed
            try:
                child, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if child == 0:
                break

    def _children(self) -> list[int]:
        """Live (not zombie) children of this process."""
        out = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == self.pid and fields[0] != "Z":
                out.append(int(name))
        return out

    def _cleanup(self) -> None:
        # with the tmpfs nothing is left (files vanished with the mount namespace); without it
        # the jailed process worked in a directory of its own under the base directory
        for name in os.listdir(self.base):
            shutil.rmtree(os.path.join(self.base, name), ignore_errors=True)

    # ---------------------------------------------------------------- jailed side

    def _jail(self, w: int, job: dict[str, Any], start: int, pidns: bool) -> None:
        lim = self.limits

        def send(obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            data = _HEADER.pack(len(data)) + data
            while data:
                data = data[os.write(w, data) :]

        mode = {"pid_namespace": "yes" if pidns else "no (process group kill)"}
        supervisor = self.pid
        try:
            os.setsid()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-large write fails, not the process
            stdin_fds = []
            if job["mode"] == "stdio":
                for text in job["inputs"][start:]:
                    fd = os.memfd_create("stdin")
                    data = text.encode()
                    while data:
                        data = data[os.write(fd, data) :]
                    stdin_fds.append(fd)
            devnull = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            keep = {0, 1, 2, w, *stdin_fds}
            for name in os.listdir("/proc/self/fd"):  # (closerange over 65536 fds costs ~10 ms)
                if int(name) not in keep:
                    try:
                        os.close(int(name))
                    except OSError:  # the directory's own descriptor, already closed
                        pass
            vm_size = _vm_size()
            own_tasks = _count_tasks(self.real_uid) if self.uid is None and not self.root else 0
            # namespaces (the network one is the supervisor's: empty, made once, see __init__)
            if self.netns:
                mode["network"] = "none (empty network namespace)"
            else:
                try:
                    _unshare(CLONE_NEWNET)
                    mode["network"] = "none (empty network namespace)"
                except OSError:
                    mode["network"] = "socket blocked in Python (no network namespace)"
            try:
                _unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)
                mountns = True
            except OSError:
                mountns = False
            # filesystem
            mode["filesystem"] = "cwd in a temporary directory (no chroot)"
            workdir = ""
            if mountns:
                try:
                    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
                    owner = f",uid={self.uid},gid={self.gid}" if self.uid is not None else ""
                    opts = f"size={lim.disk_mb}m,nr_inodes=1024,mode=0700{owner}"
                    # over the supervisor's base directory, in this process's own mount namespace:
                    # nothing to unmount or delete afterwards (a mount on a per-evaluation
                    # directory made its rmdir cost ~20 ms)
                    _mount("tmpfs", self.base, "tmpfs", MS_NOSUID | MS_NODEV, opts)
                    workdir = self.base
                    mode["filesystem"] = f"chroot into a {lim.disk_mb} MB tmpfs"
                except OSError:
                    mode["filesystem"] = "chroot into a temporary directory"
            if not workdir:
                workdir = tempfile.mkdtemp(dir=self.base)
                if self.uid is not None:
                    os.chown(workdir, self.uid, self.gid)
            os.chdir(workdir)
            try:
                os.chroot(".")
                os.chdir("/")
            except OSError:
                mode["filesystem"] = "cwd in a temporary directory (no chroot)"
            # limits
            n_run = len(job["inputs"]) - start
            cpu = int(math.ceil((n_run + 1) * lim.case_timeout_s)) + 1
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(lim.file_size_mb * 2**20),) * 2)
            nofile = max(lim.max_open_files, len(keep) + 16)
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            if self.uid is not None:
                resource.setrlimit(resource.RLIMIT_NPROC, (lim.max_processes,) * 2)
                os.setgroups([])
                os.setgid(self.gid)
                os.setuid(self.uid)
                mode["user"] = f"{lim.user} (uid {self.uid})"
                mode["processes"] = f"RLIMIT_NPROC={lim.max_processes} for uid {self.uid}"
            else:
                mode["user"] = "root (user=None)" if self.root else f"uid {self.outer_uid}"
                if self.userns:  # root of our own user namespace: give up its capabilities
                    _drop_capabilities()
                    mode["user"] += ", all capabilities dropped"
                if self.root:
                    mode["processes"] = "not limited (RLIMIT_NPROC does not apply to root)"
                else:
                    nproc = own_tasks + lim.max_processes
                    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
                    mode["processes"] = f"RLIMIT_NPROC={nproc} (uid's current count + {lim.max_processes})"
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
            # die with the supervisor (set after setuid, which clears it); it may already be gone
            _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl")
            if not pidns and os.getppid() != supervisor:  # (PID 1 of a namespace sees ppid 0)
                os._exit(72)
            memory = vm_size + lim.memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            mode["memory"] = f"RLIMIT_AS = interpreter + {lim.memory_mb} MB"
            os.environ.clear()
            sys.path[:] = []
            if not mode["network"].startswith("none"):
                _block_sockets()
        except BaseException as exc:  # noqa: BLE001 - never run code in a half-built jail
            send({"t": "setup_error", "message": f"sandbox setup failed: {_short(exc)}"})
            os._exit(71)
        _harness(send, job, start, stdin_fds, lim.max_output_bytes, mode)
        os._exit(0)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    """Clear every capability of this process (capset with empty sets)."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _block_sockets() -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError("network access is disabled in the sandbox")

    for mod in (socket_mod, _socket):
        for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo"):
            if hasattr(mod, name):
                setattr(mod, name, refuse)


def _harness(send: Any, job: dict[str, Any], start: int, stdin_fds: list[int], cap: int, mode: dict[str, str]) -> None:
    """Run the code, then each case from ``start``; report outputs (never verdicts)."""
    out, _ = _text_sink(cap)
    sys.stdout = sys.stderr = sys.__stdout__ = sys.__stderr__ = out
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BytesIO(b""))
    try:
        compiled = compile(job["code"], "<solution>", "exec")
    except BaseException as exc:  # noqa: BLE001
        send({"t": "load_error", "message": _short(exc)})
        return
    inputs = job["inputs"]
    if job["mode"] == "call":
        namespace: dict[str, Any] = {"__name__": "__solution__", "__builtins__": builtins}
        try:
            exec(compiled, namespace)
        except BaseException as exc:  # noqa: BLE001 - SystemExit included
            send({"t": "load_error", "message": _short(exc)})
            return
        fn = namespace.get(job["fn_name"])
        if not callable(fn):
            send({"t": "load_error", "message": f"the code defines no function {job['fn_name']!r}"})
            return
        send({"t": "loaded", "mode": mode})
        for i in range(start, len(inputs)):
            args = json.loads(inputs[i])  # a fresh copy: the function may mutate its arguments
            try:
                value = _to_json_value(fn(*args))
                text = json.dumps(value)
                if len(text) > cap:
                    rec = {"status": "error", "message": f"return value over {cap} bytes"}
                else:
                    rec = {"status": "ok", "out": value}
            except BaseException as exc:  # noqa: BLE001
                rec = {"status": "error", "message": _short(exc)}
            send({"t": "case", "i": i, **rec})
    else:
        send({"t": "loaded", "mode": mode})
        for k, i in enumerate(range(start, len(inputs))):
            fd = stdin_fds[k]
            os.lseek(fd, 0, os.SEEK_SET)
            os.dup2(fd, 0)
            sys.stdin = sys.__stdin__ = io.TextIOWrapper(
                io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8", errors="replace"
            )
            case_out, raw = _text_sink(cap)
            sys.stdout = sys.__stdout__ = case_out
            rec: dict[str, Any] = {"status": "ok"}
            try:
                exec(compiled, {"__name__": "__main__", "__builtins__": builtins})
            except SystemExit as exc:
                if exc.code not in (None, 0):
                    rec = {"status": "error", "message": f"exit status {exc.code!r}"}
            except BaseException as exc:  # noqa: BLE001
                rec = {"status": "error", "message": _short(exc)}
            try:
                case_out.flush()
            except BaseException:  # noqa: BLE001
                pass
            if rec["status"] == "ok":
                rec["out"] = raw.data.decode("utf-8", errors="replace")
            send({"t": "case", "i": i, **rec})
    send({"t": "done"})


def _zygote(setup: dict[str, Any]) -> _Jailer:
    """Pool-worker factory (see :class:`~vespo.tasks.procpool.ProcessPool`)."""
    return _Jailer(setup)


# --------------------------------------------------------------------------- client


def _supervisor_env() -> dict[str, str]:
    """What the supervisors get: an import path, nothing of the trainer's environment."""
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    return {"PATH": os.defpath, "PYTHONPATH": os.pathsep.join(paths), "LC_ALL": "C.UTF-8"}


class Sandbox:
    """Evaluates code against test cases in jailed processes (see the module docstring).

    Args:
        limits: per-evaluation limits.
        workers: supervisor processes; :meth:`run_many` evaluates that many at once.

    ``totals`` counts evaluations, cases, passed cases, timeouts, crashes, errors and code that
    failed to load, over the sandbox's life.
    """

    def __init__(self, limits: SandboxLimits | None = None, workers: int = 2):
        self.limits = limits or SandboxLimits()
        self.base = tempfile.mkdtemp(prefix="vespo-sandbox-")
        os.chmod(self.base, 0o711)
        self._remove_base = weakref.finalize(self, shutil.rmtree, self.base, True)
        self.pool = ProcessPool(
            "vespo.tasks.sandbox:_zygote",
            {"limits": asdict(self.limits), "base": self.base},
            workers=workers,
            env=_supervisor_env(),
            name="sandbox",
        )
        self.totals: dict[str, int] = dict.fromkeys(
            ("evaluations", "cases", "passed", "timeouts", "crashes", "errors", "load_errors", "rejected"), 0
        )
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop the supervisor processes and remove their directories."""
        self.pool.close()
        self._remove_base()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, code: str, tests: CodeTests, *, stop_at_failure: bool = False) -> SandboxResult:
        """Evaluate one piece of code (see :meth:`run_many`)."""
        return self.run_many([(code, tests)], stop_at_failure=stop_at_failure)[0]

    def run_many(self, jobs: Sequence[tuple[str, CodeTests]], *, stop_at_failure: bool = False) -> list[SandboxResult]:
        """Evaluate several ``(code, tests)`` pairs, ``workers`` at a time; results in order.

        ``stop_at_failure``: after a case that timed out or crashed, run no further cases (they
        are ``not_run``); right for pass/fail scoring, where one failure decides the score.
        """
        lim = self.limits
        results: list[SandboxResult | None] = [None] * len(jobs)
        calls, where = [], []
        for k, (code, tests) in enumerate(jobs):
            if not isinstance(code, str) or not code.strip() or len(code.encode()) > lim.max_code_bytes:
                results[k] = SandboxResult(
                    "rejected",
                    [CaseResult("not_run") for _ in tests.inputs],
                    f"code is empty or over {lim.max_code_bytes} bytes",
                )
                continue
            inputs = [json.dumps(list(a)) for a in tests.inputs] if tests.mode == "call" else list(tests.inputs)
            job = {
                "code": code,
                "mode": tests.mode,
                "fn_name": tests.fn_name,
                "inputs": inputs,
                "stop_at_failure": stop_at_failure,
            }
            calls.append((job,))
            where.append(k)
        backstop = (
            max((lim.total_timeout_s or (len(jobs[k][1].inputs) + 1) * lim.case_timeout_s) + 30.0 for k in where)
            if where
            else None
        )
        for k, res in zip(where, self.pool.map(calls, timeout_s=backstop) if calls else []):
            results[k] = self._result(res, jobs[k][1])
        out = [r for r in results if r is not None]
        with self._lock:
            for r in out:
                self.totals["evaluations"] += 1
                self.totals["cases"] += r.total
                self.totals["passed"] += r.passed
                self.totals["timeouts"] += sum(c.status == "timeout" for c in r.cases)
                self.totals["crashes"] += sum(c.status == "crash" for c in r.cases) + (r.status == "crash")
                self.totals["errors"] += sum(c.status == "error" for c in r.cases)
                self.totals["load_errors"] += r.status in ("load_error", "load_timeout")
                self.totals["rejected"] += r.status == "rejected"
        return out

    def _result(self, res: Any, tests: CodeTests) -> SandboxResult:
        n = len(tests.inputs)
        if res.status != OK:  # the supervisor itself failed (should not happen)
            return SandboxResult("crash", [CaseResult("not_run") for _ in range(n)], f"supervisor: {res.message}")
        value = res.value
        load = value["load"]
        cases = []
        for rec, want in zip(value["cases"], tests.outputs):
            status = rec.get("status", "crash")
            passed = status == "ok" and outputs_match(rec.get("out"), want, tests.mode)
            cases.append(CaseResult(status, passed, str(rec.get("message") or ""), float(rec.get("seconds") or 0)))
        if load is not None:
            status = load["status"]
            if status == "crash_loading":
                status = "crash"
            if status == "setup_error":
                logger.error("%s (no code was run)", load["message"])
            return SandboxResult(status, cases, load["message"], value["mode"], res.seconds)
        return SandboxResult("ok", cases, "", value["mode"], res.seconds)


_SHARED: dict[tuple[SandboxLimits, int], Sandbox] = {}
_SHARED_LOCK = threading.Lock()


def shared_sandbox(limits: SandboxLimits | None = None, workers: int = 2) -> Sandbox:
    """A process-wide :class:`Sandbox` per ``(limits, workers)``, started on first use."""
    key = (limits or SandboxLimits(), workers)
    with _SHARED_LOCK:
        box = _SHARED.get(key)
        if box is None or box.pool._closed:
            box = _SHARED[key] = Sandbox(key[0], workers)
        return box


def capabilities(sandbox: Sandbox | None = None) -> dict[str, str]:
    """Which protections are in force on this machine (from a trivial evaluation)."""
    box = sandbox or shared_sandbox()
    result = box.run("def f():\n    return 1\n", CodeTests([[]], [1], "f"))
    if result.status != "ok":
        raise RuntimeError(f"sandbox self-test failed: {result.status} {result.message}")
    return dict(result.mode)
