"""Starting and stopping Ray for the asynchronous rollout: quiet, small, and without leftovers.

* :func:`start_ray` starts a local Ray instance (no dashboard, no log forwarding, a small object
  store) or joins a cluster at an address. A Ray instance that is already running in this process
  is reused and left alone.
* :class:`RaySession` remembers whether it started Ray, which processes belong to it and where its
  session directory is; :meth:`RaySession.stop` shuts Ray down, waits for those processes, kills
  any that linger and removes the session directory. It runs at most once and is registered with
  ``atexit``, so an exception or ``sys.exit`` in the trainer still stops Ray.
* A trainer killed with SIGKILL cannot clean up: Ray's head processes notice and exit, but its
  dashboard and runtime-env agents linger for a minute or two. :func:`write_process_file` records
  the processes of a session in the run directory and :func:`reap_stale_processes` (called when
  the run is resumed) kills those still alive, identified by pid *and* start time so that a reused
  pid is never touched.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Environment defaults for a quiet, offline Ray (explicit user settings win).
RAY_ENV_DEFAULTS: dict[str, str] = {
    "RAY_AUTH_MODE": "disabled",  # otherwise ray.init writes ~/.ray/auth_token
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting, no prompt
    "RAY_IGNORE_UNHANDLED_ERRORS": "1",  # errors of fire-and-forget calls to a dead worker are handled by us
}
#: Smallest object store Ray accepts is 75 MiB; the tiny models need a few MiB per weight sync.
MIN_OBJECT_STORE_BYTES = 128 * 1024**2

log = logging.getLogger(__name__)


def ray_installed() -> bool:
    """True if ``import ray`` would work."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


# ----------------------------------------------------------------------------- processes
def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces; fields after the last ')' are fixed
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[19]) if len(fields) > 19 else None


def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[0]


