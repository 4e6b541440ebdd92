"""Answer extraction, math-verify scoring, user reward functions and a fault-tolerant reward runner.

Reward functions
----------------
A reward function has the signature ``fn(response: str, example: Example) -> float``:
``response`` is the generated continuation only (without the prompt), ``example`` is the
:class:`~vespo.tasks.base.Example` it answers (``example.ground_truth``, ``example.metadata``).
It should return a value in [0, 1]; ``bool`` is accepted. Load one with
:func:`load_reward_function` (``"package.module:function"`` or ``"path/to/file.py:function"``).

Time limits
-----------
:class:`RewardRunner` calls the scorer once per response with a time limit. In the main thread it
uses ``signal.setitimer`` (SIGALRM), which also interrupts pure-Python infinite loops and
``time.sleep``; math-verify, which would otherwise arm its own ``signal.alarm`` and cancel ours,
is called with its timeouts disabled while our timer is armed (see :func:`math_verify_equal`).
Off the main thread (or without SIGALRM) the call runs in a helper thread; on timeout an
exception is injected into it (``PyThreadState_SetAsyncExc``), which stops Python-level loops,
and the runner moves on with a score of 0 either way.
The timeout exception derives from BaseException, so ``except Exception`` in user code does not
swallow it; a call that catches it anyway still scores 0 (the deadline has passed). What cannot be
cut in-process: code that swallows every BaseException in a loop, and long C calls in the helper
thread (the thread is abandoned, the run goes on).
A user function that calls math-verify itself should pass ``parsing_timeout=None`` and
``timeout_seconds=None`` (or use :func:`math_verify_equal`), otherwise math-verify's own alarm
replaces the runner's timer in the main thread.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import inspect
import logging
import math
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vespo.tasks.base import Example, RewardFn, Task, stable_hash

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- answer extraction

_ANSWER_RE = re.compile(r"answer\s*:", re.IGNORECASE)
_BOXED_NAMES = ("\\boxed", "\\fbox")


def extract_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included.

    ``"so \\boxed{\\frac{1}{2}}."`` -> ``"\\frac{1}{2}"``. ``\\boxed 5`` (no braces) gives ``"5"``.
    Returns None if there is no box or the last one is not closed (a truncated response).
    """
    start, name = -1, ""
    for candidate in _BOXED_NAMES:
        pos = text.rfind(candidate)
        if pos > start:
            start, name = pos, candidate
    if start < 0:
        return None
    j = start + len(name)
    if j < len(text) and text[j] == " ":
        # "\boxed 5": the argument is the next whitespace/dollar-delimited token
        m = re.match(r" +([^\s$]+)", text[j:])
        return m.group(1) if m else None
    if j >= len(text) or text[j] != "{":
        return None
    depth = 0
    i = j
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # skip escaped characters such as \{ \} and command names
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : i].strip()
        i += 1
    return None


def extract_answer(text: str, multiline: bool = False) -> str | None:
    """The final answer of a ``"<steps> Answer: <x>"`` response.

    Takes the text after the last ``Answer:`` (case-insensitive, so ``Final answer:`` and
    ``**Answer:**`` work) up to the end of that line (or the next non-empty line if the marker
    ends its line), strips ``*``, ``$``, spaces and a trailing period. A ``\\boxed{}`` on that line
    is unwrapped. Without an ``Answer:`` marker, the last ``\\boxed{}`` is used. None if nothing.
    With ``multiline=True`` (answers such as matrices) everything after the marker is returned,
    only stripped of surrounding whitespace.
    """
    matches = list(_ANSWER_RE.finditer(text))
    if not matches:
        return extract_last_boxed(text)
    rest = text[matches[-1].end() :]
    if multiline:
        return rest.strip() or None
    line = ""
    for candidate in rest.splitlines():
        if candidate.strip(" \t*"):
            line = candidate
            break
    boxed = extract_last_boxed(line)
    if boxed is not None:
        line = boxed
    line = line.strip().strip("*").strip().strip("$").strip()
    while line.endswith("."):
        line = line[:-1].rstrip()
    return line or None


# --------------------------------------------------------------------------- timeouts


class RewardTimeout(BaseException):
    """Raised inside a reward call that exceeded its time limit.

    A BaseException so that ``except Exception`` blocks in user code and libraries do not
    swallow it.
    """


