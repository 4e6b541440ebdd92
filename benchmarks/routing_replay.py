"""The paper's Fig. 5 on the tiny MoE: GRPO / VESPO x routing replay none / R2 / R3, bf16 sampler, fp32 trainer.

    python benchmarks/routing_replay.py --out runs/routing_replay            # runs the sweep, then the table
    python benchmarks/routing_replay.py --out runs/routing_replay --report   # table of what has finished
    python benchmarks/routing_replay.py --paired runs/routing_replay/warmup/warmup/model.safetensors
        # one batch, one set of weights: flips and engine mismatch without and with R3, side by side

The sweep is one ``vespo sweep`` (``--jobs 1 --threads 1``); the table is printed as markdown and
written to ``benchmarks/results/routing_replay.json``. Ratios are against the same loss without
replay in the same sweep (mismatch |log W|, per-token engine gap, step time).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "model.arch=qwen3_moe",
    "model.num_experts=4",
    "model.num_experts_per_tok=2",
    "sampling.sampler_dtype=bfloat16",
    "algorithm.staleness=4",
    "algorithm.mini_batch_prompts=8",
    "run.total_steps=48",
    "eval.every=48",
    "eval.at_start=false",
    "eval.num_prompts=128",
    "eval.avg_k=1",
    "logging.tensorboard=false",
]
GRID = ["algorithm.loss=grpo,vespo", "algorithm.routing_replay=none,r2,r3"]
#: metrics averaged over all training steps of a cell (per-step values are noisy at this size)
MEANS = {
    "engine_flips": "routing/old_flip_frac",  # R3: trainer's own fp32 top-k vs the bf16 sampler's (same weights)
    "flips_before": "routing/flip_frac",  # pi_theta pass: own top-k vs the replayed routing
    "flips_after": "routing/replayed_flip_frac",  # experts actually used vs the replayed routing
    "mismatch_log_w": "mismatch/log_w_abs_mean",  # |sum_t log pi_old - log mu| per sequence
    "engine_token_diff": "mismatch/engine_log_prob_diff_abs_mean",  # |log pi_old - log mu| per token
    "stored_bytes": "routing/stored_bytes",
    "step_time_s": "perf/step_time_s",
}


def sweep_command(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vespo.cli",
        "sweep",
        "--out",
        str(out),
        *[a for g in GRID for a in ("--grid", g)],
        "--seeds",
        "0,1",
        "--jobs",
        "1",
        "--threads",
        "1",
        *OVERRIDES,
    ]


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def cell_summary(run_dir: Path) -> dict[str, Any] | None:
    """A finished cell's numbers (None for a cell that has not finished, or a log file)."""
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir() or not (run_dir / "summary.json").exists() or not path.exists():
        return None
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    train = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if r.get("eval/accuracy") is not None]
    tail = train[-max(1, len(train) // 10) :]
    out = {
        "loss": cfg["algorithm"]["loss"],
        "replay": cfg["algorithm"]["routing_replay"],
        "seed": cfg["run"]["seed"],
        "steps": len(train),
        "final_accuracy": evals[-1]["eval/accuracy"] if evals else None,
        "train_reward": _mean([r["reward/mean"] for r in tail]),
        "wall_s": json.loads((run_dir / "summary.json").read_text()).get("wall_time_s"),
    }
    for name, key in MEANS.items():
        out[name] = _mean([r.get(key) for r in train])
    return out


def _ms(values: list[float | None], digits: int) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(vals) > 1 else f"{m:.{digits}f}"


def table(cells: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["loss"], c["replay"]), []).append(c)

    def avg(key: str, loss: str, replay: str) -> float | None:
        return _mean([c[key] for c in groups.get((loss, replay), []) if c[key] is not None])

    lines = [
        "| method | seeds | final eval acc | train reward (last 10 %) | engine flips (sampler vs trainer) | "
        "pi_theta flips before replay | after replay | mismatch \\|log W\\| per seq | x none | "
        "engine \\|Δ log p\\| per token | x none | routing bytes / step | step time x none |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (loss, replay), group in sorted(
        groups.items(), key=lambda kv: (kv[0][0], ["none", "r2", "r3"].index(kv[0][1]))
    ):
        label = loss.upper() if loss == "grpo" else "VESPO"
        label += "" if replay == "none" else f" + {replay.upper()}"

        def ratio(key: str, loss: str = loss, replay: str = replay) -> str:
            base, this = avg(key, loss, "none"), avg(key, loss, replay)
            return f"{this / base:.2f}" if base and this is not None else "n/a"

        lines.append(
            f"| {label} | {len(group)} | {_ms([c['final_accuracy'] for c in group], 3)} | "
            f"{_ms([c['train_reward'] for c in group], 3)} | {_ms([c['engine_flips'] for c in group], 4)} | "
            f"{_ms([c['flips_before'] for c in group], 4)} | {_ms([c['flips_after'] for c in group], 4)} | "
            f"{_ms([c['mismatch_log_w'] for c in group], 4)} | {ratio('mismatch_log_w')} | "
            f"{_ms([c['engine_token_diff'] for c in group], 5)} | {ratio('engine_token_diff')} | "
            f"{_ms([c['stored_bytes'] for c in group], 0)} | {ratio('step_time_s')} |"
        )
    return "\n".join(lines)


def paired(weights: str, n_prompts: int = 64) -> str:
    """Sample one batch with the bf16 engine (recording), score it in fp32 with and without replay."""
    import torch

    from vespo.rollout.log_probs import sequence_log_probs
    from vespo.rollout.prompts import encode_prompts
    from vespo.rollout.routing import replay_routing
    from vespo.rollout.sampler import Sampler
    from vespo.tasks import build_task
    from vespo.train.config import load_config
    from vespo.train.trainer import build_policy

    torch.set_num_threads(1)
    cfg = load_config(None, ["model.arch=qwen3_moe", f"model.init_from={weights}"])
    model, tok = build_policy(cfg)
    model.eval()
    examples = build_task(cfg.task.spec()).train_examples(n_prompts, seed=5)
    prompts = [p for p in encode_prompts(tok, examples) for _ in range(2)]
    sampler = Sampler(model, dtype=torch.bfloat16)
    sampler.record_routing = True
    rollout = sampler.generate(
        prompts,
        max_new_tokens=32,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    b = rollout.to_batch(tok.pad_token_id)
    m = b.response_mask
    count = torch.zeros(b.input_ids.shape, dtype=torch.bool)
    count[:, b.prompt_length :] = m
    with torch.no_grad():
        plain = sequence_log_probs(model, b.input_ids, b.attention_mask, b.response_length)
        with replay_routing(model, b.routed_experts, count_mask=count) as st:
            replayed = sequence_log_probs(model, b.input_ids, b.attention_mask, b.response_length)
    lines = [
        f"{b.num_sequences} sequences, {int(m.sum())} response tokens, routing "
        f"{b.routed_experts.shape[-2]} layers x top-{b.routed_experts.shape[-1]} = "
        f"{b.routed_experts.shape[-2] * b.routed_experts.shape[-1]} bytes a position",
        f"routing flips (response token, layer): before replay {st.natural_flips / st.pairs:.4%}, "
        f"after {st.used_flips / st.pairs:.4%}",
    ]
    base = None
    for name, lp in (("fp32, own routing", plain), ("fp32, R3 replay", replayed)):
        d = lp - b.rollout_log_prob
        tok_mean, tok_max, seq = d.abs()[m].mean().item(), d.abs()[m].max().item(), (d * m).sum(-1).abs().mean().item()
        base = base or (tok_mean, tok_max, seq)
        lines.append(
            f"{name}: |log pi - log mu| per token mean {tok_mean:.3e} (x{tok_mean / base[0]:.2f}), "
            f"max {tok_max:.3e} (x{tok_max / base[1]:.2f}); |log W| mismatch per seq {seq:.3e} (x{seq / base[2]:.2f})"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "routing_replay")
    ap.add_argument("--report", action="store_true", help="only the table of the finished cells")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "routing_replay.json")
    ap.add_argument("--paired", metavar="WEIGHTS", help="only the paired one-batch measurement at these weights")
    ap.add_argument("--wall", type=float, help="the sweep's wall time in seconds, for the JSON (with --report)")
    args = ap.parse_args()
    if args.paired:
        print(paired(args.paired))
        return
    wall = args.wall
    if not args.report:
        t0 = time.perf_counter()
        subprocess.run(sweep_command(args.out), check=True)
        wall = time.perf_counter() - t0
    cells = [s for d in sorted((args.out / "cells").iterdir()) if (s := cell_summary(d)) is not None]
    text = table(cells)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"command": " ".join(sweep_command(args.out)), "sweep_wall_s": wall, "cells": cells, "table": text},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
