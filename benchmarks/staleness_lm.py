"""Tier 2 of the staleness benchmark: the language-model task, its ablations and the mismatch arm.

    python benchmarks/staleness_lm.py run [--root runs/staleness_lm]     # all sweeps, resumable
    python benchmarks/staleness_lm.py report [--root ...]                # JSON + PNGs + markdown

``run`` issues ordinary ``vespo sweep`` commands (printed before each starts), in priority order:

1. grid: vespo, grpo, gspo, sapo, cispo x N in {64, 16, 4} x seeds 0-2, 300 steps, 512 unique
   held-out prompts (``task.eval_fraction=0.15``), one shared supervised warm-up;
2. ablations (VESPO at N = 64, seeds 0-1): log W / sqrt(T), log W / T, the A >= 0 kernel for both
   signs, the A < 0 kernel for both signs, and (c1, c2) doubled;
3. mismatch arm (``run.mode=async``, bf16 sampler against the fp32 trainer, dense and a tiny
   Qwen3-MoE, seeds 0-1, 200 steps): GRPO and VESPO on W = pi / mu, and each with pi_old recomputed and token
   TIS (AReaL-style decoupled weight for GRPO, folded into log W for VESPO);
4. N = 1 for vespo and sapo (seeds 0-2). At N = 1 vespo, grpo, gspo and cispo compute the same
   update bit for bit (W = 1; ``tests/train/test_trainer.py::test_on_policy_vespo_grpo_gspo_cispo_train_bit_identically``),
   so the report shows vespo's N = 1 runs for all four. ``--full-n1`` runs the other three anyway.

Every sweep resumes where it stopped. ``report`` writes ``benchmarks/results/staleness_lm_*.json``,
copies the plots to ``docs/img/`` and prints the tables that docs/results.md carries.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vespo.experiment.sweep import mean_std, read_rows, tail_mean

REPO = Path(__file__).resolve().parents[1]
COMMON = ["run.total_steps=300", "eval.num_prompts=512", "eval.avg_k=1", "eval.every=100", "task.eval_fraction=0.15"]
METHODS = ["vespo", "grpo", "gspo", "sapo", "cispo"]
ABLATIONS = (
    "algorithm.loss_params={length_norm: sqrt},{length_norm: linear},{k_neg: 2, lambda_neg: 3},"
    "{k_pos: 3, lambda_pos: 2},{k_pos: 4, lambda_pos: 6, k_neg: 6, lambda_neg: 4}"
)
MISMATCH_AXIS = "algorithm={old_log_prob: sampler},{old_log_prob: recompute, correction: token_tis}"
MISMATCH = ["run.mode=async", "sampling.sampler_dtype=bfloat16", "run.total_steps=200"]
MOE = ["model.arch=qwen3_moe", "model.num_experts=4", "model.num_experts_per_tok=2"]
IDENTICAL_AT_N1 = ("grpo", "gspo", "cispo")  # same update as vespo when W = 1


def sweep(
    out: Path,
    grid: list[str],
    seeds: str,
    jobs: int,
    extra: list[str],
    report_only: bool = False,
    common: Sequence[str] = COMMON,
) -> list[str]:
    """The ``vespo sweep`` command of one grid: ``common`` overrides, then ``extra`` (which win)."""
    cmd = [
        sys.executable,
        "-m",
        "vespo.cli",
        "sweep",
        "--out",
        str(out),
        *[a for g in grid for a in ("--grid", g)],
        "--seeds",
        seeds,
        "--jobs",
        str(jobs),
        "--threads",
        "1",
        *common,
        *extra,
    ]
    if report_only:
        cmd.append("--report-only")
    return cmd


def plan(root: Path, full_n1: bool) -> list[tuple[str, list[str], Path | None]]:
    """(label, command, warm-up to share) in priority order."""
    grid = root / "grid"
    steps = [
        (
            f"grid N={n}",
            sweep(grid, [f"algorithm.loss={','.join(METHODS)}", f"algorithm.staleness={n}"], "0,1,2", 2, []),
            None,
        )
        for n in (64, 16, 4)
    ]
    steps.append(
        (
            "ablations",
            sweep(root / "ablations", ["algorithm.loss=vespo", "algorithm.staleness=64", ABLATIONS], "0,1", 2, []),
            grid / "warmup",
        )
    )
    steps.append(
        (
            "mismatch dense",
            sweep(root / "mismatch_dense", ["algorithm.loss=grpo,vespo", MISMATCH_AXIS], "0,1", 1, MISMATCH),
            grid / "warmup",
        )
    )
    steps.append(
        (
            "mismatch moe",
            sweep(root / "mismatch_moe", ["algorithm.loss=grpo,vespo", MISMATCH_AXIS], "0,1", 1, [*MISMATCH, *MOE]),
            None,
        )
    )
    n1 = METHODS if full_n1 else ["vespo", "sapo"]
    steps.append(
        ("grid N=1", sweep(grid, [f"algorithm.loss={','.join(n1)}", "algorithm.staleness=1"], "0,1,2", 2, []), None)
    )
    return steps


def cmd_run(args: argparse.Namespace) -> int:
    root = Path(args.root)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    for label, cmd, shared_warmup in plan(root, args.full_n1):
        out = Path(cmd[cmd.index("--out") + 1])
        link = out / "warmup"
        if (
            shared_warmup is not None
            and (shared_warmup / "warmup" / "model.safetensors").exists()
            and not os.path.lexists(link)
        ):
            # same base model config as the grid: reuse its warm-up instead of recomputing the same weights
            out.mkdir(parents=True, exist_ok=True)
            link.symlink_to(shared_warmup.resolve(), target_is_directory=True)
        print(f"== {label}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=False, env=env)
    return 0


# ---------------------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


EXTRA_KEYS = (
    "is/ess",
    "mismatch/engine_log_prob_diff_abs_mean",
    "mismatch/log_w_abs_mean",
    "mismatch/routing_flip_frac",
    "stale/versions_behind_mean",
    "is/log_w_pi_mu_abs_mean",
    "mismatch/frac_truncated",
    "grad/norm",
    "stale/log_w_abs_mean",
)


def collect(out: Path) -> list[dict[str, Any]]:
    """Each finished cell of a sweep dir with the sweep's summary fields and a few extra tail means."""
    results = json.loads((out / "results.json").read_text())
    cells = []
    for cell in results["cells"]:
        if cell.get("done") is False:  # still running or stopped: not a result yet
            continue
        rows = read_rows(out / "cells" / cell["name"])
        evals = [r for r in rows if r.get("eval/accuracy") is not None]
        cell = dict(cell)
        cell["eval_curve"] = [[r["step"], r["eval/accuracy"]] for r in evals]
        for key in EXTRA_KEYS:
            cell[key] = tail_mean(rows, key)
        cells.append(cell)
    return cells