class _TimerState(threading.local):
    active: bool = False
    fired: bool = False


_TIMER = _TimerState()
_REPEAT_S = 0.1  # after the deadline, SIGALRM repeats in case user code swallowed the first one


def external_timer_active() -> bool:
    """True while :func:`call_with_timeout` has a SIGALRM deadline armed in this thread."""
    return _TIMER.active


def _can_use_signals() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _disarm() -> None:
    while True:
        try:
            _TIMER.active = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        except RewardTimeout:  # a signal that slipped in before `active` was cleared
            continue


def _call_with_alarm(fn: Callable[..., Any], args: tuple, timeout_s: float) -> tuple[str, Any]:
    def handler(signum, frame):  # noqa: ARG001
        if _TIMER.active:
            _TIMER.fired = True
            raise RewardTimeout()

    old_handler = signal.signal(signal.SIGALRM, handler)
    start = time.monotonic()
    old_timer = (0.0, 0.0)
    status, value = "timeout", None
    try:
        try:
            _TIMER.fired = False
            _TIMER.active = True
            old_timer = signal.setitimer(signal.ITIMER_REAL, timeout_s, _REPEAT_S)
            try:
                value = fn(*args)
                status = "ok"
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - the run must go on
                status, value = "error", exc
            finally:
                _disarm()
        except RewardTimeout:
            status, value = "timeout", None
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_timer[0] > 0:  # someone else's timer was armed: give it back its remaining time
            remaining = max(old_timer[0] - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_timer[1])
    if _TIMER.fired:  # the deadline passed, even if the function swallowed the exception
        status, value = "timeout", None
    return status, value


def _async_raise(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    if thread.ident is None:
        return
    res = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))
    if res > 1:  # should not happen; undo
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), None)


