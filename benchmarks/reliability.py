"""The slow half of the reliability suite (issue 12): real kills of real `vespo train` processes.

    python benchmarks/reliability.py [--out benchmarks/results/reliability.json] [--only NAME ...]

Kill points: SIGKILL in the warm-up, SIGKILL at three points of RL, SIGKILL while a checkpoint is
being written (the write is slowed down so that the kill lands inside it), SIGTERM in RL, a
SIGKILLed async trainer, a SIGKILLed async rollout worker; then a damaged latest checkpoint and
hostile reward functions (os._exit, segfault, hang) driven through the config. Every trial resumes
with `vespo train --resume RUN` and checks the metric rows of the finished run: every step once, in
order. "steps redone" counts the steps logged before a kill that the resumed run had to train
again (work lost); "steps missing" counts steps absent from the final run (must be 0).

Prints one table and writes the figures as JSON. Fast cases live in tests/train/test_reliability.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from tiny_run import TINY_RUN  # noqa: E402

BASE = [*TINY_RUN, "logging.progress=false", "run.threads=1", "warmup.steps=0", "eval.at_start=false"]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
}

# a trainer whose checkpoint writes take 3 s (a slow disk): the kill lands inside one
SLOW_CHECKPOINT = textwrap.dedent("""
    import sys, time
    import vespo.train.checkpoint as ck
    real = ck._fsync_tree
    def slow(path):
        time.sleep(3.0)
        real(path)
    ck._fsync_tree = slow
    from vespo.cli import main
    raise SystemExit(main(sys.argv[1:]))
""")

HOSTILE = textwrap.dedent("""
    import ctypes, os, time
    calls = 0
    def exits(response, example):
        global calls
        calls += 1
        if calls == 3:
            os._exit(3)
        return float(len(response) % 2)
    def segfaults(response, example):
        global calls
        calls += 1
        if calls == 3:
            ctypes.string_at(0)
        return float(len(response) % 2)
    def hangs(response, example):
        global calls
        calls += 1
        if calls == 3:
            time.sleep(3600)
        return float(len(response) % 2)
