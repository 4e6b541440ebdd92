"""Tier-2 evidence for ``vespo_adaptive`` (issue 11): the language-model task with long responses.

    python benchmarks/adaptive_lm.py probe  [--study mixed|strong]   # one short vespo run: |log W|, phi
    python benchmarks/adaptive_lm.py run    [--study mixed|strong]   # warm-up, then the sweep; resumable
    python benchmarks/adaptive_lm.py reeval [--study mixed|strong]   # final weights on 512 held-out prompts
    python benchmarks/adaptive_lm.py report [--study mixed|strong]   # JSON, PNGs, the markdown tables

The tiny Llama policy of docs/results.md's tier 2, but on chain_sum with 2-10 one-digit terms, so
the worked solutions are up to ~100 characters (tokens = characters; 8-10 terms: 54-98, mean 69)
instead of ~21. log W is a sum over the response, so the same staleness moves it several times
further, and the lengths vary. CPU-sized for one shared 2-core machine (one thread per job): 64
optimizer steps for every N (the same samples for every N; N = 64 is one rollout batch), greedy eval
on 128 held-out prompts at steps 0 and 64. Runs go to ``/work/runs/adaptive_lm/STUDY`` (``--root``).

The studies (``--study``) differ in the warm-up shared by every cell, the batch and the lr:

- ``mixed`` (the first): 300 supervised steps on 8-10 terms (``ROOT/stage1``; a plain 600-step
  warm-up on 8-10 terms reached accuracy 0), then 300 on 2-10 terms (``ROOT/sweep/warmup``, which the
  sweep picks up); 1 prompt x G = 8 responses per optimizer step. Greedy accuracy 0.057: no loss learned.
- ``strong``: the same two stages, then 600 more on 2-10 terms (greedy 0.518); 4 prompts x 8
  responses per step, lr 1e-4. ``strong_low_lr``: the same at lr 5e-5; its ROOT/sweep/warmup is
  meant to be the strong study's (a link), else its warm-up runs again.

``run`` issues ordinary ``vespo sweep`` commands (printed before each starts), in priority order:
vespo_adaptive, vespo, grpo x N in {64, 16} x seeds {0, 1}; then N = 1 for vespo_adaptive and
vespo (seed 0: equal bit for bit, since W = 1 gives alpha = 1); then gspo, cispo, topr at
N in {64, 16} if ``--baselines`` is given. All sweeps share one directory (``ROOT/sweep``) and so
one warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vespo.experiment.sweep import mean_std, read_rows

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.staleness_lm import copy_small  # noqa: E402
from benchmarks.staleness_lm import sweep as staleness_sweep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = 64


def _chain_sum(min_terms: int, max_terms: int) -> str:
    return f"task.params={{min_terms: {min_terms}, max_terms: {max_terms}, min_digits: 1, max_digits: 1}}"


@dataclass(frozen=True)
class Study:
    """One tier-2 setting: the warm-up stages it shares across cells and the prompts per optimizer step."""

    name: str
    prompts_per_step: int
    # (directory under ROOT, task override, supervised steps); each stage starts from the previous
    # one's weights, and the last writes ROOT/sweep/warmup, which the sweep picks up
    warmup: tuple[tuple[str, str, int], ...]
    extra: tuple[str, ...] = ()  # further overrides of every run

    @property
    def image_prefix(self) -> str:
        """Of the plots copied to docs/img (the first study kept the bare prefix)."""
        return "adaptive_lm_" if self.name == "mixed" else f"adaptive_lm_{self.name}_"

    @property
    def results(self) -> str:
        """The JSON file under benchmarks/results."""
        return f"{self.image_prefix.rstrip('_')}.json"

    def common(self) -> list[str]:
        """The overrides of every run of this study."""
        return [
            *TASK,
            f"run.total_steps={STEPS}",
            f"algorithm.mini_batch_prompts={self.prompts_per_step}",
            "eval.num_prompts=128",
            "eval.avg_k=1",
            f"eval.every={STEPS}",
            f"checkpoint.every={STEPS}",
            *self.extra,
        ]


TASK = [_chain_sum(2, 10), "sampling.max_new_tokens=128"]
_STAGE1 = ("stage1", _chain_sum(8, 10), 300)
_STRONG_WARMUP = (_STAGE1, ("stage2", TASK[0], 300), ("sweep/warmup", TASK[0], 600))
STUDIES = {
    # the first tier 2: a weak warm-up (greedy 0.057) and 8 responses per step; no loss learned
    "mixed": Study("mixed", 1, (_STAGE1, ("sweep/warmup", TASK[0], 300))),
    # a third warm-up stage of 600 steps (greedy 0.52) and 4 prompts (32 responses) per step, so that
    # learning can show; lr 1e-4, since 2e-4 took an on-policy pilot from 0.52 to 0.21 in 32 steps
    "strong": Study("strong", 4, _STRONG_WARMUP, ("optim.lr=1e-4",)),
    # the strong study at half its learning rate (ROOT/sweep/warmup: the strong study's warm-up weights)
    "strong_low_lr": Study("strong_low_lr", 4, _STRONG_WARMUP, ("optim.lr=5e-5",)),
}
MAIN = ["vespo_adaptive", "vespo", "grpo"]
EXTRA = ["gspo", "cispo", "topr"]
METHODS = [*MAIN, *EXTRA]


def sweep(
    out: Path,
    grid: list[str],
    seeds: str,
    study: Study,
    *,
    jobs: int = 1,
    report_only: bool = False,
) -> list[str]:
    """One grid of this study: one thread per job, the study's overrides."""
    return staleness_sweep(out, grid, seeds, jobs, [], report_only, common=study.common())


