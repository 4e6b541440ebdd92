"""Answer extraction, math-verify scoring, user reward functions and a fault-tolerant reward runner.

Reward functions
----------------
A reward function has the signature ``fn(response: str, example: Example) -> float``:
``response`` is the generated continuation only (without the prompt), ``example`` is the
:class:`~vespo.tasks.base.Example` it answers (``example.ground_truth``, ``example.metadata``).
It should return a value in [0, 1]; ``bool`` is accepted. Load one with
:func:`load_reward_function` (``"package.module:function"`` or ``"path/to/file.py:function"``).

Isolation and time limits
-------------------------
:class:`RewardRunner` runs the scorer in a pool of worker processes
(:class:`~vespo.tasks.procpool.ProcessPool`), reused across calls. A call that exceeds
``timeout_s`` has its worker killed (``reward/timeouts``); a worker that dies (``os._exit``,
a segfault, the OOM killer) or a scorer that raises scores 0 (``reward/errors``); a killed or
lost worker is replaced and the run goes on. Each call runs in the worker's main thread, so
math-verify keeps its own ``signal.alarm`` limits. Reward modules loaded from ``.py`` files are
re-imported in the workers by path. Built-in scorers that are pure Python, fast and trusted may
run in the trainer process instead (``isolation="auto"``, see :class:`RewardRunner`).
"""

from __future__ import annotations

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
from vespo.tasks.procpool import CRASH, ERROR, OK, TIMEOUT, CallResult, ProcessPool

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


# --------------------------------------------------------------------------- math-verify

MATH_VERIFY_TIMEOUT_S = 5  # math-verify's own limit (seconds) where it may use signals
_GOLD_CACHE: dict[str, list] = {}
_GOLD_CACHE_MAX = 65536


def _math_verify_timeouts() -> int | None:
    """math-verify's own (signal.alarm) timeout, or None off the main thread (no signals there)."""
    if not (hasattr(signal, "alarm") and threading.current_thread() is threading.main_thread()):
        import math_verify.grader
        import math_verify.parser

        # the runner's worker timeout applies; silence math-verify's one-time warning about it
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


#: reward modules loaded from ``.py`` files: {module name in sys.modules: absolute path}
_USER_MODULES: dict[str, str] = {}


def user_module_paths() -> dict[str, str]:
    """Reward modules loaded from files so far (worker processes re-import them by path)."""
    return dict(_USER_MODULES)


def preload_user_modules(modules: dict[str, str]) -> None:
    """Import file modules under their recorded names, so pickles that refer to them load."""
    for name, path in modules.items():
        if name in sys.modules:
            continue
        file_spec = importlib.util.spec_from_file_location(name, path)
        if file_spec is None or file_spec.loader is None:
            raise ImportError(f"cannot load reward module {path!r}")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        file_spec.loader.exec_module(module)
        _USER_MODULES[name] = path


def normalize_reward_spec(spec: str) -> str:
    """``spec`` with a ``.py`` file part made absolute (so other processes find the same file)."""
    module_part, sep, attr_part = spec.rpartition(":")
    if sep and module_part.strip().endswith(".py"):
        return f"{Path(module_part.strip()).expanduser().resolve()}:{attr_part.strip()}"
    return spec


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
        _USER_MODULES[mod_name] = str(path.resolve())
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

ISOLATION_MODES: tuple[str, ...] = ("auto", "process", "inline")
DEFAULT_REWARD_WORKERS = 2


class _BadValue:
    """A scorer's return value that is not a number (sent back from a worker as type and repr)."""

    def __init__(self, value: Any):
        self.type_name = type(value).__name__
        self.text = repr(value)[:60]


