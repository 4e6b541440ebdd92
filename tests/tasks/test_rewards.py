"""Tests of answer extraction, math-verify scoring, user reward functions and the reward runner."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest

from vespo.tasks import (
    Example,
    RewardRunner,
    Task,
    build_task,
    extract_answer,
    extract_last_boxed,
    load_reward_function,
    math_verify_equal,
    math_verify_score,
    write_verl_jsonl,
)
from vespo.tasks.procpool import PoolStartError, ProcessPool

EX = Example(prompt="q", ground_truth="\\frac{1}{2}", data_source="test", uid="u0")
TIMEOUT = 0.5

# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{2\\sqrt{2}}", "2\\sqrt{2}"),
        ("\\boxed{a} and finally \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$", "5"),
        ("\\boxed{\\frac{1}{2}", None),  # truncated
        ("no box here", None),
        ("\\boxed{}", ""),
    ],
)
def test_extract_last_boxed(text: str, expected: str | None) -> None:
    assert extract_last_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12+7=19,19+30=49. Answer: 49", "49"),
        ("Answer: 1 ... Answer: -4.", "-4"),
        ("**Final Answer:** $12$", "12"),
        ("Answer:\n\n 3\nmore text", "3"),
        ("Answer: 49\nThanks!", "49"),
        ("the result is \\boxed{8}", "8"),
        ("Answer: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("nothing", None),
        ("Answer:", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_multiline() -> None:
    assert extract_answer("steps\nAnswer:\n1 2\n3 4\n", multiline=True) == "1 2\n3 4"
    assert extract_answer("steps\nAnswer:\n1 2\n3 4\n") == "1 2"


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("0.5", "\\frac{1}{2}", True),
        ("\\frac{1}{2}", "0.5", True),
        ("\\sqrt{8}", "2\\sqrt{2}", True),
        ("2", "2\\sqrt{2}", False),  # a bare parse of the gold would read "2"
        ("\\frac{3}{4}", "$\\frac{3}{4}$", True),
        ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("35", "34", False),
        ("", "34", False),
    ],
)
def test_math_verify_equal(pred: str, gold: str, ok: bool) -> None:
    assert math_verify_equal(pred, gold) is ok


def test_math_verify_score() -> None:
    assert math_verify_score("thus \\boxed{0.5}", "\\frac{1}{2}") == 1.0
    assert math_verify_score("0.5", "\\frac{1}{2}") == 0.0


# --------------------------------------------------------------------------- user reward functions

MODULE_SRC = """
CONST = 3

def exact(response, example):
    return float(response.strip() == example.ground_truth)

def no_args():
    return 1.0

class Scorer:
    @staticmethod
    def score(response, example):
        return 0.5
