"""Sandboxed code evaluation against an in-process ``exec``, as ratios measured in one run.

    python benchmarks/sandbox.py                 # 200 solutions, 10 tests each, 3 rounds
    python benchmarks/sandbox.py --quick         # 40 solutions, 1 round (smoke test)

The solutions are the reference solutions of ``code_functions`` problems (all pass), so every
evaluation runs its full test list. Measured in the same process, alternating per round:

- ``exec``: compile + ``exec`` the code and call the function on each test input in this
  process, with the same output comparison (no isolation at all: the baseline);
- ``sandbox w=1`` / ``sandbox w=2``: :class:`vespo.tasks.sandbox.Sandbox` with one or two
  supervisor processes (one jailed process per evaluation: namespaces, chroot into a tmpfs,
  rlimits, setuid), through ``run_many`` as the code reward calls it.

Also measured: the reward worker pool's overhead per call (``RewardRunner`` with a trivial
reward function in worker processes against the same function inline). Medians over rounds;
evaluations/s and the ratio to ``exec`` are printed, and ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from vespo.tasks import CodeTask, Example, RewardRunner  # noqa: E402
from vespo.tasks.code_tasks import code_tests_of, extract_code  # noqa: E402
from vespo.tasks.sandbox import Sandbox, SandboxLimits, capabilities, outputs_match  # noqa: E402


def in_process(code: str, example: Example) -> bool:
    """The unprotected baseline: exec and call in this process."""
    tests = code_tests_of(example)
    namespace: dict = {}
    exec(compile(code, "<solution>", "exec"), namespace)  # noqa: S102 - trusted reference code
    fn = namespace[tests.fn_name]
    return all(
        outputs_match(json.loads(json.dumps(fn(*json.loads(json.dumps(a))))), want, "call")
        for a, want in zip(tests.inputs, tests.outputs)
    )


def trivial_reward(response: str, example: Example) -> float:
    return float(response == example.ground_truth)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--solutions", type=int, default=200)
    parser.add_argument("--tests", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.solutions, args.rounds = 40, 1

    task = CodeTask(params={"num_tests": args.tests})
    examples = task.train_examples(args.solutions, seed=0)
    codes = [extract_code(task.demonstration(ex) or "") for ex in examples]
    limits = SandboxLimits()
    boxes = {w: Sandbox(limits, workers=w) for w in (1, 2)}
    for box in boxes.values():  # start-up (interpreters, preloading) is not what we measure
        box.run_many(list(zip(codes[:4], [code_tests_of(e) for e in examples[:4]])))
    mode = capabilities(boxes[1])

    rates: dict[str, list[float]] = {"exec": [], "sandbox w=1": [], "sandbox w=2": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        ok = sum(in_process(c, e) for c, e in zip(codes, examples))
        rates["exec"].append(len(codes) / (time.perf_counter() - start))
        assert ok == len(codes), f"{len(codes) - ok} reference solutions failed in-process"
        for w, box in boxes.items():
            jobs = [(c, code_tests_of(e)) for c, e in zip(codes, examples)]
            start = time.perf_counter()
            results = box.run_many(jobs)
            rates[f"sandbox w={w}"].append(len(jobs) / (time.perf_counter() - start))
            failed = [r for r in results if not r.all_passed]
            assert not failed, f"{len(failed)} reference solutions failed in the sandbox: {failed[0]}"

    # the reward pool's overhead per call
    n_calls = 400
    gold = [Example("q", str(i % 3), "bench", uid=str(i)) for i in range(n_calls)]
    responses = [str(i % 2) for i in range(n_calls)]
    per_call: dict[str, list[float]] = {"inline": [], "process w=1": [], "process w=2": []}
    runners = {
        "inline": RewardRunner(trivial_reward, isolation="inline"),
        "process w=1": RewardRunner(trivial_reward, isolation="process", workers=1),
        "process w=2": RewardRunner(trivial_reward, isolation="process", workers=2),
    }
    for runner in runners.values():
        runner.score_batch(responses[:8], gold[:8])  # workers started and warm
    for _ in range(args.rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.score_batch(responses, gold)
            per_call[name].append((time.perf_counter() - start) / n_calls * 1e6)
    for runner in runners.values():
        runner.close()
    for box in boxes.values():
        box.close()

    exec_rate = statistics.median(rates["exec"])
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; sandbox: {mode}")
    print(f"{args.solutions} solutions x {args.tests} tests, {args.rounds} round(s), medians")
    print(f"{'':14s} {'evaluations/s':>14s} {'vs exec':>10s}")
    figures: dict[str, float] = {}
    for name, values in rates.items():
        rate = statistics.median(values)
        figures[f"{name} evals_per_s"] = rate
        print(f"{name:14s} {rate:14.1f} {rate / exec_rate:10.4f}")
    inline_us = statistics.median(per_call["inline"])
    print(f"\nreward call ({n_calls} calls of a trivial reward, microseconds per call)")
    for name, values in per_call.items():
        us = statistics.median(values)
        figures[f"reward {name} us_per_call"] = us
        print(f"{name:14s} {us:10.1f} us   overhead {us - inline_us:8.1f} us")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"figures": figures, "sandbox_mode": mode, "args": vars(args)}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