def process_alive(pid: int) -> bool:
    """True if ``pid`` runs (zombies, which are only waiting to be reaped, count as gone)."""
    if Path("/proc").is_dir():
        state = _proc_state(pid)
        return bool(state) and state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (Linux /proc; empty elsewhere)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    parent_of: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1:
            parent_of[int(entry.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        nxt = [c for c, p in parent_of.items() if p in frontier]
        out.extend(nxt)
        frontier = nxt
    return out


def _kill_if_same(pid: int, start_time: int | None) -> bool:
    """SIGKILL ``pid`` if it is still the process recorded (same start time, a Ray command line)."""
    if not process_alive(pid):
        return False
    if start_time is not None and _proc_start_time(pid) != start_time:
        return False  # the pid was reused by an unrelated process
    if "ray" not in _proc_cmdline(pid).lower():
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# ------------------------------------------------------------------------------ sessions
@dataclass
class RaySession:
    """A Ray connection made by :func:`start_ray`.

    Attributes:
        owned: True if Ray was started here (then :meth:`stop` shuts it down); False when joining a
            cluster or reusing a Ray that was already running in this process.
        address: the cluster address joined, or None for a local instance.
        session_dir: the local session directory (logs, sockets), if Ray was started here.
        processes: ``{pid: start_time}`` of the local Ray processes started here (head processes,
            agents, workers); filled by :meth:`refresh_processes`.
    """

    owned: bool
    address: str | None = None
    session_dir: str | None = None
    processes: dict[int, int | None] = field(default_factory=dict)
    _stopped: bool = False

    def refresh_processes(self) -> dict[int, int | None]:
        """Record every local process of this Ray instance (head processes and their descendants)."""
        if not self.owned:
            return self.processes
        try:
            import ray

            node = ray._private.worker._global_node  # the node object of a locally started instance
            heads = [p.process.pid for procs in node.all_processes.values() for p in procs if p.process]
        except Exception:  # noqa: BLE001  # pragma: no cover - private API moved
            return self.processes
        for pid in heads + [c for h in heads for c in _children(h)]:
            if pid != os.getpid() and pid not in self.processes:
                self.processes[pid] = _proc_start_time(pid)
        return self.processes

    def alive_processes(self) -> list[int]:
        """Recorded processes that still run."""
        return [
            pid
            for pid, st in self.processes.items()
            if process_alive(pid) and (st is None or _proc_start_time(pid) == st)
        ]

    def stop(self, *, keep_logs: bool = False, timeout_s: float = 10.0) -> None:
        """Shut Ray down (if started here), wait for its processes, kill stragglers, drop the session dir."""
        if self._stopped:
            return
        self._stopped = True
        try:
            import ray
        except ImportError:  # pragma: no cover
            return
        if not self.owned:
            return
        self.refresh_processes()
        try:
            ray.shutdown()
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - must not raise in a finally block
            log.warning("ray.shutdown failed: %s", exc)
        deadline = time.monotonic() + timeout_s
        while self.alive_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.alive_processes():
            _kill_if_same(pid, self.processes[pid])
        if self.session_dir and not keep_logs:
            _remove_session_dir(self.session_dir)


def _remove_session_dir(session_dir: str) -> None:
    path = Path(session_dir)
    shutil.rmtree(path, ignore_errors=True)
    latest = path.parent / "session_latest"
    try:
        if latest.is_symlink() and os.path.realpath(latest) == str(path.resolve()):
            latest.unlink()
    except OSError:
        pass


def start_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_bytes: int | None = None,
) -> RaySession:
    """Connect to Ray: join ``address`` (e.g. ``"ray://head:10001"`` or ``"auto"``), or start a
    local instance (``address=None``); reuse a Ray already initialised in this process.

    The local instance has no dashboard, does not forward worker logs to the terminal and gets a
    small object store (``object_store_bytes``, at least 128 MiB). ``num_cpus`` is the number of
    logical CPUs it advertises.
    """
    import ray

    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return RaySession(owned=False, address=address, _stopped=False)
    quiet = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
        "configure_logging": True,
    }
    if address:
        ray.init(address=address, **quiet)
        session = RaySession(owned=False, address=address)
        atexit.register(_shutdown_joined)
        return session
    store = max(MIN_OBJECT_STORE_BYTES, int(object_store_bytes or 0))
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=store, **quiet)
    session_dir = None
    with contextlib.suppress(Exception):  # private API; without it the session dir is left alone
        session_dir = ray._private.worker._global_node.get_session_dir_path()
    session = RaySession(owned=True, session_dir=session_dir)
    session.refresh_processes()
    atexit.register(session.stop)
    return session


def _shutdown_joined() -> None:
    """Disconnect from a cluster at exit (the cluster itself keeps running)."""
    with contextlib.suppress(Exception):
        import ray

        if ray.is_initialized():
            ray.shutdown()


# ------------------------------------------------------------- leftovers of killed runs
def write_process_file(path: str | Path, session: RaySession) -> None:
    """Record this process and the Ray processes it started (for :func:`reap_stale_processes`)."""
    if not session.owned:
        return
    data = {
        "owner_pid": os.getpid(),
        "owner_start_time": _proc_start_time(os.getpid()),
        "session_dir": session.session_dir,
        "processes": {str(pid): st for pid, st in session.processes.items()},
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def reap_stale_processes(path: str | Path) -> list[int]:
    """Kill the Ray processes recorded in ``path`` by a run whose owner no longer exists.

    Returns the pids killed. Nothing happens if the owner still runs (a live run) or the file is
    missing or unreadable. The file is removed afterwards.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    owner = int(data.get("owner_pid", -1))
    if owner > 0 and process_alive(owner) and _proc_start_time(owner) == data.get("owner_start_time"):
        return []
    killed = [int(pid) for pid, st in data.get("processes", {}).items() if _kill_if_same(int(pid), st)]
    if data.get("session_dir"):
        _remove_session_dir(data["session_dir"])
    path.unlink(missing_ok=True)
    return killed
