"""vespo_adaptive against every baseline on simulator settings the main sweeps do not use.

    OMP_NUM_THREADS=1 python benchmarks/adaptive_variants.py            # ~20 CPU-minutes, 1 core
    OMP_NUM_THREADS=1 python benchmarks/adaptive_variants.py --quick    # CI-sized (seconds)

The tier-1 simulator (benchmarks/lib/simulator.py) changed one way at a time, so that a loss tuned
on the main settings (8 keys, autoregressive context, V = 8, init_scale 4, lr 0.007) meets a regime it
was not tuned on: no context (the easy case for token-level losses), dense reward (32 keys, all
needed), sparse reward (2 keys in 256 tokens, as when only a final answer is checked), a flat
initial policy (init_scale 1), a 3x learning rate, and a larger vocabulary (V = 32). Each at
N in {16, 64}, 256 optimizer steps of 64 responses, on the **tuning seeds** 100-104. Rows:
``vespo_adaptive`` (the default, with the per-token remainder), ``vespo_adaptive`` with
``remainder='none'`` (its first version) and with ``tau=0.9`` (the default until 2026-12-07), and the
baselines of the main sweep.

Writes ``benchmarks/results/adaptive_variants.json`` (saved after every run; an interrupted run
resumes from it; a JSON of another configuration is refused) and the generated block of
docs/adaptive.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.simulator import TaskSpec, make_task, train  # noqa: E402
from benchmarks.simulator import (  # noqa: E402
    ADAPTIVE_BASELINES,
    ADAPTIVE_DOC,
    append_run,
    ms,
    paired_difference,
    replace_generated_block,
    resume_results,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "adaptive_variants.json"
COMMAND = "benchmarks/adaptive_variants.py"

#: label -> (TaskSpec fields, learning rate); one change from the main settings each
SETTINGS: dict[str, tuple[dict[str, Any], float]] = {
    "no context, T=256": ({"length": 256, "context": "none"}, 0.007),
    "dense reward (32 keys), T=256": ({"length": 256, "keys": 32}, 0.007),
    "sparse reward (2 keys), T=256": ({"length": 256, "keys": 2}, 0.007),
    "flat initial policy (scale 1), T=256": ({"length": 256, "init_scale": 1.0}, 0.007),
    "lr 0.02 (3x), T=256": ({"length": 256}, 0.02),
    "vocabulary 32, T=128": ({"length": 128, "vocab": 32}, 0.007),
}
#: row label -> (registered loss, parameters); the first is the one every difference is taken for
LOSSES: dict[str, tuple[str, dict[str, Any]]] = {
    "vespo_adaptive": ("vespo_adaptive", {}),
    "vespo_adaptive, remainder none": ("vespo_adaptive", {"remainder": "none"}),
    "vespo_adaptive, tau 0.9": ("vespo_adaptive", {"tau": 0.9}),
    **{name: (name, {}) for name in ADAPTIVE_BASELINES},
}


def config(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(settings=["sparse reward (2 keys), T=256"], ns=[4], steps=4, seeds=[100, 101], quick=True, t=16)
    return dict(settings=list(SETTINGS), ns=[16, 64], steps=256, seeds=[100, 101, 102, 103, 104])


def _spec(cfg: dict[str, Any], setting: str) -> tuple[TaskSpec, float]:
    fields, lr = SETTINGS[setting]
    if cfg.get("quick"):
        fields = {**fields, "length": cfg["t"], "keys": min(fields.get("keys", 8), cfg["t"])}
    return TaskSpec(**fields), lr


def run(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """Every (setting, N, loss) run, saved after each one; runs already in ``out`` are kept."""
    results = resume_results(out, cfg)
    done = {(r["setting"], r["N"], r["label"]) for r in results["runs"]}
    jobs = [(s, n, label) for s in cfg["settings"] for n in cfg["ns"] for label in LOSSES]
    todo = [j for j in jobs if j not in done]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already in {out}", flush=True)
    for i, (setting, n, label) in enumerate(todo, 1):
        loss, params = LOSSES[label]
        spec, lr = _spec(cfg, setting)
        task = make_task(spec, cfg["seeds"])
        t0, c0 = time.perf_counter(), time.process_time()
        res = train(
            loss,
            task,
            n_stale=n,
            steps=cfg["steps"],
            lr=lr,
            loss_params=params,
            eval_every=max(1, cfg["steps"] // 4),
            sample_seed=1234,
        )
        row = dict(setting=setting, N=n, label=label, loss=loss, params=params)
        r = append_run(results, out, row, res.final(), (t0, c0))
        print(f"[{i}/{len(todo)}] {setting:38s} N={n:<3} {label:32s} J {ms(r['final'])}", flush=True)
    return results


def _get(results: dict[str, Any], setting: str, n: int, label: str) -> dict[str, Any] | None:
    return next((r for r in results["runs"] if (r["setting"], r["N"], r["label"]) == (setting, n, label)), None)


def render(results: dict[str, Any]) -> str:
    """Final J per setting, N and loss, and vespo_adaptive minus the best baseline (paired)."""
    cfg = results["config"]
    cpu = sum(r["cpu_seconds"] for r in results["runs"]) / 60
    labels = list(LOSSES)
    head = labels[0]
    lines = [
        f"Generated by `OMP_NUM_THREADS=1 python {COMMAND}` from `benchmarks/results/adaptive_variants.json`: "
        f"{len(results['runs'])} runs, {cpu:.1f} CPU-minutes. {cfg['steps']} optimizer steps of 64 responses, "
        f"tuning seeds {', '.join(map(str, cfg['seeds']))}; final exact J, mean over seeds (best in bold). The "
        f"last columns are the best baseline and `{head}` minus it, paired by seed (mean ± standard error; bold: beyond "
        "two standard errors).",
        "",
        "| setting | N | " + " | ".join(labels) + " | best baseline | difference |",
        "|---" * (len(labels) + 4) + "|",
    ]
    for setting in cfg["settings"]:
        for n in cfg["ns"]:
            rows = {label: _get(results, setting, n, label) for label in labels}
            means = {k: sum(r["final"]) / len(r["final"]) for k, r in rows.items() if r}
            if not means:
                continue
            top = max(means.values())
            cells = [
                ("**{:.3f}**" if v == top else "{:.3f}").format(v) if v is not None else "—"
                for v in (means.get(k) for k in labels)
            ]
            others = {k: v for k, v in means.items() if k in ADAPTIVE_BASELINES}
            diff = "—"
            best = max(others, key=others.get) if others else "—"
            if head in means and others:
                d, se = paired_difference(rows[head]["final"], rows[best]["final"])
                diff = f"{d:+.3f} ± {se:.3f}"
                diff = f"**{diff}**" if abs(d) > 2 * se else diff
            lines.append(f"| {setting} | {n} | " + " | ".join(cells) + f" | {best} | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (seconds); writes nothing but --out")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {OUT.relative_to(ROOT)})")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/adaptive.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out or (OUT.with_name("adaptive_variants_quick.json") if args.quick else OUT)
    results = run(config(args.quick), out)
    print(render(results))
    if not args.no_doc and not args.quick:
        replace_generated_block(ADAPTIVE_DOC, COMMAND, render(results))
        print(f"wrote {ADAPTIVE_DOC}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
