"""``vespo sweep``: a grid of training runs (methods x staleness N x seeds x any key), in parallel.

    vespo sweep --out runs/sweep --grid algorithm.loss=vespo,grpo --grid algorithm.staleness=1,4,16 \\
        --seeds 0,1,2 --jobs 2 [CONFIG.yaml] [key=value ...]

Each cell is an ordinary run directory ``OUT/cells/<name>``, trained by a ``vespo train`` process.
A cell with a ``summary.json`` is done and skipped; a cell with a checkpoint is resumed, so the
sweep itself is resumable. When the base config has a supervised warm-up, it runs once and every
cell starts from the same warmed-up weights (``model.init_from``), as the paper's runs start from
one base model. Results: ``results.json``, ``results.md`` (the paper's Table 2 layout) and plots.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vespo.train.checkpoint import latest_checkpoint, write_json_atomic
from vespo.train.config import ConfigError, load_config, parse_overrides


@dataclass
class Cell:
    name: str
    overrides: list[str]
    values: dict[str, Any]

    def run_dir(self, out: Path) -> Path:
        return out / "cells" / self.name


def split_values(raw: str) -> list[str]:
    """Split ``raw`` on the commas outside brackets and quotes.

    ``"{a: 1, b: 2},{}"`` -> ``["{a: 1, b: 2}", "{}"]``; ``'"a,b",c'`` -> ``['"a,b"', "c"]``.
    """
    parts, depth, start, quote = [], 0, 0, ""
    for i, ch in enumerate(raw):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"unbalanced brackets in grid values '{raw}'")
        elif ch == "," and depth == 0:
            parts.append(raw[start:i])
            start = i + 1
    if depth != 0 or quote:
        raise ConfigError(f"unbalanced {'quotes' if quote else 'brackets'} in grid values '{raw}'")
    parts.append(raw[start:])
    return [p.strip() for p in parts if p.strip() != ""]


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["algorithm.loss=vespo,grpo"]`` -> {"algorithm.loss": ["vespo", "grpo"]}.

    Values are YAML scalars, lists or flow mappings; commas inside brackets do not split, so
    ``algorithm.loss_params={},{length_norm: sqrt},{k_neg: 2, lambda_neg: 3}`` is a three-value axis.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid '{item}' is not of the form key=v1,v2,...")
        key, raw = item.split("=", 1)
        values = [parse_overrides([f"x={v}"])["x"] for v in split_values(raw)]
        if not values:
            raise ConfigError(f"--grid '{item}' has no values")
        grid[key.strip()] = values
    return grid


def _value_name(value: Any) -> str:
    if isinstance(value, dict):
        return "-".join(f"{k}{_value_name(v)}" for k, v in value.items()) or "default"
    if isinstance(value, list):
        return "-".join(_value_name(v) for v in value) or "none"
    return str(value)


def _short(key: str, value: Any) -> str:
    names = {"algorithm.loss": "", "algorithm.staleness": "N", "run.seed": "s"}
    prefix = names.get(key, key.split(".")[-1] + "-")
    return f"{prefix}{_value_name(value)}".replace("/", "_").replace(" ", "")


def is_section(key: str) -> bool:
    """True when ``key`` names a config section (``"algorithm"``), not a leaf (``"algorithm.loss_params"``)."""
    from pydantic import BaseModel

    from vespo.train.config import TrainConfig

    model: type[BaseModel] = TrainConfig
    for part in key.split("."):
        fields = {(f.alias or name): f for name, f in model.model_fields.items()}
        field = fields.get(part)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    return True


def _override(key: str, value: Any) -> str:
    # JSON is valid YAML, so every value (a string like "on" or "1e-4" too) parses back unchanged
    return f"{key}={json.dumps(value)}"


def cell_overrides(key: str, value: Any) -> list[str]:
    """The ``key=value`` overrides one grid value stands for.

    A mapping on a config section sets several keys together, so one axis can pair settings that
    only make sense together: ``algorithm={old_log_prob: sampler},{old_log_prob: recompute,
    correction: token_tis}`` -> ``algorithm.old_log_prob=sampler`` | ``algorithm.old_log_prob=recompute
    algorithm.correction=token_tis``. Any other value is one override.
    """
    if isinstance(value, dict) and is_section(key):
        return [_override(f"{key}.{k}", v) for k, v in value.items()]
    return [_override(key, value)]


#: longest cell directory name; longer ones are cut and get a hash of the cell's values
MAX_NAME = 120


def build_cells(grid: dict[str, list[Any]]) -> list[Cell]:
    keys = list(grid)
    cells = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        name = "_".join(_short(k, v) for k, v in values.items())
        if len(name) > MAX_NAME:  # keep directory names short and still unique
            digest = hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
            name = f"{name[: MAX_NAME - 9]}-{digest}"
        overrides = [o for k, v in values.items() for o in cell_overrides(k, v)]
        cells.append(Cell(name, overrides, values))
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.name in seen:
            raise ConfigError(
                f"two grid cells would share the run directory '{cell.name}': {seen[cell.name].values} and "
                f"{cell.values}; remove repeated values or make them distinct"
            )
        seen[cell.name] = cell
    return cells


def _train_command(config: str | None, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "vespo.cli", "train"]
    if config:
        cmd.append(config)
    return cmd + overrides


def _resume_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "vespo.cli", "train", "--resume", str(run_dir)]


def run_sweep(
    *,
    out: str | Path,
    grid: dict[str, list[Any]],
    config: str | None = None,
    overrides: list[str] | None = None,
    jobs: int = 1,
    threads_per_job: int | None = None,
    shared_warmup: bool = True,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run (or finish) every cell of ``grid``; returns the aggregated results.

    ``report_only`` trains nothing: it writes the results and plots of the cells that have
    evaluations so far (a sweep still running, or one stopped part-way).
    """
    out = Path(out)
    overrides = list(overrides or [])
    base = load_config(config, overrides)  # validate the base once, before any process starts
    cells = build_cells(grid)
    for cell in cells:  # validate every cell's combination up front: one clear error, no half sweep
        load_config(config, [*overrides, *cell.overrides])
    if report_only:
        if not out.is_dir():
            raise ValueError(f"sweep directory {out} does not exist")
        names = {c.name for c in cells}
        others = sorted(p.name for p in (out / "cells").glob("*") if p.is_dir() and p.name not in names)
        if others:
            print(
                f"[sweep] {len(others)} cell directories are not in this grid and are left out: "
                f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''}",
                flush=True,
            )
        old_failures: list[str] = []
        if (out / "results.json").exists():
            old_failures = [f for f in json.loads((out / "results.json").read_text()).get("failures", []) if f in names]
        return write_report(out, cells, failures=old_failures, base_loss=base.algorithm.loss)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads_per_job or max(1, (os.cpu_count() or 1) // max(jobs, 1))
    common = [*overrides, f"run.threads={threads}", "logging.progress=false"]

    if shared_warmup and base.warmup.steps > 0:
        warm_dir = out / "warmup"
        weights = warm_dir / "warmup" / "model.safetensors"
        if not weights.exists():
            print(f"[sweep] warm-up once for all cells -> {warm_dir}", flush=True)
            cmd = (
                [sys.executable, "-m", "vespo.cli", "warmup"]
                + ([config] if config else [])
                + [
                    *overrides,
                    f"run.out_dir={warm_dir}",
                    f"run.threads={os.cpu_count() or 1}",
                    "logging.progress=false",
                ]
            )
            subprocess.run(cmd, check=True)
        common += [f"model.init_from={weights}", "warmup.steps=0"]

    pending = []
    for cell in cells:
        run_dir = cell.run_dir(out)
        if (run_dir / "summary.json").exists():
            continue
        if latest_checkpoint(run_dir) is not None:
            pending.append((cell, _resume_command(run_dir)))
        else:
            pending.append((cell, _train_command(config, [*common, *cell.overrides, f"run.out_dir={run_dir}"])))
    total = len(pending)
    print(f"[sweep] {len(cells)} cells, {len(cells) - total} done, {total} to run, {jobs} at a time", flush=True)
    running: list[tuple[Cell, subprocess.Popen, float, IO[str]]] = []
    failures: list[str] = []
    started = time.time()
    while pending or running:
        while pending and len(running) < jobs:
            cell, cmd = pending.pop(0)
            cell.run_dir(out).parent.mkdir(parents=True, exist_ok=True)
            log = open(cell.run_dir(out).parent / f"{cell.name}.log", "a")  # noqa: SIM115 - closed when the cell ends
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            running.append((cell, proc, time.time(), log))
            print(f"[sweep] start {cell.name}", flush=True)
        time.sleep(0.5)
        for item in list(running):
            cell, proc, t0, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            done = total - len(pending) - len(running)
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {cell.name}.log)"
            if proc.returncode != 0:
                failures.append(cell.name)
            print(
                f"[sweep] {done}/{total} {cell.name}: {status} in {time.time() - t0:.0f} s "
                f"(sweep {time.time() - started:.0f} s)",
                flush=True,
            )
    results = write_report(out, cells, failures, base_loss=base.algorithm.loss)
    if failures:
        raise RuntimeError(f"{len(failures)} sweep cells failed: {', '.join(failures)}")
    return results


