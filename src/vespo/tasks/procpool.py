"""A pool of long-lived worker processes that run untrusted calls with per-call time limits.

One implementation serves both the reward runner (user reward functions, math-verify) and the
code sandbox (whose workers fork one jailed process per evaluation):

* each worker is a fresh interpreter (``python -c``, never ``fork`` of the caller, so it works
  from a multi-threaded trainer and inside Ray actors) in its own session, talking to the
  parent over a Unix socket pair;
* the worker is told once what to run: ``factory(arg)`` returns the handler it calls for every
  request (``factory`` is an importable ``"module:function"``; ``arg`` is pickled, with
  cloudpickle when available, and reward modules loaded from ``.py`` files are re-imported in
  the worker first);
* a call that exceeds its timeout kills the worker (its whole process group) and counts as
  ``"timeout"``; a worker that dies (``os._exit``, a segfault, the OOM killer) counts as
  ``"crash"``; either way the worker is replaced and the pool goes on;
* workers exit when the parent goes away (end of file on the socket, or a watchdog thread that
  notices the parent pid changed while a call hangs), and every pool is closed at interpreter
  exit.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

#: statuses of a :class:`CallResult`
OK, ERROR, TIMEOUT, CRASH = "ok", "error", "timeout", "crash"

_BOOT = "import sys; from vespo.tasks.procpool import _worker_main; _worker_main(int(sys.argv[1]))"


@dataclass
class CallResult:
    """Outcome of one call: ``status`` is ok / error / timeout / crash.

    ``value`` is the handler's return value (``ok``); ``message`` describes an error, a timeout
    or a crash (``"worker exited with code 3"``, ``"worker killed by SIGSEGV"``).
    """

    status: str
    value: Any = None
    message: str = ""
    seconds: float = 0.0


class PoolStartError(RuntimeError):
    """A worker could not be started or its handler could not be built (a setup problem)."""


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` with cloudpickle when it is installed (lambdas, closures), else pickle."""
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover - cloudpickle ships with ray
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def resolve(spec: str) -> Callable[..., Any]:
    """The object named by ``"package.module:attr"``."""
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def describe_exit(code: int | None) -> str:
    """``"exited with code 3"`` / ``"killed by SIGSEGV"`` for a Popen return code."""
    if code is None:
        return "is gone"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


# --------------------------------------------------------------------------- worker side


def _watchdog(parent: int) -> None:
    """Exit when the parent process is gone, even while the main thread hangs in a call."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 500 else text[:497] + "..."


def _worker_main(fd: int) -> None:
    """Entry point of a worker process (see :data:`_BOOT`)."""
    conn = Connection(fd)
    try:
        setup = pickle.loads(conn.recv_bytes())
        parent = setup["parent_pid"]
        if os.getppid() != parent:
            return
        sys.path[:] = [p for p in setup["sys_path"] if isinstance(p, str)]
        from vespo.tasks.rewards import preload_user_modules

        preload_user_modules(setup.get("user_modules") or {})
        factory = resolve(setup["factory"])
        # still single-threaded here (the sandbox's factory may call unshare(CLONE_NEWUSER));
        # a factory that hangs is killed by the parent's start timeout
        handler = factory(pickle.loads(setup["arg"]))
        threading.Thread(target=_watchdog, args=(parent,), daemon=True).start()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        try:
            conn.send(("init_error", None, _short(exc)))
        finally:
            os._exit(1)
    try:
        conn.send(("ready", None, os.getpid()))
    except OSError:  # the pool was closed while this worker started
        os._exit(0)
    while True:
        try:
            call_id, args = conn.recv()
        except (EOFError, OSError):
            # the pool closed: a normal exit, so that atexit closes pools this worker made
            # (a code task's sandbox) and removes their directories
            return
        try:
            reply = ("ok", call_id, handler(*args))
        except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included
            reply = ("error", call_id, _short(exc))
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - an unpicklable return value
            data = pickle.dumps(("error", call_id, f"unpicklable return value: {_short(exc)}"))
        try:
            conn.send_bytes(data)
        except OSError:
            return


# --------------------------------------------------------------------------- parent side


class _Worker:
    """One child process and the parent's end of its socket."""

    def __init__(self, setup: bytes, env: dict[str, str] | None, name: str):
        parent_sock, child_sock = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the terminal is the trainer's, not ours
                close_fds=True,
            )
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.conn.send_bytes(setup)
        self.ready = False
        self.started = time.monotonic()
        self.name = name
        self.call: tuple[int, float, float] | None = None  # (index, start, deadline)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group and reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process in D state
            logger.warning("%s worker %d did not exit after SIGKILL", self.name, self.proc.pid)
        self.conn.close()

    def exit_message(self) -> str:
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
        return f"worker {describe_exit(code)}"


def _close_workers(workers: list[_Worker]) -> None:
    for worker in list(workers):
        try:
            worker.conn.close()  # end of file: an idle worker exits by itself
        except OSError:
            pass
    deadline = time.monotonic() + 1.0
    for worker in list(workers):
        try:
            worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
    workers.clear()


_POOLS: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


