"""Tests of answer extraction, math-verify scoring, user reward functions and the reward runner."""

from __future__ import annotations

import signal
import sys
import threading
import time

import pytest

from vespo.tasks import (
    Example,
    RewardRunner,
    Task,
    call_with_timeout,
    extract_answer,
    extract_last_boxed,
    load_reward_function,
    math_verify_equal,
    math_verify_score,
)
from vespo.tasks.rewards import external_timer_active

EX = Example(prompt="q", ground_truth="\\frac{1}{2}", data_source="test", uid="u0")
TIMEOUT = 0.3

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


# --------------------------------------------------------------------------- runner


def _loop(response: str, example: Example) -> float:
    while True:
        pass


def _sleep(response: str, example: Example) -> float:
    time.sleep(30)
    return 1.0


def _swallow_once(response: str, example: Example) -> float:
    try:
        while True:
            pass
    except BaseException:  # noqa: BLE001 - a badly written user function
        pass
    return 1.0


def _raise(response: str, example: Example) -> float:
    raise RuntimeError("broken reward")


def _by_response(response: str, example: Example):
    return {"nan": float("nan"), "inf": float("inf"), "big": 3.0, "neg": -1.0, "true": True,
            "str": "high", "none": None, "ok": 0.75}[response]


def _math_then_loop(response: str, example: Example) -> float:
    assert math_verify_equal("0.5", example.ground_truth)  # must not disarm the runner's timer
    while True:
        pass


def test_runner_contains_errors_and_timeouts() -> None:
    fns = {"ok": lambda r, e: 1.0, "raise": _raise, "loop": _loop, "sleep": _sleep, "math_loop": _math_then_loop}

    def dispatch(response: str, example: Example) -> float:
        return fns[response](response, example)

    runner = RewardRunner(dispatch, timeout_s=TIMEOUT)
    responses = ["ok", "raise", "loop", "ok", "sleep", "math_loop"]
    start = time.monotonic()
    scores, stats = runner.score_batch(responses, [EX] * len(responses))
    elapsed = time.monotonic() - start
    assert scores == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert stats["reward/errors"] == 1 and stats["reward/timeouts"] == 3
    assert elapsed < 3 * TIMEOUT + 1.0
    assert runner.totals["timeouts"] == 3 and runner.totals["calls"] == 6
    assert any("broken reward" in m for m in runner.recent_errors)
    assert not external_timer_active()
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_runner_swallowed_timeout_still_counts() -> None:
    # the function catches the timeout and returns 1.0: the deadline still passed, so it scores 0
    runner = RewardRunner(_swallow_once, timeout_s=TIMEOUT)
    start = time.monotonic()
    scores, stats = runner.score_batch(["x"], [EX])
    assert scores == [0.0] and stats["reward/timeouts"] == 1
    assert time.monotonic() - start < TIMEOUT + 1.0


def test_runner_sanitises_return_values() -> None:
    runner = RewardRunner(_by_response, timeout_s=TIMEOUT)
    responses = ["nan", "inf", "big", "neg", "true", "str", "none", "ok"]
    scores, stats = runner.score_batch(responses, [EX] * len(responses))
    assert scores == [0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.75]
    assert stats["reward/nonfinite"] == 2
    assert stats["reward/clipped"] == 2
    assert stats["reward/errors"] == 2
    assert stats["reward/timeouts"] == 0


def test_runner_off_main_thread() -> None:
    out: dict = {}

    def work() -> None:
        runner = RewardRunner(lambda r, e: _loop(r, e) if r == "loop" else math_verify_score(r, e.ground_truth),
                              timeout_s=TIMEOUT)
        start = time.monotonic()
        out["result"] = runner.score_batch(["\\boxed{0.5}", "loop", "\\boxed{3}"], [EX] * 3)
        out["elapsed"] = time.monotonic() - start

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(10)
    scores, stats = out["result"]
    assert scores == [1.0, 0.0, 0.0]
    assert stats["reward/timeouts"] == 1 and stats["reward/errors"] == 0
    assert out["elapsed"] < TIMEOUT + 2.0
    # the injected exception stopped the looping helper thread
    deadline = time.monotonic() + 2.0
    while any(t.name == "vespo-reward" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(t.name == "vespo-reward" for t in threading.enumerate())


def test_runner_with_task_and_length_check() -> None:
    class Half(Task):
        name = "half"

        def train_examples(self, n, seed=0):
            return [EX] * n

        def eval_examples(self, n, seed=0):
            return [EX] * n

        def score(self, response, example):
            return math_verify_score(response, example.ground_truth)

    runner = RewardRunner(Half(), timeout_s=TIMEOUT)
    assert runner.score_batch(["\\boxed{1/2}", "\\boxed{2}"], [EX, EX])[0] == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 responses but 1 examples"):
        runner.score_batch(["a", "b"], [EX])
    with pytest.raises(TypeError):
        RewardRunner(42)  # type: ignore[arg-type]


def test_runner_restores_existing_alarm() -> None:
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        RewardRunner(_loop, timeout_s=0.1).score_batch(["x"], [EX])
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0
        assert not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_call_with_timeout_statuses() -> None:
    assert call_with_timeout(lambda: 5, (), 1.0) == ("ok", 5)
    status, exc = call_with_timeout(lambda: 1 / 0, (), 1.0)
    assert status == "error" and isinstance(exc, ZeroDivisionError)
    assert call_with_timeout(lambda: 7, (), None) == ("ok", 7)