def _portable(value: Any) -> Any:
    """A return value as something small and picklable: numbers as they are, else a _BadValue."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "__float__"):  # numpy / torch scalars
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    return _BadValue(value)


def _scorer_handler(target: Any) -> Callable[[str, Example], Any]:
    """Worker-side factory (see :class:`~vespo.tasks.procpool.ProcessPool`): the scoring call."""
    fn = target.score if _is_task(target) else target

    def handler(response: str, example: Example) -> Any:
        return _portable(fn(response, example))

    return handler


def _is_task(obj: Any) -> bool:
    return isinstance(obj, Task) or (hasattr(obj, "score") and callable(obj.score))


def _default_isolation(target: Any) -> str:
    """``inline`` for tasks that declare their scorer safe in-process, else ``process``."""
    return "inline" if _is_task(target) and getattr(target, "score_in_process", False) is True else "process"


class RewardRunner:
    """Scores batches with a task's scorer or a reward function, containing failures.

    The scorer runs in a pool of ``workers`` processes (reused across calls). A call that
    raises, exceeds ``timeout_s`` or kills its worker scores 0 and the run goes on (the worker
    is replaced). Returned values are sanitised: bools become 0/1, NaN and +-inf become 0
    (counted in ``reward/nonfinite``), finite values outside [0, 1] are clipped (counted in
    ``reward/clipped``), anything that is not a real number scores 0 and counts as an error.

    Args:
        task_or_fn: a :class:`Task` (its ``score`` is used) or a callable ``fn(response, example)``.
        timeout_s: time limit per response in seconds (None or <= 0: no limit; process mode only).
        max_logged_errors: how many error/timeout messages to log (the rest are only counted).
        workers: worker processes (default 2). Calls of one batch run on them concurrently.
        isolation: ``"process"`` (workers), ``"inline"`` (in this process: no time limit, no
            protection; for trusted code) or ``"auto"`` (default): inline for tasks whose
            ``score_in_process`` attribute is True (built-in scorers that are pure Python, fast
            and isolate anything dangerous themselves), workers for everything else, including
            every user reward function.
        start_timeout_s: how long a worker may take to start and unpickle the scorer.

    Raises:
        PoolStartError (from the first batch): the scorer cannot be rebuilt in a worker (for
            example a reward module that imports something only the trainer has).
    """

    def __init__(
        self,
        task_or_fn: Task | RewardFn,
        timeout_s: float | None = 5.0,
        max_logged_errors: int = 10,
        *,
        workers: int | None = None,
        isolation: str = "auto",
        start_timeout_s: float = 120.0,
    ):
        self._many: Callable[[list[str], list[Example]], list[Any]] | None = None
        if _is_task(task_or_fn):
            self.fn: RewardFn = task_or_fn.score  # type: ignore[union-attr]
            many = getattr(task_or_fn, "score_many", None)
            self._many = many if callable(many) else None
            self.name = getattr(task_or_fn, "name", type(task_or_fn).__name__)
        elif callable(task_or_fn):
            self.fn = task_or_fn
            self.name = getattr(task_or_fn, "__qualname__", None) or type(task_or_fn).__name__
        else:
            raise TypeError(f"RewardRunner needs a Task or a callable, got {type(task_or_fn).__name__}")
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATION_MODES)}, got {isolation!r}")
        self.isolation = _default_isolation(task_or_fn) if isolation == "auto" else isolation
        self.timeout_s = timeout_s
        self.max_logged_errors = max_logged_errors
        self.totals: dict[str, int] = {
            "calls": 0,
            "errors": 0,
            "timeouts": 0,
            "nonfinite": 0,
            "clipped": 0,
            "unparsed": 0,
        }
        self.recent_errors: deque[str] = deque(maxlen=20)
        self._logged = 0
        self._lock = threading.Lock()
        self.pool: ProcessPool | None = None
        if self.isolation == "process":
            self.pool = ProcessPool(
                "vespo.tasks.rewards:_scorer_handler",
                task_or_fn,
                workers=max(1, int(workers or DEFAULT_REWARD_WORKERS)),
                name=f"reward ({self.name})",
                start_timeout_s=start_timeout_s,
            )
            self.pool.start()  # workers warm up while the caller builds the model

    def close(self) -> None:
        """Stop the worker processes (idempotent; also done at interpreter exit)."""
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RewardRunner({self.name!r}, isolation={self.isolation!r}, timeout_s={self.timeout_s})"

    def _note(self, kind: str, message: str) -> None:
        self.recent_errors.append(f"{kind}: {message}")
        if self._logged < self.max_logged_errors:
            self._logged += 1
            suffix = " (further messages suppressed)" if self._logged == self.max_logged_errors else ""
            logger.warning("reward %s in %s: %s%s", kind, self.name, message, suffix)

    def _inline(self, response: str, example: Example) -> CallResult:
        start = time.perf_counter()
        try:
            value = _portable(self.fn(response, example))
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the run must go on
            return CallResult(ERROR, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
        return CallResult(OK, value, "", time.perf_counter() - start)

    def _run(self, responses: Sequence[str], examples: Sequence[Example]) -> list[CallResult]:
        if self.pool is None and self._many is not None and len(responses) > 1:
            # a batch scorer (code tasks: one sandbox batch) ; a failure falls back to one by one
            start = time.perf_counter()
            try:
                values = [_portable(v) for v in self._many(list(responses), list(examples))]
            except Exception as exc:  # noqa: BLE001
                self._note("error", f"batch scorer failed ({type(exc).__name__}: {exc}); scoring one by one")
            else:
                if len(values) == len(responses):
                    per = (time.perf_counter() - start) / len(values)
                    return [CallResult(OK, v, "", per) for v in values]
        if self.pool is None:
            return [self._inline(r, e) for r, e in zip(responses, examples, strict=True)]
        return self.pool.map(list(zip(responses, examples, strict=True)), timeout_s=self.timeout_s)

    def _outcome(self, result: CallResult, example: Example) -> tuple[float, str]:
        if result.status == TIMEOUT:
            self._note("timeout", f"exceeded {self.timeout_s}s on uid={example.uid!r} (worker replaced)")
            return 0.0, "timeout"
        if result.status == CRASH:
            self._note("error", f"{result.message} while scoring uid={example.uid!r} (worker replaced)")
            return 0.0, "error"
        if result.status == ERROR:
            self._note("error", f"{result.message} (uid={example.uid!r})")
            return 0.0, "error"
        value = result.value
        if value is None:  # the scorer could not read an answer in the response: 0, counted
            return 0.0, "unparsed"
        if isinstance(value, bool):
            return float(value), "ok"
        if isinstance(value, _BadValue):
            self._note("error", f"returned {value.type_name} {value.text}, not a number (uid={example.uid!r})")
            return 0.0, "error"
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

    def score_one(self, response: str, example: Example) -> tuple[float, str]:
        """Score one response; returns ``(score, outcome)`` with outcome in
        ``ok | error | timeout | nonfinite | clipped``."""
        with self._lock:
            return self._outcome(self._run([response], [example])[0], example)

    def score_batch(
        self, responses: Sequence[str], examples: Sequence[Example]
    ) -> tuple[list[float], dict[str, float]]:
        """Scores in [0, 1] for ``responses[i]`` answering ``examples[i]``, and batch statistics.

        Stats: ``reward/errors`` (raised, crashed its worker or returned a non-number),
        ``reward/unparsed`` (the scorer returned None: no answer it could read; scored 0),
        ``reward/timeouts``, ``reward/nonfinite``, ``reward/clipped`` (counts in this batch) and
        ``reward/scoring_time_s``.
        """
        if len(responses) != len(examples):
            raise ValueError(f"score_batch got {len(responses)} responses but {len(examples)} examples")
        counts = {"errors": 0, "timeouts": 0, "nonfinite": 0, "clipped": 0, "unparsed": 0}
        key = {
            "error": "errors",
            "timeout": "timeouts",
            "nonfinite": "nonfinite",
            "clipped": "clipped",
            "unparsed": "unparsed",
        }
        scores: list[float] = []
        start = time.perf_counter()
        with self._lock:
            results = self._run(responses, examples)
            for result, example in zip(results, examples, strict=True):
                score, outcome = self._outcome(result, example)
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