@atexit.register
def _close_all_pools() -> None:
    for pool in list(_POOLS):
        pool.close()


class ProcessPool:
    """Worker processes that run ``handler(*args)`` calls, each with a time limit.

    Args:
        factory: ``"module:function"``; ``factory(arg)`` returns the handler, once per worker.
        arg: what the factory gets (pickled once here, with cloudpickle when available).
        workers: number of processes (calls of one :meth:`map` run on them concurrently).
        env: environment of the workers (None: the parent's).
        name: for log messages.
        start_timeout_s: how long a worker may take to start and build its handler.
        user_modules: ``{module name: .py path}`` to import in the worker before unpickling
            ``arg`` (reward functions loaded from files); None: every file module loaded so far.
    """

    def __init__(
        self,
        factory: str,
        arg: Any,
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
        name: str = "pool",
        start_timeout_s: float = 120.0,
        user_modules: dict[str, str] | None = None,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        from vespo.tasks.rewards import user_module_paths

        self.name = name
        self.num_workers = int(workers)
        self.start_timeout_s = float(start_timeout_s)
        self.env = env
        self._setup = pickle.dumps(
            {
                "parent_pid": os.getpid(),
                "sys_path": list(sys.path),
                "user_modules": user_module_paths() if user_modules is None else user_modules,
                "factory": factory,
                "arg": dumps(arg),
            }
        )
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self.replaced = 0  # workers killed or lost and replaced
        self._finalizer = weakref.finalize(self, _close_workers, self._workers)
        _POOLS.add(self)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the missing workers (non-blocking; they get ready in the background)."""
        if self._closed:
            raise RuntimeError(f"{self.name} pool is closed")
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._setup, self.env, self.name))

    def close(self) -> None:
        """Stop every worker (idempotent; also run at interpreter exit)."""
        self._closed = True
        if os.getpid() == self._pid:  # a forked child must not reap its parent's workers
            _close_workers(self._workers)

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.proc.pid for w in self._workers]

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)
        self.replaced += 1
        if not self._closed:
            self._workers.append(_Worker(self._setup, self.env, self.name))

    # ------------------------------------------------------------------ calls

    def call(self, *args: Any, timeout_s: float | None = None) -> CallResult:
        """One call on one worker."""
        return self.map([args], timeout_s=timeout_s)[0]

    def map(self, calls: Sequence[tuple], timeout_s: float | None = None) -> list[CallResult]:
        """Run every ``handler(*args)`` of ``calls`` on the workers; results in order.

        ``timeout_s`` (None or <= 0: none) counts from the moment a ready worker takes the call.

        Raises:
            PoolStartError: the handler cannot be built in a worker, or workers keep dying
                before they are ready.
        """
        with self._lock:
            return self._map(list(calls), timeout_s if timeout_s and timeout_s > 0 else None)

    def _map(self, calls: list[tuple], timeout_s: float | None) -> list[CallResult]:
        results: list[CallResult | None] = [None] * len(calls)
        if not calls:
            return []
        self.start()
        todo = list(range(len(calls)))
        todo.reverse()
        start_failures = 0
        while any(r is None for r in results):
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.ready and worker.call is None and todo:
                    index = todo.pop()
                    deadline = now + timeout_s if timeout_s else float("inf")
                    worker.call = (index, now, deadline)
                    try:
                        worker.conn.send((index, calls[index]))
                    except (OSError, ValueError):
                        pass  # the worker died; wait() reports end of file below
            deadlines = [w.call[2] for w in self._workers if w.call is not None]
            deadlines += [w.started + self.start_timeout_s for w in self._workers if not w.ready]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            ready = wait([w.conn for w in self._workers], timeout=wait_s)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.conn in ready:
                    try:
                        kind, call_id, value = worker.conn.recv()
                    except (EOFError, OSError, pickle.UnpicklingError):
                        message = worker.exit_message()
                        if worker.call is not None:
                            index, started, _ = worker.call
                            results[index] = CallResult(CRASH, None, message, now - started)
                        elif not worker.ready:
                            start_failures += 1
                            if start_failures >= 3:
                                raise PoolStartError(
                                    f"{self.name} workers keep dying before they are ready ({message})"
                                ) from None
                        self._replace(worker)
                        continue
                    if kind == "ready":
                        worker.ready = True
                    elif kind == "init_error":
                        self.close()
                        raise PoolStartError(f"{self.name} worker could not start: {value}")
                    elif worker.call is not None and call_id == worker.call[0]:
                        index, started, _ = worker.call
                        status = OK if kind == "ok" else ERROR
                        results[index] = CallResult(
                            status,
                            value if status == OK else None,
                            "" if status == OK else value,
                            now - started,
                        )
                        worker.call = None
                elif worker.call is not None and now >= worker.call[2]:
                    index, started, _ = worker.call
                    results[index] = CallResult(TIMEOUT, None, f"exceeded {timeout_s}s (worker killed)", now - started)
                    self._replace(worker)
                elif not worker.ready and now >= worker.started + self.start_timeout_s:
                    self.close()
                    raise PoolStartError(f"{self.name} worker did not start within {self.start_timeout_s}s")
        return [r for r in results if r is not None]