def _by(cells: list[dict[str, Any]], method: str, n: Any) -> list[dict[str, Any]]:
    return sorted(
        (c for c in cells if c.get("variant", c.get("algorithm.loss")) == method and c.get("algorithm.staleness") == n),
        key=lambda c: c.get("run.seed", 0),
    )


def grid_table(cells: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    lines = [
        "| N | method | final acc, mean ± std | per seed | best acc | train reward | \\|log W\\| | phi<0.01 | clip frac | ESS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    for n in (1, 4, 16, 64):
        for method in METHODS:
            group = _by(cells, method, n)
            note = ""
            if n == 1 and method in IDENTICAL_AT_N1:
                own = {c.get("run.seed"): c["final_accuracy"] for c in group}
                ref = _by(cells, "vespo", 1)
                same = [
                    s for s, v in own.items() if any(c.get("run.seed") == s and c["final_accuracy"] == v for c in ref)
                ]
                if len(group) < len(ref) and len(same) == len(own):
                    checked = f"; seed {', '.join(map(str, same))} run too: identical" if same else ""
                    group, note = ref, f" (= vespo: same update at W = 1{checked})"
            if not group:
                continue
            finals = [c["final_accuracy"] for c in group]
            m, s = mean_std(finals)
            summary[f"{method}/N{n}"] = {
                "mean": m,
                "std": s,
                "seeds": len(finals),
                "per_seed": finals,
                "identical_to_vespo": bool(note),
            }

            def avg(key: str, group: list[dict[str, Any]] = group) -> float | None:
                vals = [c[key] for c in group if c.get(key) is not None]
                return sum(vals) / len(vals) if vals else None

            lines.append(
                f"| {n} | {method}{note} | {m:.3f} ± {s:.3f} | {' / '.join(f'{v:.3f}' for v in finals)} | "
                f"{_fmt(avg('best_accuracy'))} | {_fmt(avg('final_reward'), 2)} | {_fmt(avg('abs_log_w'), 2)} | "
                f"{_fmt(avg('phi_below_001'), 3)} | {_fmt(avg('clip_frac'), 3)} | {_fmt(avg('is/ess'), 3)} |"
            )
    return "\n".join(lines), summary


def targets(summary: dict[str, Any]) -> str:
    out = []
    v4, v64 = summary.get("vespo/N4"), summary.get("vespo/N64")
    if v4 and v64 and v4["mean"] > 0:
        out.append(
            f"- VESPO N=64 / N=4 = {v64['mean']:.3f} / {v4['mean']:.3f} = **{v64['mean'] / v4['mean']:.2f}** "
            f"(target >= 0.90; paper 0.88)"
        )
    ratios = []
    for method in METHODS:
        a, b = summary.get(f"{method}/N4"), summary.get(f"{method}/N64")
        if a and b and a["mean"] > 0:
            ratios.append(f"{method} {b['mean'] / a['mean']:.2f}")
    if ratios:
        out.append(f"- N=64 / N=4, every method: {', '.join(ratios)}")
    for n in (16, 64):
        v = summary.get(f"vespo/N{n}")
        if not v:
            continue
        for method in METHODS[1:]:
            b = summary.get(f"{method}/N{n}")
            if b:
                diff = v["mean"] - b["mean"]
                se = math.sqrt(v["std"] ** 2 / v["seeds"] + b["std"] ** 2 / b["seeds"])
                verdict = "ahead" if diff > 2 * se else "behind" if diff < -2 * se else "level within 2 standard errors"
                out.append(
                    f"- N={n}: vespo - {method} = {diff:+.3f} (standard error {se:.3f}; {verdict}); "
                    f"target on the means {'met' if diff >= 0 else 'missed'}"
                )
    return "\n".join(out)


def ablation_table(abl: list[dict[str, Any]], grid: list[dict[str, Any]]) -> tuple[str, list[tuple[float, float]]]:
    lines = [
        "| VESPO variant (N = 64) | final acc, mean over seeds | per seed | phi<0.01 | phi mean | \\|log W\\| | train reward |",
        "|---|---|---|---|---|---|---|",
    ]
    points = []
    base = [c for c in _by(grid, "vespo", 64) if c.get("run.seed") in (0, 1)]
    variants = [("default (c1, c2) = (2, 3) / (3, 2)", base)]
    for name in sorted({c["variant"] for c in abl}):
        variants.append(
            (
                name.replace("vespo loss_params-", ""),
                sorted((c for c in abl if c["variant"] == name), key=lambda c: c["run.seed"]),
            )
        )
    for name, group in variants:
        if not group:
            continue
        finals = [c["final_accuracy"] for c in group]
        m, _ = mean_std(finals)

        def avg(key: str, group: list[dict[str, Any]] = group) -> float | None:
            vals = [c[key] for c in group if c.get(key) is not None]
            return sum(vals) / len(vals) if vals else None

        if avg("phi_below_001") is not None:
            points.append((avg("phi_below_001"), m))
        lines.append(
            f"| {name} | {m:.3f} | {' / '.join(f'{v:.3f}' for v in finals)} | {_fmt(avg('phi_below_001'))} | "
            f"{_fmt(avg('phi_mean'))} | {_fmt(avg('abs_log_w'), 2)} | {_fmt(avg('final_reward'), 2)} |"
        )
    return "\n".join(lines), points


def spearman(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None

    def ranks(xs: list[float]) -> list[float]:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks([p[0] for p in points]), ranks([p[1] for p in points])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / den if den else None


MISMATCH_NAMES = {
    "grpo algorithm-old_log_probsampler": "GRPO on pi/mu (clipped)",
    "grpo algorithm-old_log_probrecompute-correctiontoken_tis": "GRPO + token TIS (pi_old recomputed)",
    "vespo algorithm-old_log_probsampler": "VESPO on W = pi/mu",
    "vespo algorithm-old_log_probrecompute-correctiontoken_tis": "VESPO + token TIS folded into W",
}


def mismatch_table(arms: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        (
            "| policy | method | seeds | final acc, mean | per seed | best acc | train reward | engine \\|Δ log p\\| per token | "
            "mismatch \\|log W\\| per seq | staleness \\|log W\\| per seq | routing flips | versions behind | phi<0.01 |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, cells in arms.items():
        for variant, label in MISMATCH_NAMES.items():
            group = sorted((c for c in cells if c.get("variant") == variant), key=lambda c: c.get("run.seed", 0))
            if not group:
                continue

            def avg(key: str, group: list[dict[str, Any]] = group) -> float | None:
                vals = [c[key] for c in group if c.get(key) is not None]
                return sum(vals) / len(vals) if vals else None

            finals = [c["final_accuracy"] for c in group]
            lines.append(
                f"| {arch} | {label} | {len(group)} | {mean_std(finals)[0]:.3f} | {' / '.join(f'{v:.3f}' for v in finals)} | "
                f"{_fmt(avg('best_accuracy'))} | {_fmt(avg('final_reward'), 2)} | "
                f"{_fmt(avg('mismatch/engine_log_prob_diff_abs_mean'), 5)} | {_fmt(avg('mismatch/log_w_abs_mean'), 4)} | "
                f"{_fmt(avg('stale/log_w_abs_mean'), 3)} | "
                f"{_fmt(avg('mismatch/routing_flip_frac'), 4)} | {_fmt(avg('stale/versions_behind_mean'), 2)} | "
                f"{_fmt(avg('phi_below_001'), 3)} |"
            )
    return "\n".join(lines)


def copy_small(src: Path, dst: Path, colors: int = 64) -> None:
    """Copy a matplotlib PNG with a reduced palette (line plots need few colours; ~4x smaller)."""
    from PIL import Image

    with Image.open(src) as image:
        image.convert("RGB").quantize(colors=colors).save(dst, optimize=True)


def cmd_report(args: argparse.Namespace) -> int:
    root = Path(args.root)
    results_dir, img = REPO / "benchmarks" / "results", REPO / "docs" / "img"
    reports = {}  # one report-only call per sweep directory; the grid's covers every N at once
    for label, cmd, _ in plan(root, args.full_n1):
        out = Path(cmd[cmd.index("--out") + 1])
        if label.startswith("grid"):
            cmd = sweep(out, [f"algorithm.loss={','.join(METHODS)}", "algorithm.staleness=1,4,16,64"], "0,1,2", 1, [])
        reports[out] = [*cmd, "--report-only"]
    for out, cmd in reports.items():
        if out.exists():
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    sections = []
    grid_cells = collect(root / "grid") if (root / "grid" / "results.json").exists() else []
    if grid_cells:
        table, summary = grid_table(grid_cells)
        sections += ["### Grid", table, "", targets(summary)]
        (results_dir / "staleness_lm_grid.json").write_text(
            json.dumps({"cells": grid_cells, "summary": summary}, indent=1)
        )
        for name in ("reward_curves.png", "accuracy_vs_n.png", "diagnostics_N64.png"):
            if (root / "grid" / name).exists():
                copy_small(root / "grid" / name, img / f"staleness_lm_{name}")
    if (root / "ablations" / "results.json").exists():
        abl = collect(root / "ablations")
        table, points = ablation_table(abl, grid_cells)
        rho = spearman(points)
        sections += [
            "### Ablations",
            table,
            "",
            f"Spearman(phi<0.01 share, final accuracy) over the variants: {_fmt(rho, 2)}",
        ]
        (results_dir / "staleness_lm_ablations.json").write_text(json.dumps({"cells": abl, "spearman": rho}, indent=1))
        if (root / "ablations" / "diagnostics_N64.png").exists():
            copy_small(root / "ablations" / "diagnostics_N64.png", img / "staleness_lm_ablations_diagnostics.png")
    arms = {
        arch: collect(root / f"mismatch_{arch}")
        for arch in ("dense", "moe")
        if (root / f"mismatch_{arch}" / "results.json").exists()
    }
    if arms:
        sections += ["### Mismatch arm", mismatch_table(arms)]
        (results_dir / "staleness_lm_mismatch.json").write_text(json.dumps(arms, indent=1))
        src = root / "mismatch_moe" / "diagnostics_all.png"
        if src.exists():
            copy_small(src, img / "staleness_lm_mismatch_moe.png")
    print("\n".join(sections))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("run", cmd_run), ("report", cmd_report)):
        p = sub.add_parser(name)
        p.add_argument("--root", default="runs/staleness_lm", help="directory of the sweeps")
        p.add_argument("--full-n1", action="store_true", help="also run grpo, gspo and cispo at N = 1")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