def _call_in_thread(fn: Callable[..., Any], args: tuple, timeout_s: float) -> tuple[str, Any]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
            box["status"] = "ok"
        except RewardTimeout:
            box["status"] = "timeout"
        except BaseException as exc:  # noqa: BLE001
            box["status"], box["value"] = "error", exc

    worker = threading.Thread(target=target, name="vespo-reward", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        _async_raise(worker, RewardTimeout)
        worker.join(0.05)
        return "timeout", None
    return box.get("status", "error"), box.get("value")


def call_with_timeout(fn: Callable[..., Any], args: tuple, timeout_s: float | None) -> tuple[str, Any]:
    """Run ``fn(*args)`` with a time limit; returns ``(status, value)``.

    ``status`` is ``"ok"`` (value = the return value), ``"error"`` (value = the exception) or
    ``"timeout"``. ``timeout_s`` None or <= 0 disables the limit. Inside an already armed
    deadline the call runs directly (the outer deadline applies).
    """
    if timeout_s is None or timeout_s <= 0 or _TIMER.active:
        try:
            return "ok", fn(*args)
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            return "error", exc
    if _can_use_signals():
        return _call_with_alarm(fn, args, timeout_s)
    return _call_in_thread(fn, args, timeout_s)


# --------------------------------------------------------------------------- math-verify

MATH_VERIFY_TIMEOUT_S = 5  # math-verify's own limit (seconds) when no runner deadline is armed
_GOLD_CACHE: dict[str, list] = {}
_GOLD_CACHE_MAX = 65536


def _math_verify_timeouts() -> int | None:
    """math-verify's own (signal.alarm) timeout, or None where it must not touch SIGALRM."""
    if _TIMER.active or not _can_use_signals():
        import math_verify.grader
        import math_verify.parser

        # we handle time limits ourselves; silence math-verify's one-time warning about it
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True
        return None
    return MATH_VERIFY_TIMEOUT_S


def _parse_gold(gold: str, timeout: int | None) -> list:
    from math_verify import parse

    cached = _GOLD_CACHE.get(gold)
    if cached is not None:
        return cached
    text = gold.strip()
    # Parse wrapped in $...$ first: bare parse("2\\sqrt{2}") yields just 2.
    candidates = [text] if "$" in text or "\\boxed" in text else [f"${text}$", text]
    candidates.append(f"\\boxed{{{text}}}")
    parsed: list = []
    for candidate in candidates:
        parsed = parse(candidate, parsing_timeout=timeout)
        if parsed:
            break
    if parsed and len(_GOLD_CACHE) < _GOLD_CACHE_MAX:
        _GOLD_CACHE[gold] = parsed
    return parsed


def math_verify_equal(pred: str, gold: str) -> bool:
    """True if the LaTeX answer ``pred`` (e.g. a ``\\boxed{}`` content) equals ``gold`` per math-verify.

    ``\\frac{1}{2}`` == ``0.5``, ``2\\sqrt{2}`` == ``\\sqrt{8}``. The gold answer is parsed inside
    ``$...$`` (then bare, then boxed, whichever first yields something).
    """
    from math_verify import parse, verify

    timeout = _math_verify_timeouts()
    gold_parsed = _parse_gold(gold, timeout)
    pred_text = pred.strip().strip("$").strip()
    if not gold_parsed or not pred_text:
        return False
    pred_parsed = parse(f"${pred_text}$", parsing_timeout=timeout)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def math_verify_score(response: str, ground_truth: str) -> float:
    """1.0 if the last ``\\boxed{...}`` of ``response`` matches ``ground_truth`` (math-verify), else 0.0."""
    pred = extract_last_boxed(response)
    if pred is None:
        return 0.0
    return 1.0 if math_verify_equal(pred, ground_truth) else 0.0


# --------------------------------------------------------------------------- user reward functions


def load_reward_function(spec: str) -> RewardFn:
    """Load ``fn(response: str, example: Example) -> float`` from ``"module:function"``.

    The module part is a dotted import path (``mypkg.rewards:exact``) or a ``.py`` file
    (``/path/to/rewards.py:exact``); the attribute part may be dotted (``module:Class.method``).
    Raises ValueError for a malformed spec, a module that cannot be imported, a missing
    attribute, or an object that is not callable with two positional arguments.
    """
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise ValueError(f"reward function spec {spec!r} must look like 'module:function' or 'file.py:function'")
    module_part, _, attr_part = spec.rpartition(":")
    module_part, attr_part = module_part.strip(), attr_part.strip()
    if not module_part or not attr_part or not all(p.isidentifier() for p in attr_part.split(".")):
        raise ValueError(f"reward function spec {spec!r} must look like 'module:function' or 'file.py:function'")

    if module_part.endswith(".py"):
        path = Path(module_part).expanduser()
        if not path.is_file():
            raise ValueError(f"reward function spec {spec!r}: file {str(path)!r} does not exist")
        mod_name = f"vespo_user_reward_{stable_hash(str(path.resolve())):x}"
        file_spec = importlib.util.spec_from_file_location(mod_name, path)
        if file_spec is None or file_spec.loader is None:
            raise ValueError(f"reward function spec {spec!r}: cannot load {str(path)!r} as a Python module")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[mod_name] = module
        try:
            file_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise ValueError(f"reward function spec {spec!r}: importing {str(path)!r} failed: {exc!r}") from exc
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as exc:
            if exc.name and (module_part == exc.name or module_part.startswith(exc.name + ".")):
                raise ValueError(f"reward function spec {spec!r}: no module named {module_part!r}") from exc
            raise ValueError(f"reward function spec {spec!r}: importing {module_part!r} failed: {exc}") from exc
        except Exception as exc:
            raise ValueError(f"reward function spec {spec!r}: importing {module_part!r} failed: {exc!r}") from exc

    obj: Any = module
    for name in attr_part.split("."):
        if not hasattr(obj, name):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ValueError(
                f"reward function spec {spec!r}: {module_part!r} has no attribute {attr_part!r}"
                f" (callables there: {', '.join(public[:20]) or 'none'})"
            )
        obj = getattr(obj, name)
    if not callable(obj):
        raise ValueError(f"reward function spec {spec!r}: {attr_part!r} is a {type(obj).__name__}, not callable")
    try:
        inspect.signature(obj).bind("response", None)
    except TypeError as exc:
        raise ValueError(
            f"reward function spec {spec!r}: {attr_part!r} must accept (response, example): {exc}"
        ) from exc
    except ValueError:  # no signature available (some builtins): accept
        pass
    return obj


# --------------------------------------------------------------------------- runner


class RewardRunner:
    """Scores batches with a task's scorer or a reward function, containing failures.

    A call that raises or exceeds ``timeout_s`` scores 0 and the run goes on. Returned values
    are sanitised: bools become 0/1, NaN and +-inf become 0 (counted in ``reward/nonfinite``),
    finite values outside [0, 1] are clipped (counted in ``reward/clipped``), anything that is
    not a real number scores 0 and counts as an error.

    Args:
        task_or_fn: a :class:`Task` (its ``score`` is used) or a callable ``fn(response, example)``.
        timeout_s: time limit per response in seconds (None or <= 0: no limit).
        max_logged_errors: how many error/timeout messages to log (the rest are only counted).
    """

    def __init__(self, task_or_fn: Task | RewardFn, timeout_s: float | None = 5.0, max_logged_errors: int = 10):
        if isinstance(task_or_fn, Task) or (hasattr(task_or_fn, "score") and callable(task_or_fn.score)):
            self.fn: RewardFn = task_or_fn.score  # type: ignore[union-attr]
            self.name = getattr(task_or_fn, "name", type(task_or_fn).__name__)
        elif callable(task_or_fn):
            self.fn = task_or_fn
            self.name = getattr(task_or_fn, "__qualname__", None) or type(task_or_fn).__name__
        else:
            raise TypeError(f"RewardRunner needs a Task or a callable, got {type(task_or_fn).__name__}")
        self.timeout_s = timeout_s
        self.max_logged_errors = max_logged_errors
        self.totals: dict[str, int] = {"calls": 0, "errors": 0, "timeouts": 0, "nonfinite": 0, "clipped": 0}
        self.recent_errors: deque[str] = deque(maxlen=20)
        self._logged = 0

    def _note(self, kind: str, message: str) -> None:
        self.recent_errors.append(f"{kind}: {message}")
        if self._logged < self.max_logged_errors:
            self._logged += 1
            suffix = " (further messages suppressed)" if self._logged == self.max_logged_errors else ""
            logger.warning("reward %s in %s: %s%s", kind, self.name, message, suffix)

    def score_one(self, response: str, example: Example) -> tuple[float, str]:
        """Score one response; returns ``(score, outcome)`` with outcome in
        ``ok | error | timeout | nonfinite | clipped``."""
        status, value = call_with_timeout(self.fn, (response, example), self.timeout_s)
        if status == "timeout":
            self._note("timeout", f"exceeded {self.timeout_s}s on uid={example.uid!r}")
            return 0.0, "timeout"
        if status == "error":
            self._note("error", f"{type(value).__name__}: {value} (uid={example.uid!r})")
            return 0.0, "error"
        if isinstance(value, bool):
            return float(value), "ok"
        try:
            score = float(value)
        except (TypeError, ValueError):
            self._note("error", f"returned {type(value).__name__} {value!r:.60}, not a number (uid={example.uid!r})")
            return 0.0, "error"
        if not math.isfinite(score):
            self._note("nonfinite", f"returned {score} (uid={example.uid!r})")
            return 0.0, "nonfinite"
        if score < 0.0 or score > 1.0:
            return min(max(score, 0.0), 1.0), "clipped"
        return score, "ok"

    def score_batch(
        self, responses: Sequence[str], examples: Sequence[Example]
    ) -> tuple[list[float], dict[str, float]]:
        """Scores in [0, 1] for ``responses[i]`` answering ``examples[i]``, and batch statistics.

        Stats: ``reward/errors``, ``reward/timeouts``, ``reward/nonfinite``, ``reward/clipped``
        (counts in this batch) and ``reward/scoring_time_s``.
        """
        if len(responses) != len(examples):
            raise ValueError(f"score_batch got {len(responses)} responses but {len(examples)} examples")
        counts = {"errors": 0, "timeouts": 0, "nonfinite": 0, "clipped": 0}
        key = {"error": "errors", "timeout": "timeouts", "nonfinite": "nonfinite", "clipped": "clipped"}
        scores: list[float] = []
        start = time.perf_counter()
        for response, example in zip(responses, examples, strict=True):
            score, outcome = self.score_one(response, example)
            scores.append(score)
            if outcome in key:
                counts[key[outcome]] += 1
        elapsed = time.perf_counter() - start
        self.totals["calls"] += len(scores)
        for k, v in counts.items():
            self.totals[k] += v
        stats = {f"reward/{k}": float(v) for k, v in counts.items()}
        stats["reward/scoring_time_s"] = elapsed
        return scores, stats