def plan(
    root: Path, baselines: bool, seeds: str = "0,1", study: Study | None = None, jobs: int = 1
) -> list[tuple[str, list[str]]]:
    """The sweep commands in priority order; N = 1 runs the first of ``seeds`` only."""
    study = study or STUDIES["mixed"]
    out = root / "sweep"

    def grid(losses: list[str], n: int, seeds: str) -> list[str]:
        return sweep(out, [f"algorithm.loss={','.join(losses)}", f"algorithm.staleness={n}"], seeds, study, jobs=jobs)

    steps = [(f"N={n}", grid(MAIN, n, seeds)) for n in (64, 16)]
    steps.append(("N=1", grid(["vespo_adaptive", "vespo"], 1, seeds.split(",")[0])))
    if baselines:
        steps += [(f"baselines N={n}", grid(EXTRA, n, seeds)) for n in (64, 16)]
    return steps


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def cmd_probe(args: argparse.Namespace) -> int:
    """One short vespo run (N = 64, 32 steps) from the sweep's warm-up: the time per step, |log W| and phi."""
    root = Path(args.root)
    weights = args.weights or root / "sweep" / "warmup" / "warmup" / "model.safetensors"
    out = root / "probe"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "vespo.cli",
        "train",
        *STUDIES[args.study].common(),
        "algorithm.loss=vespo",
        f"algorithm.staleness={args.n}",
        f"run.total_steps={args.steps}",
        f"eval.every={args.steps}",
        "eval.num_prompts=64",
        f"model.init_from={weights}",
        "warmup.steps=0",
        "run.threads=1",
        "logging.progress=false",
        f"run.out_dir={out}",
    ]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=_env())
    rows = [r for r in read_rows(out) if "reward/mean" in r]
    for r in rows:
        print(
            {
                k: round(r[k], 3)
                for k in (
                    "step",
                    "reward/mean",
                    "is/abs_log_w_mean",
                    "is/log_w_pos_p50",
                    "is/log_w_neg_p50",
                    "phi/frac_below_0.01",
                    "phi/mean",
                    "is/ess",
                    "response/length_mean",
                    "perf/elapsed_s",
                )
                if isinstance(r.get(k), (int, float))
            }
        )
    return 0


def warm_up_commands(root: Path, study: Study) -> list[list[str]]:
    """The shared warm-up's stages (module docstring), each from the previous stage's weights; the
    stages whose weights already exist are left out, and nothing runs once the last one exists."""
    weights = [root / d / "warmup" / "model.safetensors" for d, _, _ in study.warmup]
    if weights[-1].exists():
        return []
    base = [sys.executable, "-m", "vespo.cli", "warmup", "run.threads=1", "logging.progress=false"]
    cmds = []
    for i, (directory, task, steps) in enumerate(study.warmup):
        if weights[i].exists():
            continue
        start = [f"model.init_from={weights[i - 1]}"] if i else []
        cmds.append([*base, task, *TASK[1:], f"warmup.steps={steps}", *start, f"run.out_dir={root / directory}"])
    return cmds


