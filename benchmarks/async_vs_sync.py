"""Asynchronous against synchronous training on this machine, as ratios measured in one run.

    python benchmarks/async_vs_sync.py              # 100 steps per run, 2 rounds
    python benchmarks/async_vs_sync.py --quick      # 16 steps, 1 round, short warm-up (smoke test)

The same policy (the packaged default tiny Llama after a shared, cached supervised warm-up), task,
seed, loss (VESPO, pi_old = mu), mini-batch (m = 8 prompts x G = 8 responses), learning rate and
number of optimizer steps run in four configurations, compared in two pairs that generate the
same number of prompts per sampler call:

- ``sync N=1``  sample m prompts with the current weights, train one step (on-policy);
- ``async c=m`` one Ray rollout worker, chunks of m prompts, weights pushed every K = 4 steps,
  staleness threshold s = 1, partial rollouts (the paper's asynchronous setup);
- ``sync N=4``  sample 4m prompts, train 4 steps on them (weights reach the sampler every 4 steps);
- ``async c=4m`` the same asynchronous setup with chunks of 4m prompts.

Threads: the sync runs use one torch thread (``--sync-threads``; on a shared 2-core machine a
second intra-op thread made them an order of magnitude slower, see docs/async.md); the async runs
give the worker one thread and the trainer one. The workers' trainer-precision reference pass
(``async.measure_mismatch``, a metrics-only cost the sync runs do not pay) is off.

Reported per configuration (medians over rounds; rounds alternate the order of the runs so that
load from other processes hits all of them alike): steady-state steps/s (end of step 1 to the
last step, so start-up and the first generation are excluded), wall-clock from the start of the
training loop until the rolling train reward (mean of the last ``--window`` steps, full windows
only) first reaches the target, and for the async runs the token-weighted staleness distribution.
The target defaults to halfway between the starting reward and the lowest of the runs' best
rolling rewards, so that every run reaches it; ``--target`` fixes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from vespo.rollout.metrics import LAG_BUCKETS
from vespo.train.config import load_config
from vespo.train.trainer import Trainer, run_warmup

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "src" / "vespo" / "configs" / "default.yaml"
M = 8

SHARED = [
    "eval.every=100000",
    "eval.at_start=false",
    "eval.num_prompts=8",
    "eval.avg_k=1",
    "checkpoint.every=100000",
    "logging.progress=false",
    "logging.tensorboard=false",
    "algorithm.old_log_prob=sampler",
    f"algorithm.mini_batch_prompts={M}",
    "sampling.group_size=8",
]
ASYNC = [
    "run.mode=async",
    "async.sync_every=4",
    "async.staleness_threshold=1.0",
    "async.partial_rollout=true",
    "async.num_workers=1",
    "async.measure_mismatch=false",
]


def configurations(sync_threads: int) -> dict[str, list[str]]:
    sync = ["run.mode=sync", f"run.threads={sync_threads}"]
    return {
        "sync N=1": [*sync, "algorithm.staleness=1"],
        "async c=m": [*ASYNC, f"async.chunk_prompts={M}"],
        "sync N=4": [*sync, "algorithm.staleness=4"],
        "async c=4m": [*ASYNC, f"async.chunk_prompts={4 * M}"],
    }


PAIRS = (("async c=m", "sync N=1"), ("async c=4m", "sync N=4"), ("async c=4m", "sync N=1"))


def rows_of(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "loss/value" in r]


def rolling(values: list[float], window: int) -> list[float | None]:
    """Mean of the last ``window`` values; None until a full window exists."""
    return [statistics.fmean(values[i + 1 - window : i + 1]) if i + 1 >= window else None for i in range(len(values))]


def run_one(name: str, overrides: list[str], out: Path) -> dict:
    run_dir = out / name.replace(" ", "_").replace("=", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(DEFAULT_CONFIG, [*overrides, f"run.out_dir={run_dir}"])
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    t_init = time.perf_counter() - t0
    trainer.train()
    total = time.perf_counter() - t0
    rows = rows_of(run_dir)
    elapsed = [r["perf/elapsed_s"] for r in rows]
    steps_per_s = (len(rows) - 1) / (elapsed[-1] - elapsed[0]) if len(rows) > 1 else float("nan")
    return {"rows": rows, "steps_per_s": steps_per_s, "init_s": t_init, "total_s": total}


def lag_histogram(rows: list[dict]) -> dict[str, float]:
    """Share of trained tokens by versions behind, over all steps (weighted by tokens per step)."""
    keys = [f"stale/lag_frac_{k}" for k in range(LAG_BUCKETS)] + [f"stale/lag_frac_ge{LAG_BUCKETS}"]
    weights = [r["response/length_mean"] for r in rows]
    total = sum(weights)
    return {
        k.removeprefix("stale/lag_frac_"): sum(r.get(k, 0.0) * w for r, w in zip(rows, weights)) / total for k in keys
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=2, help="rounds; every round runs every configuration")
    p.add_argument("--quick", action="store_true", help="16 steps, 1 round, 200 warm-up steps")
    p.add_argument("--warmup-steps", type=int, default=600, help="supervised warm-up steps (shared, cached)")
    p.add_argument("--window", type=int, default=10, help="steps in the rolling train reward")
    p.add_argument("--target", type=float, default=None, help="target rolling train reward (default: auto)")
    p.add_argument("--sync-threads", type=int, default=1, help="torch threads of the sync runs")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "async_vs_sync")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup_steps = 16, 1, 200
        args.window = min(args.window, 4)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cores = os.cpu_count() or 1
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    warm_dir = out / f"warmup_{args.warmup_steps}"
    warm_cfg = load_config(
        DEFAULT_CONFIG,
        [*SHARED, f"run.out_dir={warm_dir}", f"warmup.steps={args.warmup_steps}", "run.threads=1", "run.mode=sync"],
    )
    t0 = time.perf_counter()
    weights = run_warmup(warm_cfg)
    print(f"warm-up: {weights} ({time.perf_counter() - t0:.0f} s)", flush=True)
    base = [
        *SHARED,
        f"run.total_steps={args.steps}",
        f"model.init_from={weights}",
        "warmup.steps=0",
        f"sampling.max_new_tokens={args.max_new_tokens}",
        f"optim.lr={args.lr}",
    ]

    runs = configurations(args.sync_threads)
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
            res = run_one(name, [*base, *runs[name]], out / f"round{r}")
            results[name].append(res)
            print(
                f"round {r}  {name:12s} {res['steps_per_s']:6.3f} steps/s  (init {res['init_s']:4.1f} s, "
                f"total {res['total_s']:5.1f} s)",
                flush=True,
            )

    curves = {
        name: [rolling([x["reward/mean"] for x in res["rows"]], args.window) for res in rs]
        for name, rs in results.items()
    }
    start = statistics.fmean(
        x["reward/mean"] for rs in results.values() for res in rs for x in res["rows"][: args.window]
    )
    worst_best = min(max(v for v in c if v is not None) for cs in curves.values() for c in cs)
    target = args.target if args.target is not None else start + 0.5 * (worst_best - start)

    def time_to_target(res: dict, curve: list[float | None]) -> float | None:
        for row, value in zip(res["rows"], curve):
            if value is not None and value >= target:
                return row["perf/elapsed_s"]
        return None

    summary: dict[str, dict] = {}
    for name, rs in results.items():
        tts = [time_to_target(res, c) for res, c in zip(rs, curves[name])]
        entry = {
            "steps_per_s": statistics.median(res["steps_per_s"] for res in rs),
            "steps_per_s_rounds": [res["steps_per_s"] for res in rs],
            "time_to_target_s": statistics.median(tts) if all(t is not None for t in tts) else None,
            "time_to_target_rounds": tts,
            "final_rolling_reward": statistics.median(c[-1] for c in curves[name]),
            "wall_s": statistics.median(res["total_s"] for res in rs),
        }
        if name.startswith("async"):
            rows = [x for res in rs for x in res["rows"]]
            entry["lag_histogram"] = lag_histogram(rows)
            entry["lag_mean"] = statistics.fmean(x["stale/versions_behind_mean"] for x in rows)
            entry["lag_max"] = max(x["stale/versions_behind_max"] for x in rows)
            entry["lag_bound"] = rows[0]["stale/bound"]
            entry["partial_frac"] = statistics.fmean(x.get("stale/partial_frac", 0.0) for x in rows)
        summary[name] = entry
    ratios = {}
    for a, b in PAIRS:
        ratios[f"steps/s {a} / {b}"] = summary[a]["steps_per_s"] / summary[b]["steps_per_s"]
        ta, tb = summary[a]["time_to_target_s"], summary[b]["time_to_target_s"]
        ratios[f"time to target {b} / {a}"] = tb / ta if ta and tb else None

    print()
    print(
        f"{args.steps} steps, m={M} prompts x G=8, max_new_tokens={args.max_new_tokens}, {cores} cores, "
        f"{args.repeats} round(s); start reward {start:.3f}, target rolling reward {target:.3f}"
    )
    print(f"{'run':12s} {'steps/s':>8s} {'to target':>10s} {'final reward':>13s} {'wall':>6s}")
    for name, s in summary.items():
        ttt = f"{s['time_to_target_s']:.1f} s" if s["time_to_target_s"] is not None else "n/a"
        print(f"{name:12s} {s['steps_per_s']:8.3f} {ttt:>10s} {s['final_rolling_reward']:13.3f} {s['wall_s']:5.0f}s")
    print()
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x" if value is not None else f"{key}: n/a")
    for name, s in summary.items():
        if "lag_histogram" in s:
            hist = ", ".join(f"{k}: {v:.3f}" for k, v in s["lag_histogram"].items() if v > 0)
            print(f"\n{name} staleness, share of trained tokens by versions behind: {hist}")
            print(
                f"  mean lag {s['lag_mean']:.2f}, max {s['lag_max']:.0f} (bound {s['lag_bound']:.0f}), "
                f"partial responses {s['partial_frac']:.3f}"
            )
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "target": target,
        "start_reward": start,
        "summary": summary,
        "ratios": ratios,
        "command": " ".join(["python", *sys.argv]),
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