"""


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    name = "vespo_test_reward_mod"
    (tmp_path / f"{name}.py").write_text(MODULE_SRC)
    (tmp_path / "vespo_test_broken_mod.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, tmp_path
    for mod in (name, "vespo_test_broken_mod"):
        sys.modules.pop(mod, None)


def test_load_reward_function(reward_module) -> None:
    name, tmp_path = reward_module
    fn = load_reward_function(f"{name}:exact")
    assert fn("3", Example("q", "3", "d")) == 1.0
    assert load_reward_function(f"{name}:Scorer.score")("x", EX) == 0.5
    from_file = load_reward_function(f"{tmp_path / (name + '.py')}:exact")
    assert from_file(" 7 ", Example("q", "7", "d")) == 1.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "must look like 'module:function'"),
        ("mod:", "must look like"),
        (":fn", "must look like"),
        ("mod:not-an-identifier", "must look like"),
        ("no_such_module_xyz_123:fn", "no module named 'no_such_module_xyz_123'"),
        ("vespo_test_broken_mod:fn", "importing 'vespo_test_broken_mod' failed"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:CONST", "not callable"),
        ("{mod}:no_args", "must accept (response, example)"),
        ("/nonexistent/dir/rewards.py:fn", "does not exist"),
    ],
)
def test_load_reward_function_errors(reward_module, spec: str, message: str) -> None:
    name, _ = reward_module
    with pytest.raises(ValueError) as info:
        load_reward_function(spec.format(mod=name))
    assert message in str(info.value)


# --------------------------------------------------------------------------- runner (worker processes)


def _hostile(response: str, example: Example) -> float:
    """A reward function that misbehaves in the way its response names."""
    if response == "exit":
        os._exit(3)
    if response == "segfault":
        import ctypes

        ctypes.string_at(0)
    if response == "loop":
        while True:
            pass
    if response == "sleep":
        time.sleep(30)
    if response == "swallow":
        while True:
            try:
                while True:
                    pass
            except BaseException:  # noqa: BLE001 - a badly written reward swallows everything
                pass
    if response == "raise":
        raise RuntimeError("broken reward")
    if response == "sysexit":
        sys.exit(0)
    if response == "nan":
        return float("nan")
    return float(response == example.ground_truth)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


GOLD = Example(prompt="q", ground_truth="7", data_source="test", uid="g")


def test_runner_contains_crashes_hangs_and_errors() -> None:
    with RewardRunner(_hostile, timeout_s=TIMEOUT, workers=2) as runner:
        assert runner.isolation == "process"
        responses = ["7", "exit", "segfault", "loop", "raise", "nan", "sleep", "swallow", "sysexit", "7", "8"]
        start = time.monotonic()
        scores, stats = runner.score_batch(responses, [GOLD] * len(responses))
        elapsed = time.monotonic() - start
        assert scores == [1.0] + [0.0] * 8 + [1.0, 0.0]
        # os._exit, the segfault, the exception and sys.exit are errors; three hangs are timeouts
        assert stats["reward/errors"] == 4 and stats["reward/timeouts"] == 3 and stats["reward/nonfinite"] == 1
        # two workers: the hangs overlap; replacing a killed worker starts a Python process (~1 s quiet,
        # ~5 s on a loaded 2-core machine), so the bound allows for that but not for an unbounded hang
        assert elapsed < 3 * TIMEOUT + 30.0
        messages = "\n".join(runner.recent_errors)
        assert "exited with code 3" in messages and "SIGSEGV" in messages and "broken reward" in messages
        assert runner.pool is not None and runner.pool.replaced == 5  # exit, segfault, three hangs
        # the pool goes on: later batches are scored correctly, by the same (replaced) workers
        pids = runner.pool.pids
        for _ in range(3):
            scores, stats = runner.score_batch(["7", "6", "7"], [GOLD] * 3)
            assert scores == [1.0, 0.0, 1.0] and stats["reward/errors"] == 0 and stats["reward/timeouts"] == 0
        assert runner.pool.pids == pids
        assert runner.totals["calls"] == len(responses) + 9 and runner.totals["timeouts"] == 3
        assert runner.score_one("exit", GOLD) == (0.0, "error")
        assert runner.score_one("7", GOLD) == (1.0, "ok")
    assert _wait_gone(pids)


def _by_response(response: str, example: Example):
    import numpy as np

    return {
        "nan": float("nan"),
        "inf": float("inf"),
        "big": 3.0,
        "neg": -1.0,
        "true": True,
        "str": "high",
        "none": None,
        "ok": 0.75,
        "np": np.float32(0.5),
        "obj": object(),
    }[response]


def test_runner_sanitises_return_values() -> None:
    with RewardRunner(_by_response, timeout_s=5.0, workers=1) as runner:
        responses = ["nan", "inf", "big", "neg", "true", "str", "none", "ok", "np", "obj"]
        scores, stats = runner.score_batch(responses, [EX] * len(responses))
    assert scores == [0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.75, 0.5, 0.0]
    assert stats["reward/nonfinite"] == 2 and stats["reward/clipped"] == 2
    # None means "no answer could be read": a 0 counted as unparsed, not as an error
    assert stats["reward/errors"] == 2 and stats["reward/unparsed"] == 1 and stats["reward/timeouts"] == 0


def _main_thread_math(response: str, example: Example) -> float:
    # math-verify arms signal.alarm, which only works in a main thread: the worker calls us there
    assert threading.current_thread() is threading.main_thread()
    return math_verify_score(response, example.ground_truth)


def test_runner_off_main_thread_and_math_verify() -> None:
    out: dict = {}

    def work() -> None:
        with RewardRunner(_main_thread_math, timeout_s=5.0, workers=1) as runner:
            out["result"] = runner.score_batch(["\\boxed{0.5}", "\\boxed{3}", "\\boxed{1/2}"], [EX] * 3)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    scores, stats = out["result"]
    assert scores == [1.0, 0.0, 1.0] and stats["reward/errors"] == 0


def test_runner_with_task_and_length_check() -> None:
    class Half(Task):
        name = "half"

        def train_examples(self, n, seed=0):
            return [EX] * n

        def eval_examples(self, n, seed=0):
            return [EX] * n

        def score(self, response, example):
            return math_verify_score(response, example.ground_truth)

    with RewardRunner(Half(), timeout_s=5.0, workers=1) as runner:  # a local class: cloudpickled
        assert runner.isolation == "process"
        assert runner.score_batch(["\\boxed{1/2}", "\\boxed{2}"], [EX, EX])[0] == [1.0, 0.0]
        with pytest.raises(ValueError, match="2 responses but 1 examples"):
            runner.score_batch(["a", "b"], [EX])
    with pytest.raises(TypeError):
        RewardRunner(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="isolation must be one of"):
        RewardRunner(_hostile, isolation="thread")


def test_isolation_choice() -> None:
    rg = build_task({"kind": "reasoning_gym", "name": "chain_sum"})
    runner = RewardRunner(rg)
    assert runner.isolation == "inline" and runner.pool is None  # trusted, ~10 us per call
    ex = rg.train_examples(2, 0)
    assert runner.score_batch([rg.demonstration(e) for e in ex], ex)[0] == [1.0, 1.0]
    forced = RewardRunner(rg, isolation="process", workers=1)
    assert forced.isolation == "process" and forced.score_batch([rg.demonstration(ex[0])], ex[:1])[0] == [1.0]
    forced.close()
    assert RewardRunner(_hostile, isolation="inline").score_batch(["7", "raise"], [GOLD] * 2)[0] == [1.0, 0.0]


def test_reward_from_py_file_runs_in_workers(tmp_path) -> None:
    reward_file = tmp_path / "file_reward.py"
    reward_file.write_text(
        "import os\n"
        "def longer(response, example):\n"
        "    if response == 'crash':\n"
        "        os._exit(9)\n"
        "    return float(len(response) > 3)\n"
    )
    data = write_verl_jsonl(
        tmp_path / "rows.jsonl", [{"data_source": "d", "prompt": "q", "reward_model": {"ground_truth": "1"}}]
    )
    task = build_task(
        {
            "kind": "verl_file",
            "train_path": str(data),
            "eval_path": str(data),
            "overlap": "ignore",
            "reward_fn": f"{reward_file}:longer",
        }
    )
    ex = task.train_examples(1, 0)[0]
    with RewardRunner(task, timeout_s=5.0, workers=1) as runner:
        assert runner.isolation == "process"  # a user reward: never in the trainer process
        scores, stats = runner.score_batch(["abcd", "crash", "ab", "abcde"], [ex] * 4)
    assert scores == [1.0, 0.0, 0.0, 1.0] and stats["reward/errors"] == 1
    # the task pickles as its spec, so a fresh process (a Ray actor) re-imports the file
    child = (
        "import pickle, sys\n"
        "task = pickle.loads(sys.stdin.buffer.read())\n"
        "ex = task.train_examples(1, 0)[0]\n"
        "print(task.score('abcd', ex), task.score('ab', ex))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child],
        input=pickle.dumps(task),
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split() == ["1.0", "0.0"]


class _Unloadable:
    """Pickles fine here, cannot be rebuilt in a worker."""

    def __reduce__(self):
        return (_explode, ())

    def __call__(self, response, example):  # pragma: no cover - never rebuilt
        return 1.0


def _explode():
    raise ImportError("needs a package only the trainer has")


def test_worker_that_cannot_build_the_scorer_is_a_clear_error() -> None:
    runner = RewardRunner(_Unloadable(), timeout_s=5.0, workers=1)
    with pytest.raises(PoolStartError, match="needs a package only the trainer has"):
        runner.score_batch(["x"], [EX])
    runner.close()


def test_runner_leaves_the_callers_alarm_alone() -> None:
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
    try:
        signal.setitimer(signal.ITIMER_REAL, 300.0)
        start = time.monotonic()
        with RewardRunner(_hostile, timeout_s=0.2, workers=1) as runner:
            assert runner.score_batch(["loop"], [GOLD])[1]["reward/timeouts"] == 1
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        # the caller's timer kept running untouched: neither re-armed nor cancelled (however slow the
        # machine was: a busy CI box took more than 5 s to start and replace the worker)
        expected = 300.0 - (time.monotonic() - start)
        assert abs(remaining - expected) < 0.1 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_pool_closes_at_interpreter_exit() -> None:
    script = (
        "from vespo.tasks import RewardRunner, Example\n"
        "r = RewardRunner(lambda resp, ex: 1.0, workers=2)\n"
        "print(*r.pool.pids)\n"
        "assert r.score_batch(['a'], [Example('q', '1', 'd')])[0] == [1.0]\n"
    )  # no close(): atexit must stop the workers
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2 and _wait_gone(pids)


def test_process_pool_map_order_and_close() -> None:
    pool = ProcessPool("vespo.tasks.rewards:_scorer_handler", lambda r, e: len(r) / 10, workers=2)
    results = pool.map([("a" * k, EX) for k in range(8)], timeout_s=5.0)
    assert [r.value for r in results] == [k / 10 for k in range(8)] and all(r.status == "ok" for r in results)
    pids = pool.pids
    pool.close()
    pool.close()
    assert _wait_gone(pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.map([("a", EX)])