def cmd_run(args: argparse.Namespace) -> int:
    study = STUDIES[args.study]
    for i, cmd in enumerate(warm_up_commands(Path(args.root), study)):
        print(f"== warm-up stage {i + 1}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, env=_env())
    for label, cmd in plan(Path(args.root), args.baselines, args.seeds, study, args.jobs):
        print(f"== {label}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=False, env=_env())
    return 0


REEVAL_PROMPTS = 512


def cmd_reeval(args: argparse.Namespace) -> int:
    """Greedy accuracy of every finished cell's final weights on 512 held-out prompts (the in-run eval
    has 128; at accuracies of a few per cent that is 3-4 prompts), and of the warm-up weights
    (a cell's step-0 checkpoint). Resumable: ``ROOT/reeval.json``."""
    from vespo.train.trainer import evaluate_run

    root = Path(args.root)
    path = root / "reeval.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    overrides = [f"eval.num_prompts={REEVAL_PROMPTS}", "eval.avg_k=1", "run.threads=1"]
    cells = sorted(
        (p.parent for p in (root / "sweep" / "cells").glob("*/summary.json")),
        key=lambda d: (d.name.split("_N")[0] not in MAIN, d.name),
    )
    for cell in cells:
        if cell.name in done:
            continue
        if "warmup" not in done:  # the step-0 checkpoint holds the shared warm-up weights
            tmp = root / "reeval_warmup"
            if not tmp.exists():
                shutil.copytree(cell, tmp, ignore=shutil.ignore_patterns("step_000064", "best", "tensorboard"))
                (tmp / "checkpoints" / "latest").write_text("step_000000")
            res = evaluate_run(tmp, overrides)
            done["warmup"] = {"greedy": res["eval/accuracy"], "sampled": res["eval/avg_at_1"]}
        res = evaluate_run(cell, overrides)
        done[cell.name] = {"greedy": res["eval/accuracy"], "sampled": res["eval/avg_at_1"]}
        path.write_text(json.dumps(done, indent=1))
    return 0


# ---------------------------------------------------------------------------------------- report


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else None


def _median_abs_log_w(row: dict[str, Any]) -> float | None:
    """Median |log W| of a mini-batch, from the per-sign medians (log W is almost always < 0 when stale)."""
    vals = [abs(row[k]) for k in ("is/log_w_pos_p50", "is/log_w_neg_p50") if isinstance(row.get(k), (int, float))]
    return sum(vals) / len(vals) if vals else None


TRAIN_KEYS = {  # name in the table -> metrics key, averaged over every training step of the run
    "abs_log_w": "is/abs_log_w_mean",
    "phi_mass": "phi/mean",
    "phi_below_001": "phi/frac_below_0.01",
    "phi_below_001_before": "phi/frac_below_0.01_before",
    "ess_w": "is/ess",
    "ess_phi_pos_after": "phi/ess_pos_after",
    "ess_phi_neg_after": "phi/ess_neg_after",
    "alpha_pos": "vespo_adaptive/alpha_pos",
    "alpha_neg": "vespo_adaptive/alpha_neg",
    "saturated": "vespo_adaptive/saturated",
    "clip_frac": "loss/clip_frac",
    "reward": "reward/mean",
    "response_length": "response/length_mean",
}


def collect(out: Path) -> list[dict[str, Any]]:
    results = json.loads((out / "results.json").read_text())
    reeval_path = out.parent / "reeval.json"
    reeval = json.loads(reeval_path.read_text()) if reeval_path.exists() else {}
    cells = []
    for cell in results["cells"]:
        rows = read_rows(out / "cells" / cell["name"])
        train = [r for r in rows if "reward/mean" in r]
        cell = dict(cell)
        cell["eval_curve"] = [[r["step"], r["eval/accuracy"]] for r in rows if r.get("eval/accuracy") is not None]
        cell["train_mean"] = {name: _mean(train, key) for name, key in TRAIN_KEYS.items()}
        med = [m for m in (_median_abs_log_w(r) for r in train) if m is not None]
        cell["train_mean"]["median_abs_log_w"] = sum(med) / len(med) if med else None
        if cell["name"] in reeval:
            cell[f"final_accuracy_{REEVAL_PROMPTS}"] = reeval[cell["name"]]["greedy"]
            cell[f"final_sampled_{REEVAL_PROMPTS}"] = reeval[cell["name"]]["sampled"]
        cells.append(cell)
    return cells


def _group(cells: list[dict[str, Any]], method: str, n: int) -> list[dict[str, Any]]:
    return sorted(
        (c for c in cells if c.get("algorithm.loss") == method and c.get("algorithm.staleness") == n and c.get("done")),
        key=lambda c: c.get("run.seed", 0),
    )


def _f(v: float | None, d: int = 3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def table(cells: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    lines = [
        "| N | method | seeds | final acc, 512 prompts, mean ± std | per seed | sampled acc, 512 | final acc, 128 (in-run) | train reward | mean \\|log W\\| | median \\|log W\\| | "
        "phi mass | phi<0.01 (vespo's share) | ESS of W | ESS of phi (A>0 / A<0) | alpha (A>0 / A<0) | clip frac |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    for n in (1, 16, 64):
        for method in METHODS:
            group = _group(cells, method, n)
            if not group:
                continue
            key512 = f"final_accuracy_{REEVAL_PROMPTS}"
            has512 = all(c.get(key512) is not None for c in group)
            finals = [c[key512] if has512 else c["final_accuracy"] for c in group]
            m, s = mean_std(finals)
            m128, s128 = mean_std([c["final_accuracy"] for c in group])
            sampled = f"{mean_std([c[f'final_sampled_{REEVAL_PROMPTS}'] for c in group])[0]:.3f}" if has512 else "-"

            def avg(key: str, group: list[dict[str, Any]] = group) -> float | None:
                vals = [c["train_mean"][key] for c in group if c["train_mean"].get(key) is not None]
                return sum(vals) / len(vals) if vals else None

            summary[f"{method}/N{n}"] = {
                "mean": m,
                "std": s,
                "seeds": len(finals),
                "per_seed": finals,
                "eval_prompts": REEVAL_PROMPTS if has512 else 128,
                "mean_128": m128,
                "std_128": s128,
                **{k: avg(k) for k in (*TRAIN_KEYS, "median_abs_log_w")},
            }
            before = avg("phi_below_001_before")
            phi_low = _f(avg("phi_below_001")) + (f" ({_f(before)})" if before is not None else "")
            adaptive = method == "vespo_adaptive"
            ess_phi = f"{_f(avg('ess_phi_pos_after'), 2)} / {_f(avg('ess_phi_neg_after'), 2)}" if adaptive else "-"
            alpha = f"{_f(avg('alpha_pos'), 2)} / {_f(avg('alpha_neg'), 2)}" if adaptive else "-"
            is_kernel = method in ("vespo", "vespo_adaptive")
            lines.append(
                f"| {n} | {method} | {len(finals)} | {m:.3f} ± {s:.3f}{'' if has512 else ' (128)'} | "
                f"{' / '.join(f'{v:.3f}' for v in finals)} | {sampled} | {m128:.3f} ± {s128:.3f} | "
                f"{_f(avg('reward'), 2)} | {_f(avg('abs_log_w'), 2)} | {_f(avg('median_abs_log_w'), 2)} | "
                f"{_f(avg('phi_mass')) if is_kernel else '-'} | {phi_low if is_kernel else '-'} | "
                f"{_f(avg('ess_w'), 2)} | {ess_phi} | {alpha} | {_f(avg('clip_frac'))} |"
            )
    return "\n".join(lines), summary


def targets(summary: dict[str, Any]) -> str:
    out = []
    a1, v1 = summary.get("vespo_adaptive/N1"), summary.get("vespo/N1")
    if a1 and v1:
        same = a1["per_seed"] == v1["per_seed"]
        out.append(
            f"- N=1: vespo_adaptive {a1['per_seed']} vs vespo {v1['per_seed']}: {'identical' if same else 'DIFFERENT'}"
        )
    for n in (16, 64):
        a = summary.get(f"vespo_adaptive/N{n}")
        if not a:
            continue
        for method in METHODS[1:]:
            b = summary.get(f"{method}/N{n}")
            if not b:
                continue
            diff = a["mean"] - b["mean"]
            se = math.sqrt(a["std"] ** 2 / a["seeds"] + b["std"] ** 2 / b["seeds"])
            verdict = "ahead" if diff > 2 * se else "behind" if diff < -2 * se else "level within 2 standard errors"
            out.append(
                f"- N={n}: vespo_adaptive - {method} = {diff:+.3f} (standard error {se:.3f}, "
                f"{a['seeds']} vs {b['seeds']} seeds; {verdict}); target on the means {'met' if diff >= 0 else 'missed'}"
            )
    return "\n".join(out)


QUARTER_KEYS = (
    ("\\|log W\\|", "is/abs_log_w_mean", 2),
    ("phi mass", "phi/mean", 3),
    ("phi<0.01", "phi/frac_below_0.01", 3),
    ("vespo would drop", "phi/frac_below_0.01_before", 3),
    ("alpha (A>0)", "vespo_adaptive/alpha_pos", 2),
    ("grad norm", "grad/norm", 3),
)


def quarters(out: Path, cells: list[dict[str, Any]], n: int = 64) -> str:
    """Diagnostics by staleness k of the mini-batch (quarters of 0..N-1), mean over steps and seeds."""
    lines = [
        "| method | k | " + " | ".join(q[0] for q in QUARTER_KEYS) + " |",
        "|---|---|" + "---|" * len(QUARTER_KEYS),
    ]
    size = n // 4
    for method in METHODS:
        group = _group(cells, method, n)
        if not group:
            continue
        trains = [[r for r in read_rows(out / "cells" / c["name"]) if "reward/mean" in r] for c in group]
        for q in range(4):
            rows = [r for t in trains for r in t if q * size <= (r["step"] - 1) % n < (q + 1) * size]
            vals = []
            for _, key, d in QUARTER_KEYS:
                v = _mean(rows, key)
                vals.append(
                    "-"
                    if v is None
                    or (key.startswith(("phi/", "vespo_adaptive")) and method not in ("vespo", "vespo_adaptive"))
                    else f"{v:.{d}f}"
                )
            lines.append(f"| {method} | {q * size}-{(q + 1) * size - 1} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    root = Path(args.root)
    out = root / "sweep"
    ns = "1,16,64"
    losses = ",".join(METHODS if args.baselines else MAIN)
    study = STUDIES[args.study]
    cmd = sweep(out, [f"algorithm.loss={losses}", f"algorithm.staleness={ns}"], args.seeds, study, report_only=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=_env())
    cells = collect(out)
    text, summary = table(cells)
    probe = None
    probe_rows = [r for r in read_rows(root / "probe") if "reward/mean" in r] if (root / "probe").exists() else []
    if probe_rows:
        probe = {name: _mean(probe_rows, key) for name, key in TRAIN_KEYS.items()}
        med = [m for m in (_median_abs_log_w(r) for r in probe_rows) if m is not None]
        probe["median_abs_log_w"] = sum(med) / len(med) if med else None
        probe["steps"] = len(probe_rows)
        probe["wall_time_s"] = probe_rows[-1].get("perf/elapsed_s")
    reeval_path = root / "reeval.json"
    warm = json.loads(reeval_path.read_text()).get("warmup") if reeval_path.exists() else None
    results = REPO / "benchmarks" / "results" / study.results
    results.write_text(
        json.dumps(
            {
                "command": "python benchmarks/adaptive_lm.py run"
                + (f" --study {study.name}" if study.name != "mixed" else "")
                + (" --baselines" if args.baselines else "")
                + (f" --seeds {args.seeds}" if args.seeds != "0,1" else ""),
                "common": study.common(),
                "warmup_stages": [list(stage) for stage in study.warmup],
                "probe": probe,
                "warmup_accuracy_512": warm,
                "cells": cells,
                "summary": summary,
            },
            indent=1,
        )
    )
    img = REPO / "docs" / "img"
    for name in ("accuracy_vs_n.png", "reward_curves.png", "diagnostics_N64.png", "diagnostics_N16.png"):
        if (out / name).exists():
            copy_small(out / name, img / f"{study.image_prefix}{name}")
    reeval_path = root / "reeval.json"
    warm = json.loads(reeval_path.read_text()).get("warmup") if reeval_path.exists() else None
    if warm:
        print(
            f"warm-up weights on the {REEVAL_PROMPTS} prompts: greedy {warm['greedy']:.3f}, sampled {warm['sampled']:.3f}"
        )
    starts = sorted({c["start_accuracy"] for c in cells})
    print(f"in-run step-0 accuracy on 128 prompts: {starts}")
    wall = [c.get("wall_time_s") for c in cells if c.get("wall_time_s")]
    print(
        text,
        "",
        targets(summary),
        "",
        quarters(out, cells),
        "",
        f"cells: {len(cells)}, summed run time {sum(wall) / 60:.1f} min",
        sep="\n",
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("probe", cmd_probe), ("run", cmd_run), ("reeval", cmd_reeval), ("report", cmd_report)):
        p = sub.add_parser(name)
        p.add_argument("--study", choices=sorted(STUDIES), default="mixed", help="which tier-2 setting")
        p.add_argument(
            "--root", help="directory of the sweep, outside the repo (default: /work/runs/adaptive_lm/STUDY)"
        )
        p.add_argument("--jobs", type=int, default=1, help="run: cells in parallel, one thread each")
        p.add_argument("--baselines", action="store_true", help="also gspo, cispo and topr at N = 16 and 64")
        p.add_argument(
            "--seeds", default="0,1", help="run/report: comma-separated seeds (N = 1 runs the first one only)"
        )
        p.add_argument("--n", type=int, default=64, help="probe: staleness of the probe run")
        p.add_argument("--steps", type=int, default=32, help="probe: optimizer steps of the probe run")
        p.add_argument("--weights", help="probe: start weights (default: the sweep's warm-up)")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    if args.root is None:
        args.root = f"/work/runs/adaptive_lm/{args.study}"
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