def write_report(out: Path, cells: list[Cell], failures: list[str], base_loss: str = "?") -> dict[str, Any]:
    """results.json, results.md and the plots of the cells that have evaluations."""
    results = collect_results(out, cells, base_loss)
    results["failures"] = failures
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(results_table(results))
    plot_sweep(out, results)
    return results


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """A cell's metrics rows (:func:`vespo.experiment.plots.read_metrics`), or none before it has written any."""
    from vespo.experiment.plots import read_metrics

    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []


def tail_mean(rows: list[dict[str, Any]], key: str) -> float | None:
    """Mean of a finite ``key`` over the last 10 % of the training steps (at least one)."""
    train = [r for r in rows if "reward/mean" in r]
    tail = train[-max(1, len(train) // 10) :]
    vals = [r[key] for r in tail if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else None


def collect_results(out: Path, cells: list[Cell], base_loss: str = "?") -> dict[str, Any]:
    """Per-cell final/best eval accuracy and diagnostics, from each run's metrics."""
    per_cell = []
    for cell in cells:
        rows = read_rows(cell.run_dir(out))
        evals = [r for r in rows if r.get("eval/accuracy") is not None]
        if not evals:
            continue
        per_cell.append(
            {
                "name": cell.name,
                "variant": variant_label(cell.values, base_loss),
                **{k: v for k, v in cell.values.items()},
                "start_accuracy": evals[0]["eval/accuracy"],
                "final_accuracy": evals[-1]["eval/accuracy"],
                "best_accuracy": max(e["eval/accuracy"] for e in evals),
                "final_step": evals[-1].get("step"),
                "done": (cell.run_dir(out) / "summary.json").exists(),
                "final_reward": tail_mean(rows, "reward/mean"),
                "abs_log_w": tail_mean(rows, "is/abs_log_w_mean"),
                "phi_mean": tail_mean(rows, "phi/mean"),
                "phi_below_001": tail_mean(rows, "phi/frac_below_0.01"),
                "clip_frac": tail_mean(rows, "loss/clip_frac"),
                "ess": tail_mean(rows, "is/ess"),
                "entropy": tail_mean(rows, "policy/entropy"),
                "response_length": tail_mean(rows, "response/length_mean"),
                "wall_time_s": rows[-1].get("perf/elapsed_s") if rows else None,
            }
        )
    return {"cells": per_cell}


#: grid keys that are axes of the results table rather than part of a method's name
TABLE_AXES = ("algorithm.staleness", "run.seed")


def variant_label(values: dict[str, Any], base_loss: str = "?") -> str:
    """The method a cell belongs to: its loss plus every grid key other than N and the seed.

    ``{"algorithm.loss": "vespo", "algorithm.loss_params": {"length_norm": "sqrt"}, "run.seed": 0}``
    -> ``"vespo loss_params-length_normsqrt"``; cells that differ only in seed share a label.
    """
    extra = [_short(k, v) for k, v in values.items() if k not in ("algorithm.loss", *TABLE_AXES)]
    return " ".join([str(values.get("algorithm.loss", base_loss)), *extra])


def _method(cell: dict[str, Any]) -> str:
    return str(cell.get("variant") or cell.get("algorithm.loss", "?"))


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def group_cells(results: dict[str, Any], metric: str) -> dict[tuple[str, Any], list[float]]:
    """{(method, N): [metric over seeds]}; a method is a loss plus any grid keys besides N and seed."""
    groups: dict[tuple[str, Any], list[float]] = {}
    for cell in results["cells"]:
        value = cell.get(metric)
        if value is None:
            continue
        key = (_method(cell), cell.get("algorithm.staleness", "?"))
        groups.setdefault(key, []).append(float(value))
    return groups


def results_table(results: dict[str, Any]) -> str:
    """Markdown in the layout of the paper's Table 2: one row per (N, method).

    Rows with a cell still running (or stopped) are marked ``*``: their "final" is the last
    evaluation so far.
    """
    final = group_cells(results, "final_accuracy")
    best = group_cells(results, "best_accuracy")
    start = group_cells(results, "start_accuracy")
    phi_low = group_cells(results, "phi_below_001")
    unfinished = {(_method(c), c.get("algorithm.staleness", "?")) for c in results["cells"] if c.get("done") is False}
    lines = [
        "| N | method | seeds | start acc | final acc (mean ± std) | best acc (mean ± std) | phi<0.01 share |",
        "|---|---|---|---|---|---|---|",
    ]
    for loss, n in sorted(final, key=lambda k: (float(k[1]) if isinstance(k[1], (int, float)) else 0, k[0])):
        fm, fs = mean_std(final[(loss, n)])
        bm, bs = mean_std(best[(loss, n)])
        sm, _ = mean_std(start[(loss, n)])
        pl = phi_low.get((loss, n))
        pl_text = f"{mean_std(pl)[0]:.2f}" if pl else "-"
        mark = "*" if (loss, n) in unfinished else ""
        lines.append(
            f"| {n} | {loss}{mark} | {len(final[(loss, n)])} | {sm:.3f} | {fm:.3f} ± {fs:.3f} | {bm:.3f} ± {bs:.3f} | {pl_text} |"
        )
    if unfinished:
        lines.append("\n\\* a run of this row has not finished: its final accuracy is its last evaluation so far.")
    return "\n".join(lines) + "\n"


def plot_sweep(out: Path, results: dict[str, Any]) -> list[Path]:
    """reward curves (one panel per method, one line per N) and final accuracy vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vespo.experiment.plots import save_figure

    cells = results["cells"]
    if not cells:
        return []
    methods = sorted({_method(c) for c in cells})
    staleness = sorted({c.get("algorithm.staleness") for c in cells}, key=lambda v: float(v) if v is not None else 0)
    paths = []
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, method in zip(axes[0], methods):
        for i, n in enumerate(staleness):
            curves = [
                read_rows(out / "cells" / c["name"])
                for c in cells
                if _method(c) == method and c.get("algorithm.staleness") == n
            ]
            curves = [[r for r in rows if "reward/mean" in r] for rows in curves]
            curves = [c for c in curves if c]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            mean = [sum(c[j]["reward/mean"] for c in curves) / len(curves) for j in range(length)]
            window = max(1, length // 25)
            smooth = [
                sum(mean[max(0, j - window + 1) : j + 1]) / len(mean[max(0, j - window + 1) : j + 1])
                for j in range(length)
            ]
            ax.plot(
                [curves[0][j]["step"] for j in range(length)],
                smooth,
                color=cmap(i / max(1, len(staleness) - 1)),
                label=f"N={n}",
            )
        ax.set_title(method, fontsize=9 if len(method) > 20 else 11)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training reward (mean over seeds)")
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=8)
    paths.append(save_figure(fig, out / "reward_curves.png"))

    final = group_cells(results, "final_accuracy")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        ns = [n for n in staleness if (method, n) in final]
        if not ns:
            continue
        stats = [mean_std(final[(method, n)]) for n in ns]
        ax.errorbar(
            [float(n) for n in ns],
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            marker="o",
            capsize=3,
            label=method,
            linewidth=2.5 if method == "vespo" else 1.2,
        )
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)  # accuracy: a std bar below 0 says "collapsed in some seeds", not less than 0
    ax.set_xlabel("staleness N (mini-batches per rollout batch)")
    ax.set_ylabel("final eval accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, out / "accuracy_vs_n.png"))
    paths += plot_diagnostics(out, results)
    return paths


def plot_diagnostics(out: Path, results: dict[str, Any]) -> list[Path]:
    """Per N, every method's diagnostics (|log W|, phi mass, ESS, clip fraction, entropy, length ...).

    One run per method (its lowest seed) so the curves stay readable: ``diagnostics_N<n>.png``.
    """
    from vespo.experiment.plots import plot_runs

    paths = []
    for n in sorted(
        {c.get("algorithm.staleness") for c in results["cells"]}, key=lambda v: float(v) if v is not None else 0
    ):
        chosen: dict[str, dict[str, Any]] = {}
        for cell in results["cells"]:
            if cell.get("algorithm.staleness") != n:
                continue
            method = _method(cell)
            if method not in chosen or cell.get("run.seed", 0) < chosen[method].get("run.seed", 0):
                chosen[method] = cell
        if not chosen:
            continue
        methods = sorted(chosen)
        suffix = f"N{n}" if n is not None else "all"
        paths.append(
            plot_runs(
                [out / "cells" / chosen[m]["name"] for m in methods], out / f"diagnostics_{suffix}.png", labels=methods
            )
        )
    return paths