""")


def vespo(*args: str, script: str | None = None) -> subprocess.Popen:
    cmd = (
        [sys.executable, "-c", script, "train", *args]
        if script
        else [sys.executable, "-m", "vespo.cli", "train", *args]
    )
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return -999, err + "\n(timed out)"
    return proc.returncode, err


def rows(run: Path, key: str = "stale/index") -> list[dict]:
    path = run / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if key in row:
                out.append(row)
    return out


def steps(run: Path) -> list[int]:
    return [r["step"] for r in rows(run)]


def checkpoint_step(run: Path) -> int:
    from vespo.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run)
    return json.loads((ckpt / "state.json").read_text())["step"] if ckpt else 0


def wait_for(pred, timeout: float = 300, poll: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(poll)
    return False


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)  # the trainer and the processes it started (reward pool, local Ray)
    proc.wait()


def resume(run: Path, *extra: str) -> tuple[int, str]:
    return finish(vespo("--resume", str(run), *extra))


def result(name: str, held: bool, kills: int, redone: int, missing: int, t0: float, note: str = "") -> dict:
    return {
        "name": name,
        "held": bool(held),
        "kills": kills,
        "kills_survived": kills if held else 0,
        "steps_redone": redone,
        "steps_missing": missing,
        "seconds": round(time.time() - t0, 1),
        "note": note,
    }


def _missing(run: Path, total: int) -> int:
    got = steps(run)
    return len(set(range(1, total + 1)) - set(got)) + (len(got) - len(set(got)))


# ----------------------------------------------------------------------------------- trials
def trial_warmup_kill(tmp: Path) -> dict:
    t0, run = time.time(), tmp / "warm"
    proc = vespo(
        *BASE,
        f"run.out_dir={run}",
        "warmup.steps=200",
        "warmup.batch_size=8",
        "warmup.checkpoint_every=25",
        "run.total_steps=2",
        "algorithm.staleness=1",
    )
    log = run / "warmup.jsonl"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 90)
    done_at_kill = len(log.read_text().splitlines())
    kill_group(proc)
    code, err = resume(run)
    lines = [json.loads(x)["warmup/step"] for x in log.read_text().splitlines()]
    held = code == 0 and lines == list(range(1, 201)) and steps(run) == [1, 2]
    restored = (done_at_kill // 25) * 25
    return result(
        "SIGKILL in the warm-up",
        held,
        1,
        done_at_kill - restored,
        _missing(run, 2),
        t0,
        f"warm-up steps redone: {done_at_kill - restored} of {done_at_kill}; exit {code} {err.strip()[-120:]}",
    )


def trial_rl_kills(tmp: Path) -> dict:
    t0, run, total = time.time(), tmp / "rl", 24
    args = [*BASE, f"run.out_dir={run}", f"run.total_steps={total}", "checkpoint.every=3", "algorithm.staleness=2"]
    redone, kills, ok = 0, 0, True
    for target in (4, 11, 17):  # kill after this many logged steps, at different phases of N and checkpoints
        proc = vespo(*args) if kills == 0 else vespo("--resume", str(run))
        if not wait_for(lambda t=target, p=proc: len(steps(run)) >= t or p.poll() is not None):
            ok = False
        if proc.poll() is not None:
            ok = False
            break
        logged = max(steps(run) or [0])
        kill_group(proc)
        kills += 1
        redone += logged - checkpoint_step(run)
    code, err = resume(run)
    held = ok and code == 0 and steps(run) == list(range(1, total + 1))
    return result("SIGKILL x3 during RL", held, kills, redone, _missing(run, total), t0, f"exit {code}")


def trial_checkpoint_write_kill(tmp: Path) -> dict:
    t0, run, total = time.time(), tmp / "ckwrite", 8
    proc = vespo(
        *BASE,
        f"run.out_dir={run}",
        f"run.total_steps={total}",
        "checkpoint.every=2",
        "algorithm.staleness=1",
        script=SLOW_CHECKPOINT,
    )
    root = run / "checkpoints"
    # the second RL checkpoint (step 2) is being written: its temporary directory exists
    inside = wait_for(lambda: root.exists() and any(p.name.startswith(".tmp_step_000002") for p in root.iterdir()))
    time.sleep(1.0)
    kill_group(proc)
    leftover = root.exists() and any(p.name.startswith(".tmp_step") for p in root.iterdir())
    logged = max(steps(run) or [0])
    before = checkpoint_step(run)
    code, err = resume(run)
    held = inside and leftover and code == 0 and steps(run) == list(range(1, total + 1))
    return result(
        "SIGKILL during a checkpoint write",
        held,
        1,
        logged - before,
        _missing(run, total),
        t0,
        f"killed inside the write: {inside and leftover}; resumed from step {before}; exit {code}",
    )


def trial_sigterm(tmp: Path) -> dict:
    t0, run, total = time.time(), tmp / "term", 12
    proc = vespo(
        *BASE, f"run.out_dir={run}", f"run.total_steps={total}", "checkpoint.every=100", "algorithm.staleness=2"
    )
    wait_for(lambda: len(steps(run)) >= 3)
    os.kill(proc.pid, signal.SIGTERM)
    code_term, _ = finish(proc, 120)
    logged, saved = max(steps(run) or [0]), checkpoint_step(run)
    code, err = resume(run)
    held = code_term == 130 and saved == logged and code == 0 and steps(run) == list(range(1, total + 1))
    return result(
        "SIGTERM during RL",
        held,
        1,
        logged - saved,
        _missing(run, total),
        t0,
        f"exit on SIGTERM {code_term}, checkpoint at the last logged step: {saved == logged}",
    )


ASYNC = [
    "run.mode=async",
    "async.num_workers=1",
    "async.sync_every=1",
    "async.queue_size=4",
    "async.worker_timeout_s=60",
]


def _ray_leftovers(run: Path) -> int:
    from vespo.rollout.ray_utils import process_alive

    record = run / "ray_processes.json"
    if not record.exists():
        return 0
    data = json.loads(record.read_text())
    pids = [int(p) for p in (data.get("pids") or data.get("processes") or {})]
    return sum(process_alive(p) for p in pids)


def trial_async_trainer_kill(tmp: Path) -> dict:
    t0, run, total = time.time(), tmp / "async_trainer", 10
    proc = vespo(*BASE, *ASYNC, f"run.out_dir={run}", f"run.total_steps={total}", "checkpoint.every=2")
    wait_for(lambda: len(steps(run)) >= 5 or proc.poll() is not None, timeout=400)
    logged = max(steps(run) or [0])
    os.kill(proc.pid, signal.SIGKILL)  # the trainer only: its Ray processes are left behind, as after a crash
    proc.wait()
    saved = checkpoint_step(run)
    code, err = resume(run)
    held = logged >= 5 and code == 0 and steps(run) == list(range(1, total + 1))
    return result(
        "SIGKILL of the async trainer",
        held,
        1,
        logged - saved,
        _missing(run, total),
        t0,
        f"exit {code}; Ray processes alive afterwards: {_ray_leftovers(run)} {err.strip()[-200:]}",
    )


def _rollout_worker_pids() -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "RolloutWorker" in cmd:
                out.append(int(pid))
    return out


def trial_async_worker_kill(tmp: Path) -> dict:
    t0, run, total = time.time(), tmp / "async_worker", 10
    before = set(_rollout_worker_pids())
    proc = vespo(*BASE, *ASYNC, f"run.out_dir={run}", f"run.total_steps={total}", "checkpoint.every=5")
    wait_for(lambda: len(steps(run)) >= 3 or proc.poll() is not None, timeout=400)
    mine = [p for p in _rollout_worker_pids() if p not in before]
    for pid in mine:  # rollout workers of this run only
        os.kill(pid, signal.SIGKILL)
    code, err = finish(proc)
    held = bool(mine) and code == 0 and steps(run) == list(range(1, total + 1))
    return result(
        "SIGKILL of an async rollout worker",
        held,
        len(mine),
        0,
        _missing(run, total),
        t0,
        f"workers killed: {len(mine)}; run went on and exited {code} {err.strip()[-200:]}",
    )


def trial_damaged_checkpoint(tmp: Path) -> dict:
    t0, run, total = time.time(), tmp / "damaged", 6
    code, _ = finish(
        vespo(*BASE, f"run.out_dir={run}", "run.total_steps=4", "checkpoint.every=2", "algorithm.staleness=1")
    )
    latest = run / "checkpoints" / "step_000004"
    for name in ("model.safetensors", "optimizer.safetensors"):
        data = bytearray((latest / name).read_bytes())
        data[len(data) // 2] ^= 0xFF  # a flipped byte: same size, only the checksum sees it
        (latest / name).write_bytes(bytes(data))
    code2, err = resume(run, f"run.total_steps={total}")
    warned = "resuming from step_000002" in err
    held = code == 0 and code2 == 0 and warned and steps(run) == list(range(1, total + 1))
    return result(
        "damaged latest checkpoint (flipped byte)",
        held,
        0,
        2,
        _missing(run, total),
        t0,
        f"one-line fallback warning: {warned}",
    )


def _hostile(tmp: Path, fn: str) -> dict:
    t0, run = time.time(), tmp / f"reward_{fn}"
    (tmp / "hostile_rewards.py").write_text(HOSTILE)
    env_path = f"{tmp}{os.pathsep}{ENV['PYTHONPATH']}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vespo.cli",
            "train",
            *BASE,
            f"run.out_dir={run}",
            "run.total_steps=2",
            "algorithm.staleness=1",
            f"task.reward_fn=hostile_rewards:{fn}",
            "task.reward_timeout_s=2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, "PYTHONPATH": env_path},
        start_new_session=True,
    )
    code, err = finish(proc, 300)
    held = code == 0 and steps(run) == [1, 2]
    last = (err.strip().splitlines() or [""])[-1][:160]
    return result(
        f"reward function that {fn.replace('s', '', 1) if fn == 'exits' else fn}",
        held,
        0,
        0,
        0,
        t0,
        f"exit {code}; stderr: {last or '(nothing)'}",
    )


TRIALS = {
    "warmup": trial_warmup_kill,
    "rl": trial_rl_kills,
    "checkpoint_write": trial_checkpoint_write_kill,
    "sigterm": trial_sigterm,
    "async_trainer": trial_async_trainer_kill,
    "async_worker": trial_async_worker_kill,
    "damaged": trial_damaged_checkpoint,
    "reward_exit": lambda tmp: _hostile(tmp, "exits"),
    "reward_segfault": lambda tmp: _hostile(tmp, "segfaults"),
    "reward_hang": lambda tmp: _hostile(tmp, "hangs"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reliability.json"))
    parser.add_argument("--only", nargs="*", choices=sorted(TRIALS), help="run only these trials")
    args = parser.parse_args()
    names = args.only or list(TRIALS)
    t_all = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="vespo-reliability-") as tmp:
        for name in names:
            try:
                res = TRIALS[name](Path(tmp))
            except Exception as exc:  # noqa: BLE001 - a trial that breaks is a case not held
                res = result(name, False, 0, 0, 0, time.time(), f"trial failed: {type(exc).__name__}: {exc}")
            results.append(res)
            mark = "held" if res["held"] else "FAILED"
            print(
                f"{mark:6s} {res['name']:42s} kills {res['kills_survived']}/{res['kills']}  steps redone "
                f"{res['steps_redone']:3d}  missing {res['steps_missing']}  {res['seconds']:6.1f}s  {res['note']}",
                flush=True,
            )
    total = time.time() - t_all
    summary = {
        "cases": len(results),
        "held": sum(r["held"] for r in results),
        "kills": sum(r["kills"] for r in results),
        "kills_survived": sum(r["kills_survived"] for r in results),
        "steps_redone": sum(r["steps_redone"] for r in results),
        "steps_missing": sum(r["steps_missing"] for r in results),
        "seconds": round(total, 1),
        "cores": os.cpu_count(),
    }
    print(
        f"\n{summary['held']}/{summary['cases']} cases held; kills survived {summary['kills_survived']}/"
        f"{summary['kills']}; steps missing {summary['steps_missing']}, redone {summary['steps_redone']}; "
        f"{total:.0f} s on {os.cpu_count()} cores"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "trials": results}, indent=2) + "\n")
    return 0 if summary["held"] == summary["cases"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
