"""Tier-1 staleness benchmark on the sequence-level simulator (benchmarks/lib/simulator.py).

    OMP_NUM_THREADS=1 python benchmarks/simulator.py            # full run (~10-15 min, 1 core)
    OMP_NUM_THREADS=1 python benchmarks/simulator.py --quick    # CI-sized (seconds)
    python benchmarks/simulator.py --from-json benchmarks/results/simulator.json   # plots + doc only

Parts (``--parts``, default all):

- ``tune``: learning rate on a grid, on-policy (N = 1, no mismatch), on tuning seeds that are not
  the evaluation seeds; criterion = mean exact reward over the learning curve. The chosen lr is
  kept for every loss, N and setting.
- ``main``: learning curves of every loss at N in {1, 4, 16, 64}, with and without a
  sampler/trainer mismatch, equal total samples for every N.
- ``ablation``: VESPO length normalisation, symmetric (c1, c2), and a scale sweep of (c1, c2).
- ``tsweep``: response length T (32 and 256 next to the main 128).
- ``context``: the same comparison with a context-free policy (independent positions).
- ``entropy``: the same comparison with a high-entropy initial policy (init_scale 1).
- ``lr``: the same comparison at a quarter of the tuned learning rate (smaller drift per step).
  These four "sensitivity" parts run the core losses and TOPR at N = 64, VESPO and CISPO at N = 4.
- ``mismatch_fix``: where the ratio is taken when the sampler differs (pi_old, mu, token TIS).
- ``gradient``: bias and variance of each loss's mini-batch gradient against the exact grad J, as
  functions of T and of the staleness k of the data.

Writes ``benchmarks/results/simulator.json`` (``--out``), ``docs/img/sim_*.png`` and
``docs/results_simulator.md``. Every number in the doc is read from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.simulator import Mismatch, PolicySpec, TaskSpec, gradient_study, make_task, train  # noqa: E402
from vespo.train.checkpoint import write_text_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "simulator.json"
DEFAULT_IMG = ROOT / "docs" / "img"
DEFAULT_DOC = ROOT / "docs" / "results_simulator.md"
ALL_PARTS = ("tune", "main", "ablation", "tsweep", "context", "entropy", "lr", "mismatch_fix", "gradient")
BASELINES = ("grpo", "gspo", "sapo", "cispo", "reinforce", "topr")

#: losses of the gradient study: label -> (registered loss, parameters)
STUDY_LOSSES: dict[str, tuple[str, dict[str, Any]]] = {
    "reinforce": ("reinforce", {}),  # no ratio at all
    "seq_is": ("seq_clip", {"clip": 1e8}),  # the true product W, unclipped (unbiased)
    "tok_is": ("cispo", {"eps_high": 1e8}),  # per-token rho_t, unclipped (App. A first order)
    "vespo": ("vespo", {}),
    "grpo": ("grpo", {}),
    "gspo": ("gspo", {}),
    "sapo": ("sapo", {}),
    "cispo": ("cispo", {}),
    "topr": ("topr", {}),
}


@dataclass
class Config:
    """Everything a benchmark run depends on (stored in the JSON)."""

    spec: TaskSpec = field(default_factory=TaskSpec)
    policy: PolicySpec = field(default_factory=PolicySpec)
    steps: int = 512
    eval_every: int = 32
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    tune_seeds: tuple[int, ...] = (100, 101, 102, 103, 104)
    lr_grid: tuple[float, ...] = (0.003, 0.005, 0.007, 0.01)
    tune_losses: tuple[str, ...] = ("vespo", "grpo")
    ns: tuple[int, ...] = (1, 4, 16, 64)
    losses: tuple[str, ...] = ("vespo", "grpo", "gspo", "sapo", "cispo", "reinforce", "topr")
    core: tuple[str, ...] = ("vespo", "grpo", "gspo", "sapo", "cispo")
    mismatch: Mismatch = field(default_factory=lambda: Mismatch("noise", 0.1))
    mismatch_losses: tuple[str, ...] = ("vespo", "grpo", "gspo", "sapo", "cispo")
    ablation_ns: tuple[int, ...] = (64,)
    c_scales: tuple[float, ...] = (0.5, 2.0, 4.0)
    c_sweep_ns: tuple[int, ...] = (16, 64)
    sens_losses: tuple[str, ...] = ("vespo", "grpo", "gspo", "sapo", "cispo", "topr")
    sens_n: int = 64  # sensitivity parts: every loss of sens_losses at this N ...
    sens_ref_n: int = 4  # ... and these losses at this N (for the N = 64 / N = 4 ratio)
    sens_ref_losses: tuple[str, ...] = ("vespo", "cispo")
    t_values: tuple[int, ...] = (32, 256)
    entropy_scale: float = 1.0
    lr_factor: float = 0.25
    fix_ns: tuple[int, ...] = (64,)
    study_t: tuple[int, ...] = (8, 32, 128, 256)
    study_k: tuple[int, ...] = (4, 16)
    study_k_extra: tuple[int, ...] = (1, 64)  # at the main T only
    study_batches: int = 384
    study_chunk: int = 128
    lr: float | None = None  # set by ``tune`` (or by hand)
    quick: bool = False


def full_config() -> Config:
    return Config()


def quick_config(losses: tuple[str, ...] = ("vespo", "grpo"), ns: tuple[int, ...] = (1, 4)) -> Config:
    """A CI-sized configuration: short responses, few steps, two seeds."""
    spec = TaskSpec(length=16, keys=4, prompts=4, group_size=4)
    return Config(
        spec=spec,
        policy=PolicySpec("mlp", embed=8, hidden=16),
        steps=16,
        eval_every=4,
        seeds=(0, 1),
        tune_seeds=(100,),
        lr_grid=(0.005, 0.01),
        tune_losses=losses[:1],
        ns=ns,
        losses=losses,
        core=losses,
        mismatch_losses=losses,
        ablation_ns=ns[-1:],
        c_scales=(2.0,),
        c_sweep_ns=ns[-1:],
        sens_losses=losses,
        sens_n=ns[-1],
        sens_ref_n=ns[0],
        sens_ref_losses=losses[:1],
        t_values=(8,),
        fix_ns=ns[-1:],
        study_t=(8, 16),
        study_k=(2,),
        study_k_extra=(),
        study_batches=64,
        study_chunk=32,
        quick=True,
    )


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _finite_mean(xs: list[float]) -> float | None:
    ys = [x for x in xs if x == x]
    return statistics.fmean(ys) if ys else None


def run_one(
    cfg: Config,
    experiment: str,
    loss: str,
    n: int,
    *,
    lr: float,
    label: str | None = None,
    spec: TaskSpec | None = None,
    mismatch: Mismatch | None = None,
    is_source: str | None = None,
    loss_params: dict[str, Any] | None = None,
    seeds: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Train one configuration over the seeds and summarise it as a JSON-ready record."""
    spec = spec or cfg.spec
    mm = mismatch or Mismatch()
    src = is_source or ("sampler" if mm.kind != "none" else "trainer")
    seeds = seeds or cfg.seeds
    task = make_task(spec, seeds)
    res = train(
        loss,
        task,
        n_stale=n,
        steps=cfg.steps,
        lr=lr,
        policy=cfg.policy,
        mismatch=mm,
        is_source=src,
        loss_params=loss_params,
        eval_every=cfg.eval_every,
        sample_seed=1234,
    )
    rewards = res.reward
    rec = {
        "experiment": experiment,
        "label": label or loss,
        "loss": loss,
        "params": loss_params or {},
        "n": n,
        "T": spec.length,
        "init_scale": spec.init_scale,
        "mismatch": mm.kind,
        "mismatch_scale": mm.scale,
        "is_source": src,
        "lr": lr,
        "seeds": list(seeds),
        "final": [round(x, 5) for x in res.final()],
        "best": [round(x, 5) for x in res.best()],
        "auc": [round(x, 5) for x in res.auc()],
        "eval_steps": res.eval_steps,
        "curve_mean": [round(_mean(r), 4) for r in rewards],
        "curve_std": [round(_std(r), 4) for r in rewards],
        "entropy_final": round(_mean(res.entropy[-1]), 4),
        "metrics": {k: _finite_mean(v) for k, v in res.metrics.items()},
        "metrics_by_staleness": {
            k: [None if x != x else round(x, 4) for x in v]
            for k, v in res.metrics_by_staleness.items()
            if k
            in (
                "phi/frac_below_0.01",
                "is/abs_log_w_mean",
                "phi/mean",
                "vespo_adaptive/alpha_pos",
                "vespo_adaptive/alpha_neg",
                "phi/ess_pos_before",
                "phi/ess_pos_after",
            )
            and loss in ("vespo", "vespo_adaptive")
            and experiment in ("main", "adaptive_fixed", "adaptive_variable")
        },
        "min_length": spec.min_length,
        "grad_norm_max": max(res.grad_norm),
        "seconds": round(res.seconds, 2),
        "cpu_seconds": round(res.cpu_seconds, 2),
        "context": spec.context,
    }
    return rec


def _log(msg: str) -> None:
    print(msg, flush=True)


def _fmt_run(r: dict[str, Any]) -> str:
    return (
        f"  {r['experiment']:<12} {r['label']:<14} N={r['n']:<3} T={r['T']:<4} mm={r['mismatch']:<5} "
        f"final {_mean(r['final']):.3f}±{_std(r['final']):.3f}  best {_mean(r['best']):.3f}  "
        f"phi<.01 {r['metrics'].get('phi/frac_below_0.01') or 0:.3f}  ({r['seconds']:.1f}s, cpu {r['cpu_seconds']:.1f}s)"
    )


def tune(cfg: Config) -> dict[str, Any]:
    """Grid over lr at N = 1 (no mismatch) on the tuning seeds; returns the grid and the choice."""
    grid = []
    for loss in cfg.tune_losses:
        for lr in cfg.lr_grid:
            r = run_one(cfg, "tune", loss, 1, lr=lr, seeds=cfg.tune_seeds)
            grid.append(
                {
                    "loss": loss,
                    "lr": lr,
                    "auc": _mean(r["auc"]),
                    "final": _mean(r["final"]),
                    "auc_seeds": r["auc"],
                    "final_seeds": r["final"],
                    "seconds": r["seconds"],
                }
            )
            _log(f"  tune {loss:<8} lr={lr:<6g} auc {_mean(r['auc']):.4f} final {_mean(r['final']):.4f}")
    chosen = {}
    for loss in cfg.tune_losses:
        rows = [g for g in grid if g["loss"] == loss]
        chosen[loss] = max(rows, key=lambda g: g["auc"])["lr"]
    lr = chosen[cfg.tune_losses[0]]
    return {"grid": grid, "chosen_per_loss": chosen, "lr": lr, "criterion": "mean exact J over the curve"}


def ablation_configs(cfg: Config) -> list[tuple[str, dict[str, Any]]]:
    """VESPO variants: (label, loss params)."""
    out: list[tuple[str, dict[str, Any]]] = [
        ("len_sqrt", {"length_norm": "sqrt"}),
        ("len_linear", {"length_norm": "linear"}),
        ("sym_c+(2,3)", {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 2.0, "lambda_neg": 3.0}),
        ("sym_c-(3,2)", {"k_pos": 3.0, "lambda_pos": 2.0, "k_neg": 3.0, "lambda_neg": 2.0}),
    ]
    for s in cfg.c_scales:
        out.append((f"c_x{s:g}", {"k_pos": 2.0 * s, "lambda_pos": 3.0 * s, "k_neg": 3.0 * s, "lambda_neg": 2.0 * s}))
    return out


def gradient_part(cfg: Config, lr: float) -> list[dict[str, Any]]:
    """Bias/variance rows: one per (T, k, loss)."""
    rows = []
    todo = [(t, k) for t in cfg.study_t for k in cfg.study_k]
    todo += [(cfg.spec.length, k) for k in cfg.study_k_extra]
    todo += [(t, 0) for t in cfg.study_t]  # on-policy reference (all losses coincide at k = 0)
    for t, k in todo:
        spec = replace(cfg.spec, length=t, keys=min(cfg.spec.keys, t))
        losses = STUDY_LOSSES if k > 0 else {"reinforce": STUDY_LOSSES["reinforce"]}
        t0 = time.perf_counter()
        res = gradient_study(
            losses,
            spec,
            policy=cfg.policy,
            drift_steps=k,
            drift_lr=lr,
            n_batches=cfg.study_batches,
            chunk=cfg.study_chunk,
            seed=0,
        )
        for label, st in res.stats.items():
            row = {
                "T": t,
                "k": k,
                "loss": label,
                "token_kl": res.token_kl,
                "reward_mu": res.reward_mu,
                "reward_pi": res.reward_pi,
                "num_params": res.num_params,
            }
            row.update({key: val for key, val in asdict(st).items() if key != "metrics"})
            row["phi_frac_below_0.01"] = st.metrics.get("phi/frac_below_0.01")
            row["abs_log_w_mean"] = st.metrics.get("is/abs_log_w_mean")
            row["ess_w"] = st.metrics.get("is/ess")  # normalised ESS of the true W over the pooled batches
            rows.append(row)
        _log(f"  gradient T={t:<4} k={k:<3} KL/token {res.token_kl:.4f}  ({time.perf_counter() - t0:.1f}s)")
    return rows


def run(cfg: Config, parts: tuple[str, ...] = ALL_PARTS, save_to: Path | None = None) -> dict[str, Any]:
    """Run the requested parts; returns the JSON-ready results (also saved after each part)."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    results: dict[str, Any] = {"config": _config_dict(cfg), "runs": [], "gradient": [], "timing": {}}
    lr = cfg.lr
    if "tune" in parts or lr is None:
        t0, c0 = time.perf_counter(), time.process_time()
        _log("[tune]")
        results["tune"] = tune(cfg)
        lr = results["tune"]["lr"]
        results["timing"]["tune"] = time.perf_counter() - t0
        results["timing"]["tune_cpu"] = time.process_time() - c0
    results["lr"] = lr
    assert lr is not None

    def do(part: str, jobs: list[dict[str, Any]]) -> None:
        if part not in parts:
            return
        _log(f"[{part}]")
        t0 = time.perf_counter()
        for job in jobs:
            job = dict(job)
            rec = run_one(cfg, part, lr=job.pop("lr", lr), **job)
            results["runs"].append(rec)
            _log(_fmt_run(rec))
        results["timing"][part] = time.perf_counter() - t0
        results["timing"][part + "_cpu"] = sum(r["cpu_seconds"] for r in results["runs"] if r["experiment"] == part)
        if save_to is not None:
            save(results, save_to)

    main_jobs = [dict(loss=loss, n=n) for loss in cfg.losses for n in cfg.ns]
    main_jobs += [dict(loss=loss, n=n, mismatch=cfg.mismatch) for loss in cfg.mismatch_losses for n in cfg.ns]
    do("main", main_jobs)
    abl = [
        dict(loss="vespo", n=n, label=label, loss_params=params)
        for label, params in ablation_configs(cfg)
        for n in cfg.ablation_ns
    ]
    abl += [
        dict(loss="vespo", n=n, label=label, loss_params=params)
        for label, params in ablation_configs(cfg)
        if label.startswith("c_x")
        for n in cfg.c_sweep_ns
        if n not in cfg.ablation_ns
    ]
    do("ablation", abl)

    def sensitivity(**kw: Any) -> list[dict[str, Any]]:
        jobs = [dict(loss=loss, n=cfg.sens_n, **kw) for loss in cfg.sens_losses]
        return jobs + [dict(loss=loss, n=cfg.sens_ref_n, **kw) for loss in cfg.sens_ref_losses]

    do(
        "tsweep",
        [
            job
            for t in cfg.t_values
            for job in sensitivity(spec=replace(cfg.spec, length=t, keys=min(cfg.spec.keys, t)))
        ],
    )
    do("context", sensitivity(spec=replace(cfg.spec, context="none")))
    do("entropy", sensitivity(spec=replace(cfg.spec, init_scale=cfg.entropy_scale)))
    do("lr", sensitivity(lr=lr * cfg.lr_factor))
    do(
        "mismatch_fix",
        [
            dict(loss=loss, n=n, mismatch=cfg.mismatch, is_source=src, label=f"{loss}/{src}")
            for loss in ("vespo", "grpo")
            for src in ("trainer", "tis")
            for n in cfg.fix_ns
        ],
    )
    if "gradient" in parts:
        _log("[gradient]")
        t0, c0 = time.perf_counter(), time.process_time()
        results["gradient"] = gradient_part(cfg, lr)
        results["timing"]["gradient"] = time.perf_counter() - t0
        results["timing"]["gradient_cpu"] = time.process_time() - c0
    results["timing"]["total"] = time.perf_counter() - t_start
    results["timing"]["total_cpu"] = time.process_time() - cpu_start
    return results


def _config_dict(cfg: Config) -> dict[str, Any]:
    d = asdict(cfg)
    d["spec"], d["policy"], d["mismatch"] = asdict(cfg.spec), asdict(cfg.policy), asdict(cfg.mismatch)
    return d


def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(x: Any) -> Any:
        if isinstance(x, float):
            return None if not math.isfinite(x) else float(f"{x:.5g}")
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    write_text_atomic(path, json.dumps(clean(results), separators=(",", ":")) + "\n")  # a kill keeps the last save


# ---------------------------------------------------------------------------------------------
# Summaries (every comparison is against a baseline from the same JSON)
# ---------------------------------------------------------------------------------------------


def runs_of(results: dict[str, Any], experiment: str, **match: Any) -> list[dict[str, Any]]:
    out = []
    for r in results["runs"]:
        if r["experiment"] != experiment:
            continue
        if all(r.get(k) == v for k, v in match.items()):
            out.append(r)
    return out


def one(results: dict[str, Any], experiment: str, **match: Any) -> dict[str, Any] | None:
    rs = runs_of(results, experiment, **match)
    return rs[0] if rs else None


def ms(xs: list[float], digits: int = 3) -> str:
    return f"{_mean(xs):.{digits}f} ± {_std(xs):.{digits}f}"


def targets(results: dict[str, Any], mismatch: str = "none") -> dict[str, Any]:
    """The issue's targets on the final exact reward, mean over seeds."""
    cfg = results["config"]
    out: dict[str, Any] = {"mismatch": mismatch}
    v4 = one(results, "main", loss="vespo", n=4, mismatch=mismatch)
    v64 = one(results, "main", loss="vespo", n=64, mismatch=mismatch)
    if v4 and v64:
        out["vespo_ratio_64_4"] = _mean(v64["final"]) / _mean(v4["final"])
        out["ratio_ok"] = out["vespo_ratio_64_4"] >= 0.9
    rows = []
    for n in cfg["ns"]:
        if n < 16:
            continue
        v = one(results, "main", loss="vespo", n=n, mismatch=mismatch)
        if v is None:
            continue
        for r in runs_of(results, "main", n=n, mismatch=mismatch):
            if r["loss"] == "vespo":
                continue
            diff = [a - b for a, b in zip(v["final"], r["final"])]  # paired: same seeds, same init
            rows.append(
                {
                    "n": n,
                    "baseline": r["loss"],
                    "diff_mean": _mean(diff),
                    "diff_std": _std(diff),
                    "ok": _mean(diff) >= 0,
                }
            )
    out["vs_baselines"] = rows
    out["all_ok"] = bool(rows) and all(r["ok"] for r in rows)
    return out


def print_summary(results: dict[str, Any]) -> None:
    cfg = results["config"]
    print("\nFinal exact reward J (mean ± std over seeds); ratio = J(N) / J(N=1) of the same loss")
    for mm in ("none", cfg["mismatch"]["kind"]):
        rows = runs_of(results, "main", mismatch=mm)
        if not rows:
            continue
        print(f" mismatch={mm}")
        for loss in dict.fromkeys(r["loss"] for r in rows):
            base = one(results, "main", loss=loss, n=1, mismatch=mm)
            cells = []
            for n in cfg["ns"]:
                r = one(results, "main", loss=loss, n=n, mismatch=mm)
                if r is None:
                    continue
                ratio = _mean(r["final"]) / _mean(base["final"]) if base else float("nan")
                cells.append(f"N={n}: {ms(r['final'])} (x{ratio:.2f})")
            print(f"  {loss:<10} " + "  ".join(cells))
        t = targets(results, mm)
        if "vespo_ratio_64_4" in t:
            print(
                f"  target VESPO J(64)/J(4) >= 0.90: {t['vespo_ratio_64_4']:.3f} -> {'met' if t['ratio_ok'] else 'NOT met'}"
            )
        for row in t["vs_baselines"]:
            print(
                f"  VESPO - {row['baseline']:<9} at N={row['n']:<3}: {row['diff_mean']:+.3f} ± {row['diff_std']:.3f} "
                f"(paired over seeds) -> {'ok' if row['ok'] else 'VESPO behind'}"
            )


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

COLORS = {
    "vespo": "tab:red",
    "grpo": "tab:blue",
    "gspo": "tab:green",
    "sapo": "tab:orange",
    "cispo": "tab:purple",
    "reinforce": "tab:gray",
    "topr": "tab:brown",
    "seq_is": "black",
    "tok_is": "tab:cyan",
}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def plot_curves(results: dict[str, Any], path: Path, mismatch: str) -> None:
    plt = pyplot()
    rows = runs_of(results, "main", mismatch=mismatch)
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    ns = results["config"]["ns"]
    cols = len(losses) if len(losses) <= 5 else 4
    nrows = math.ceil(len(losses) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.9 * nrows), sharex=True, sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, loss in zip(axes.flat, losses):
        for i, n in enumerate(ns):
            r = one(results, "main", loss=loss, n=n, mismatch=mismatch)
            if r is None:
                continue
            x = r["eval_steps"]
            m, s = r["curve_mean"], r["curve_std"]
            c = cmap(i / max(1, len(ns) - 1) * 0.9)
            ax.plot(x, m, color=c, label=f"N={n}", lw=1.6)
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=c, alpha=0.15)
        ax.set_title(loss, fontweight="bold" if loss == "vespo" else None)
        ax.set_ylim(0, 1)
    for ax in axes.flat[len(losses) :]:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[: len(losses)]):
        if i + cols >= len(losses):  # lowest panel of its column: show the step axis
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("optimizer step")
    for ax in axes[:, 0]:
        ax.set_ylabel("exact reward J")
    axes.flat[0].legend(loc="upper left", fontsize=8)
    title = (
        "no mismatch"
        if mismatch == "none"
        else f"sampler mismatch ({mismatch} {results['config']['mismatch']['scale']}, W vs mu)"
    )
    fig.suptitle(
        f"Learning curves by staleness N (T={results['config']['spec']['length']}, mean ± std over "
        f"{len(results['config']['seeds'])} seeds; {title})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_final_vs_n(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    cfg = results["config"]
    mms = [m for m in ("none", cfg["mismatch"]["kind"]) if runs_of(results, "main", mismatch=m)]
    fig, axes = plt.subplots(1, len(mms), figsize=(5.6 * len(mms), 3.9), sharey=True, squeeze=False)
    for ax, mm in zip(axes[0], mms):
        rows = runs_of(results, "main", mismatch=mm)
        for loss in dict.fromkeys(r["loss"] for r in rows):
            pts = [one(results, "main", loss=loss, n=n, mismatch=mm) for n in cfg["ns"]]
            pts = [p for p in pts if p]
            ax.errorbar(
                [p["n"] for p in pts],
                [_mean(p["final"]) for p in pts],
                yerr=[_std(p["final"]) for p in pts],
                label=loss,
                color=COLORS.get(loss),
                marker="o",
                capsize=3,
                lw=2.2 if loss == "vespo" else 1.3,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg["ns"], [str(n) for n in cfg["ns"]])
        ax.set_xlabel("staleness N (mini-batches per rollout)")
        ax.set_title("no mismatch" if mm == "none" else f"with sampler mismatch ({mm})")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"final exact reward J (step {cfg['steps']})")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_gradient(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = results["gradient"]
    ks = sorted({r["k"] for r in rows if r["k"] > 0 and len({x["T"] for x in rows if x["k"] == r["k"]}) > 1})
    metrics = [
        ("cosine_debiased", "cos(E g, grad J)", False),
        ("rel_bias_debiased", "||E g - grad J|| / ||grad J||", True),
        ("rel_var", "tr Cov(g) / ||grad J||^2", True),
        ("scale", "<E g, grad J> / ||grad J||^2", False),
    ]
    fig, axes = plt.subplots(len(ks), len(metrics), figsize=(4.0 * len(metrics), 3.1 * len(ks)), squeeze=False)
    labels = list(dict.fromkeys(r["loss"] for r in rows if r["k"] > 0))
    for i, k in enumerate(ks):
        for j, (key, name, logy) in enumerate(metrics):
            ax = axes[i][j]
            for label in labels:
                pts = sorted([r for r in rows if r["k"] == k and r["loss"] == label], key=lambda r: r["T"])
                # a debiased bias of 0 means "below the Monte-Carlo noise floor": not drawn on a log axis
                ys = [float("nan") if r[key] is None or (logy and r[key] <= 0) else r[key] for r in pts]
                ax.plot(
                    [r["T"] for r in pts],
                    ys,
                    marker="o",
                    ms=3,
                    color=COLORS.get(label),
                    label=label,
                    lw=2.2 if label == "vespo" else 1.2,
                    ls="--" if label in ("seq_is", "tok_is", "reinforce") else "-",
                )
            if key == "rel_var":
                ref = sorted([r for r in rows if r["k"] == 0], key=lambda r: r["T"])
                ax.plot(
                    [r["T"] for r in ref], [r["rel_var"] for r in ref], color="k", lw=0.8, ls=":", label="on-policy"
                )
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            if key == "cosine_debiased":
                ax.set_ylim(-0.2, 1.05)
            ax.set_title(f"{name}\ndata k={k} steps stale", fontsize=9)
            ax.set_xlabel("response length T")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle(
        "Mini-batch gradient vs the exact gradient at pi (cos and bias debiased for Monte-Carlo noise; "
        "missing bias points are below the noise floor; per-token KL of each point in the doc's tables)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_ablation(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    cfg = results["config"]
    abl = runs_of(results, "ablation")
    if not abl:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.9))
    labels = ["vespo"] + list(dict.fromkeys(r["label"] for r in abl))
    ns = cfg["ablation_ns"]
    width = 0.8 / len(ns)
    for i, n in enumerate(ns):
        ys, es = [], []
        for lab in labels:
            r = (
                one(results, "main", loss="vespo", n=n, mismatch="none")
                if lab == "vespo"
                else one(results, "ablation", label=lab, n=n)
            )
            ys.append(_mean(r["final"]) if r else float("nan"))
            es.append(_std(r["final"]) if r else 0)
        ax1.bar([x + i * width for x in range(len(labels))], ys, width, yerr=es, capsize=2, label=f"N={n}")
    ax1.set_xticks([x + width * (len(ns) - 1) / 2 for x in range(len(labels))], labels, rotation=30, ha="right")
    ax1.set_ylabel("final exact reward J")
    ax1.set_title("VESPO ablations (default = 'vespo')")
    ax1.legend(fontsize=8)
    # c sweep: share of phi < 0.01 vs final reward
    for n in cfg["c_sweep_ns"]:
        pts = []
        for s_label, scale in [("vespo", 1.0)] + [(f"c_x{s:g}", s) for s in cfg["c_scales"]]:
            r = (
                one(results, "main", loss="vespo", n=n, mismatch="none")
                if s_label == "vespo"
                else one(results, "ablation", label=s_label, n=n)
            )
            if r:
                pts.append((scale, r["metrics"].get("phi/frac_below_0.01") or 0.0, _mean(r["final"]), _std(r["final"])))
        pts.sort()
        ax2.errorbar(
            [p[1] for p in pts], [p[2] for p in pts], yerr=[p[3] for p in pts], marker="o", capsize=3, label=f"N={n}"
        )
        for p in pts:
            ax2.annotate(f"x{p[0]:g}", (p[1], p[2]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax2.set_xlabel("share of sequences with phi < 0.01 (mean over training)")
    ax2.set_ylabel("final exact reward J")
    ax2.set_title("(c1, c2) scaled by x s for both signs")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def sensitivity_settings(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, experiment, match) of each setting compared at N = sens_n: the main one first."""
    cfg = results["config"]
    out = [(f"main (T={cfg['spec']['length']})", "main", {"mismatch": "none"})]
    out += [(f"T={t}", "tsweep", {"T": t}) for t in cfg["t_values"]]
    out += [
        ("no context", "context", {}),
        (f"init_scale={cfg['entropy_scale']:g}", "entropy", {}),
        (f"lr x{cfg['lr_factor']:g}", "lr", {}),
    ]
    return [o for o in out if runs_of(results, o[1], **o[2])]


def plot_sensitivity(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    cfg = results["config"]
    settings = sensitivity_settings(results)
    n = cfg["sens_n"]
    fig, ax = plt.subplots(figsize=(11, 4.0))
    losses = cfg.get("sens_losses", cfg["core"])
    width = 0.8 / len(losses)
    for i, loss in enumerate(losses):
        ys, es = [], []
        for _, exp, match in settings:
            r = one(results, exp, loss=loss, n=n, **match)
            ys.append(_mean(r["final"]) if r else float("nan"))
            es.append(_std(r["final"]) if r else 0.0)
        ax.bar(
            [x + i * width for x in range(len(settings))],
            ys,
            width,
            yerr=es,
            capsize=2,
            label=loss,
            color=COLORS.get(loss),
            edgecolor="k" if loss == "vespo" else None,
        )
        if loss in cfg["sens_ref_losses"]:  # the same loss at N = sens_ref_n: a tick
            ref = [one(results, exp, loss=loss, n=cfg["sens_ref_n"], **match) for _, exp, match in settings]
            ax.scatter(
                [x + i * width for x in range(len(settings))],
                [_mean(r["final"]) if r else float("nan") for r in ref],
                marker="_",
                s=220,
                color="k",
                zorder=5,
            )
    ax.set_xticks([x + width * (len(losses) - 1) / 2 for x in range(len(settings))], [s[0] for s in settings])
    ax.set_ylabel(f"final exact reward J at N={n}")
    ax.set_ylim(0, 1)
    ax.set_title(
        f"Sensitivity of the N={n} comparison (black ticks: the same loss at N={cfg['sens_ref_n']}; "
        f"mean ± std over {len(cfg['seeds'])} seeds)",
        fontsize=10,
    )
    ax.legend(fontsize=8, ncol=len(losses), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def make_plots(results: dict[str, Any], img_dir: Path) -> list[Path]:
    img_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for mm in ("none", results["config"]["mismatch"]["kind"]):
        if runs_of(results, "main", mismatch=mm):
            p = img_dir / ("sim_curves.png" if mm == "none" else "sim_curves_mismatch.png")
            plot_curves(results, p, mm)
            out.append(p)
    if runs_of(results, "main"):
        p = img_dir / "sim_final_vs_n.png"
        plot_final_vs_n(results, p)
        out.append(p)
    if results.get("gradient"):
        p = img_dir / "sim_gradient_vs_T.png"
        plot_gradient(results, p)
        out.append(p)
    if runs_of(results, "ablation"):
        p = img_dir / "sim_ablation.png"
        plot_ablation(results, p)
        out.append(p)
    if len(sensitivity_settings(results)) > 1:
        p = img_dir / "sim_sensitivity.png"
        plot_sensitivity(results, p)
        out.append(p)
    return out


# ---------------------------------------------------------------------------------------------
# The results document
# ---------------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def _cell(r: dict[str, Any] | None, key: str = "final") -> str:
    return ms(r[key]) if r else "—"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _metric(r: dict[str, Any] | None, key: str, digits: int = 3) -> str:
    return _f(r["metrics"].get(key), digits) if r else "—"


def main_table(results: dict[str, Any], mismatch: str, key: str = "final") -> str:
    cfg = results["config"]
    rows = []
    losses = list(dict.fromkeys(r["loss"] for r in runs_of(results, "main", mismatch=mismatch)))
    for loss in losses:
        cells = [f"**{loss}**" if loss == "vespo" else loss]
        base = one(results, "main", loss=loss, n=1, mismatch=mismatch)
        for n in cfg["ns"]:
            r = one(results, "main", loss=loss, n=n, mismatch=mismatch)
            cells.append(_cell(r, key))
        r64 = one(results, "main", loss=loss, n=64, mismatch=mismatch)
        r4 = one(results, "main", loss=loss, n=4, mismatch=mismatch)
        cells.append(_f(_mean(r64[key]) / _mean(r4[key]), 2) if r64 and r4 else "—")
        cells.append(_f(_mean(r64[key]) / _mean(base[key]), 2) if r64 and base else "—")
        rows.append(cells)
    return _table(["loss"] + [f"N={n}" for n in cfg["ns"]] + ["N=64 / N=4", "N=64 / N=1"], rows)


def diag_table(results: dict[str, Any], mismatch: str = "none") -> str:
    cfg = results["config"]
    rows = []
    for loss in cfg["core"]:
        for n in cfg["ns"]:
            r = one(results, "main", loss=loss, n=n, mismatch=mismatch)
            if r is None or n == 1 and mismatch == "none":
                continue
            rows.append(
                [
                    loss,
                    str(n),
                    _metric(r, "is/token_kl", 4),
                    _metric(r, "is/abs_log_w_mean", 2),
                    _metric(r, "is/log_w_pos_p50", 2),
                    _metric(r, "is/log_w_neg_p50", 2),
                    _metric(r, "phi/frac_below_0.01") if loss == "vespo" else "",
                    _metric(r, "phi/mean") if loss == "vespo" else "",
                    _metric(r, "loss/clip_frac") if loss in ("grpo", "gspo", "cispo") else "",
                    _f(r["entropy_final"], 3),
                ]
            )
    return _table(
        [
            "loss",
            "N",
            "token KL(pi_old‖pi)",
            "mean abs log W",
            "median log W, A>0",
            "median log W, A<0",
            "phi<0.01",
            "mean phi",
            "clip frac",
            "final entropy",
        ],
        rows,
    )


def staleness_table(results: dict[str, Any], n: int = 64) -> str:
    r = one(results, "main", loss="vespo", n=n, mismatch="none")
    if not r or "phi/frac_below_0.01" not in r["metrics_by_staleness"]:
        return ""
    ks = [k for k in (0, 1, 2, 4, 8, 16, 32, n - 1) if k < n]
    rows = []
    for key, name in (
        ("is/abs_log_w_mean", "mean abs log W"),
        ("phi/frac_below_0.01", "share phi < 0.01"),
        ("phi/mean", "mean phi"),
    ):
        vals = r["metrics_by_staleness"].get(key)
        if vals:
            rows.append([name] + [_f(vals[k], 3) for k in ks])
    return _table([f"VESPO, N={n}: staleness k"] + [str(k) for k in ks], rows)


def gradient_table_k(results: dict[str, Any], t: int) -> str:
    rows_in = [r for r in results["gradient"] if r["T"] == t]
    ks = sorted({r["k"] for r in rows_in if r["k"] > 0})
    labels = list(dict.fromkeys(r["loss"] for r in rows_in if r["k"] > 0))
    header = ["loss"] + [f"k={k}: cos / bias / var / scale" for k in ks]
    rows = []
    for label in labels:
        cells = [label]
        for k in ks:
            g = next((r for r in rows_in if r["k"] == k and r["loss"] == label), None)
            cells.append(
                f"{_f(g['cosine_debiased'], 2)} / {_f(g['rel_bias_debiased'], 2)} / {g['rel_var']:.3g} / "
                f"{_f(g['scale'], 2)}"
                if g
                else "—"
            )
        rows.append(cells)
    ref = next((r for r in rows_in if r["k"] == 0), None)
    kl = " · ".join(
        f"k={k}: KL/token {_f(next(r['token_kl'] for r in rows_in if r['k'] == k), 4)}, "
        f"J(mu)={_f(next(r['reward_mu'] for r in rows_in if r['k'] == k), 3)}, "
        f"J(pi)={_f(next(r['reward_pi'] for r in rows_in if r['k'] == k), 3)}"
        for k in ks
    )
    note = f"\n\nDistance: {kl}. On-policy (k=0) variance of the same estimator: {ref['rel_var']:.3g}." if ref else ""
    return _table(header, rows) + note


def gradient_table_t(results: dict[str, Any], k: int, key: str) -> str:
    rows_in = [r for r in results["gradient"] if r["k"] == k]
    ts = sorted({r["T"] for r in rows_in})
    labels = list(dict.fromkeys(r["loss"] for r in rows_in))
    rows = []
    for label in labels:
        cells = [label]
        for t in ts:
            g = next((r for r in rows_in if r["T"] == t and r["loss"] == label), None)
            v = g.get(key) if g else None
            cells.append("—" if v is None else (f"{v:.3g}" if key == "rel_var" else _f(v, 2)))
        rows.append(cells)
    kl = [_f(next(r["token_kl"] for r in rows_in if r["T"] == t), 4) for t in ts]
    rows.append(["(KL/token)"] + kl)
    return _table([f"k={k}: {key}"] + [f"T={t}" for t in ts], rows)


def ablation_table(results: dict[str, Any]) -> str:
    cfg = results["config"]
    labels = ["vespo"] + list(dict.fromkeys(r["label"] for r in runs_of(results, "ablation")))
    ns = sorted(set(cfg["ablation_ns"]) | set(cfg["c_sweep_ns"]))
    rows = []
    for lab in labels:
        cells = [lab]
        params = None
        for n in ns:
            r = (
                one(results, "main", loss="vespo", n=n, mismatch="none")
                if lab == "vespo"
                else one(results, "ablation", label=lab, n=n)
            )
            cells.append(f"{_cell(r)} (phi<0.01: {_metric(r, 'phi/frac_below_0.01', 2)})" if r else "—")
            params = params or (r["params"] if r else None)
        p = params or {}
        cells.insert(
            1,
            "default (2,3)/(3,2)"
            if lab == "vespo"
            else ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()),
        )
        rows.append(cells)
    return _table(["variant", "parameters"] + [f"final J at N={n}" for n in ns], rows)


def sensitivity_table(results: dict[str, Any]) -> str:
    cfg = results["config"]
    n, n_ref = cfg["sens_n"], cfg["sens_ref_n"]
    losses = cfg.get("sens_losses", cfg["core"])
    rows = []
    for label, exp, match in sensitivity_settings(results):
        cells = [label]
        for loss in losses:
            r = one(results, exp, loss=loss, n=n, **match)
            cells.append(_cell(r))
        for loss in cfg["sens_ref_losses"]:
            r, r4 = one(results, exp, loss=loss, n=n, **match), one(results, exp, loss=loss, n=n_ref, **match)
            cells.append(_f(_mean(r["final"]) / _mean(r4["final"]), 2) if r and r4 else "—")
        v = one(results, exp, loss="vespo", n=n, **match)
        cells.append(_metric(v, "phi/frac_below_0.01", 2))
        rows.append(cells)
    return _table(
        ["setting"]
        + [f"{loss} N={n}" for loss in losses]
        + [f"{loss} N={n}/N={n_ref}" for loss in cfg["sens_ref_losses"]]
        + ["VESPO phi<0.01"],
        rows,
    )


def fix_table(results: dict[str, Any]) -> str:
    cfg = results["config"]
    rows = []
    for n in cfg["fix_ns"]:
        for loss in ("vespo", "grpo"):
            for src, exp in (("sampler", "main"), ("trainer", "mismatch_fix"), ("tis", "mismatch_fix")):
                r = (
                    one(results, "main", loss=loss, n=n, mismatch=cfg["mismatch"]["kind"])
                    if exp == "main"
                    else one(results, "mismatch_fix", label=f"{loss}/{src}", n=n)
                )
                clean = one(results, "main", loss=loss, n=n, mismatch="none")
                diff = _mean(r["final"]) - _mean(clean["final"]) if r and clean else None
                rows.append([loss, str(n), src, _cell(r), _f(diff, 3), _metric(r, "sim/mismatch_abs", 4) if r else "—"])
    return _table(
        [
            "loss",
            "N",
            "ratio taken against",
            "final J",
            "minus the no-mismatch run",
            "mean abs log(pi_old/mu) per token",
        ],
        rows,
    )


def tune_table(results: dict[str, Any]) -> str:
    t = results.get("tune")
    if not t:
        return f"(lr {results['lr']} given by hand)"
    rows = [[g["loss"], f"{g['lr']:g}", _f(g["auc"], 4), _f(g["final"], 4)] for g in t["grid"]]
    return _table(["loss", "lr", "mean J over the curve (criterion)", "final J"], rows)


def render_doc(results: dict[str, Any]) -> str:
    """docs/results_simulator.md, every number read from ``results``."""
    from string import Template

    cfg = results["config"]
    spec, pol, mm = cfg["spec"], cfg["policy"], cfg["mismatch"]
    tm = results["timing"]
    v = {k: one(results, "main", loss="vespo", n=k, mismatch="none") for k in cfg["ns"]}
    tg, tgm = targets(results, "none"), targets(results, mm["kind"])
    n_hi = max(cfg["ns"])
    at_hi = sorted(runs_of(results, "main", n=n_hi, mismatch="none"), key=lambda r: -_mean(r["final"]))
    rank = [r["loss"] for r in at_hi].index("vespo") + 1 if at_hi else 0
    behind = [row for row in tg["vs_baselines"] if not row["ok"]]
    ahead = [row for row in tg["vs_baselines"] if row["ok"]]
    grad = results.get("gradient", [])

    def g(t: int, k: int, label: str, key: str) -> float | None:
        row = next((r for r in grad if r["T"] == t and r["k"] == k and r["loss"] == label), None)
        return row.get(key) if row else None

    t_main, k_hi = spec["length"], max(cfg["study_k"])
    t_lo, t_hi = min(cfg["study_t"]), max(cfg["study_t"])
    seq_var_growth = (g(t_hi, k_hi, "seq_is", "rel_var") or float("nan")) / (
        g(t_lo, k_hi, "seq_is", "rel_var") or float("nan")
    )
    ref_var_growth = (g(t_hi, k_hi, "reinforce", "rel_var") or float("nan")) / (
        g(t_lo, k_hi, "reinforce", "rel_var") or float("nan")
    )
    v_hi = v.get(n_hi)
    fields = dict(
        cmd=results.get("command", "python benchmarks/simulator.py"),
        wall=f"{tm.get('total', 0) / 60:.1f}",
        cpu=f"{tm.get('total_cpu', 0) / 60:.1f}",
        timing=", ".join(f"{k} {tm[k + '_cpu'] / 60:.1f}" for k in ALL_PARTS if k + "_cpu" in tm),
        V=spec["vocab"],
        T=spec["length"],
        P=spec["prompts"],
        G=spec["group_size"],
        K=spec["keys"],
        J0=spec["init_success"],
        scale=spec["init_scale"],
        D=pol["embed"],
        H=pol["hidden"],
        steps=cfg["steps"],
        seeds=len(cfg["seeds"]),
        lr=results["lr"],
        grid=", ".join(f"{x:g}" for x in cfg["lr_grid"]),
        tune_losses=", ".join(cfg["tune_losses"]),
        mm_scale=mm["scale"],
        B=spec["prompts"] * spec["group_size"],
        ratio=_f(tg.get("vespo_ratio_64_4"), 3),
        ratio_verdict="met" if tg.get("ratio_ok") else "**not met**",
        ratio_m=_f(tgm.get("vespo_ratio_64_4"), 3),
        ratio_m_verdict="met" if tgm.get("ratio_ok") else "**not met**",
        all_verdict="met" if tg["all_ok"] else "**not met**",
        all_m_verdict="met" if tgm["all_ok"] else "**not met**",
        behind=", ".join(f"{r['baseline']} at N={r['n']} ({r['diff_mean']:+.3f} ± {r['diff_std']:.3f})" for r in behind)
        or "none",
        ahead=", ".join(f"{r['baseline']} at N={r['n']} ({r['diff_mean']:+.3f})" for r in ahead) or "none",
        n_hi=n_hi,
        rank=rank,
        n_losses=len(at_hi),
        study_batches=cfg["study_batches"],
        order=" > ".join(f"{r['loss']} {_mean(r['final']):.3f}" for r in at_hi),
        v_drop=_metric(v_hi, "phi/frac_below_0.01", 3),
        v_logw=_metric(v_hi, "is/abs_log_w_mean", 2),
        v_pos=_metric(v_hi, "is/log_w_pos_p50", 2),
        v_neg=_metric(v_hi, "is/log_w_neg_p50", 2),
        t_main=t_main,
        k_hi=k_hi,
        t_lo=t_lo,
        t_hi=t_hi,
        seq_var_growth=_f(seq_var_growth, 1),
        ref_var_growth=_f(ref_var_growth, 1),
        tok_cos_lo=_f(g(t_lo, k_hi, "tok_is", "cosine_debiased"), 3),
        tok_cos_hi=_f(g(t_hi, k_hi, "tok_is", "cosine_debiased"), 3),
        tok_bias_lo=_f(g(t_lo, k_hi, "tok_is", "rel_bias_debiased"), 2),
        tok_bias_hi=_f(g(t_hi, k_hi, "tok_is", "rel_bias_debiased"), 2),
        ves_cos_lo=_f(g(t_lo, k_hi, "vespo", "cosine_debiased"), 3),
        ves_cos_hi=_f(g(t_hi, k_hi, "vespo", "cosine_debiased"), 3),
        ves_scale_lo=_f(g(t_lo, k_hi, "vespo", "scale"), 2),
        ves_scale_hi=_f(g(t_hi, k_hi, "vespo", "scale"), 2),
        ves_var_hi=_f(g(t_hi, k_hi, "vespo", "rel_var"), 1),
        seq_var_hi=_f(g(t_hi, k_hi, "seq_is", "rel_var"), 1),
        ref_var_hi=_f(g(t_hi, k_hi, "reinforce", "rel_var"), 1),
        ves_drop_hi=_f(g(t_hi, k_hi, "vespo", "phi_frac_below_0.01"), 2),
        logw_hi=_f(g(t_hi, k_hi, "vespo", "abs_log_w_mean"), 2),
        main_table=main_table(results, "none"),
        best_table=main_table(results, "none", "best"),
        mm_table=main_table(results, mm["kind"]),
        diag_table=diag_table(results),
        stale_table=staleness_table(results, n_hi),
        grad_k=gradient_table_k(results, t_main) if grad else "",
        grad_t_cos=gradient_table_t(results, k_hi, "cosine_debiased") if grad else "",
        grad_t_bias=gradient_table_t(results, k_hi, "rel_bias_debiased") if grad else "",
        grad_t_var=gradient_table_t(results, k_hi, "rel_var") if grad else "",
        grad_t_toward=gradient_table_t(results, k_hi, "toward_mu")
        if grad and "toward_mu" in grad[0]
        else "(not in this JSON)",
        ablation_table=ablation_table(results),
        sens_table=sensitivity_table(results),
        fix_table=fix_table(results),
        tune_table=tune_table(results),
        targets_rows=_table(
            ["N", "baseline", "VESPO − baseline (paired, mean ± std over seeds)", "verdict"],
            [
                [
                    str(r["n"]),
                    r["baseline"],
                    f"{r['diff_mean']:+.3f} ± {r['diff_std']:.3f}",
                    "VESPO ahead or equal" if r["ok"] else "VESPO behind",
                ]
                for r in tg["vs_baselines"]
            ],
        ),
    )
    fields.update(reading_fields(results))
    return Template(DOC_TEMPLATE).safe_substitute(fields)


def _spearman_sign(pairs: list[tuple[float, float]]) -> float:
    """Spearman rank correlation of (x, y) pairs (no ties expected)."""
    n = len(pairs)
    if n < 3:
        return float("nan")
    rx = {x: i for i, x in enumerate(sorted(p[0] for p in pairs))}
    ry = {y: i for i, y in enumerate(sorted(p[1] for p in pairs))}
    d2 = sum((rx[x] - ry[y]) ** 2 for x, y in pairs)
    return 1 - 6 * d2 / (n * (n * n - 1))


def reading_fields(results: dict[str, Any]) -> dict[str, str]:
    """Sentences and numbers of the reading section, computed from ``results``."""
    cfg = results["config"]
    n_hi, n_ref = cfg["sens_n"], cfg["sens_ref_n"]
    out: dict[str, str] = {}
    # sensitivity: VESPO's rank and ratio in every setting
    lines = []
    for label, exp, match in sensitivity_settings(results):
        rs = [
            r
            for r in (one(results, exp, loss=loss, n=n_hi, **match) for loss in cfg.get("sens_losses", cfg["core"]))
            if r
        ]
        if not rs:
            continue
        rs.sort(key=lambda r: -_mean(r["final"]))
        names = [r["loss"] for r in rs]
        v, v4 = one(results, exp, loss="vespo", n=n_hi, **match), one(results, exp, loss="vespo", n=n_ref, **match)
        ratio = _mean(v["final"]) / _mean(v4["final"]) if v and v4 else float("nan")
        lines.append(
            f"| {label} | {names.index('vespo') + 1} of {len(names)} | {names[0]} ({_mean(rs[0]['final']):.3f}) | "
            f"{_mean(v['final']):.3f} | {_f(ratio, 2)} | {_metric(v, 'phi/frac_below_0.01', 2)} | "
            f"{_metric(v, 'is/abs_log_w_mean', 2)} |"
        )
    out["sens_rank"] = "\n".join(
        [
            f"| setting | VESPO rank at N={n_hi} | best loss | VESPO J | VESPO J(N={n_hi})/J(N={n_ref}) | "
            "VESPO phi<0.01 | VESPO mean abs log W |",
            "|---|---|---|---|---|---|---|",
        ]
        + lines
    )
    # where VESPO starts to drop most of a mini-batch
    v = one(results, "main", loss="vespo", n=n_hi, mismatch="none")
    k_half = None
    if v:
        by_k = v["metrics_by_staleness"].get("phi/frac_below_0.01", [])
        k_half = next((k for k, x in enumerate(by_k) if x is not None and x >= 0.5), None)
        lw = v["metrics_by_staleness"].get("is/abs_log_w_mean", [])
        out["k_half"] = str(k_half) if k_half is not None else f"(never within N={n_hi})"
        out["logw_at_k_half"] = _f(lw[k_half], 2) if k_half is not None and lw else "n/a"
    # ablations
    abl = runs_of(results, "ablation", n=max(cfg["ablation_ns"]))
    if abl and v:
        best = max(abl, key=lambda r: _mean(r["final"]))
        out["abl_best"] = f"{best['label']} ({_mean(best['final']):.3f} vs default {_mean(v['final']):.3f})"
    rhos = []
    for n in cfg["c_sweep_ns"]:
        pts = []
        for lab in ["vespo"] + [f"c_x{x:g}" for x in cfg["c_scales"]]:
            r = (
                one(results, "main", loss="vespo", n=n, mismatch="none")
                if lab == "vespo"
                else one(results, "ablation", label=lab, n=n)
            )
            if r and r["metrics"].get("phi/frac_below_0.01") is not None:
                pts.append((r["metrics"]["phi/frac_below_0.01"], _mean(r["final"])))
        rhos.append(f"N={n}: {_f(_spearman_sign(pts), 2)}")
    out["c_rho"] = ", ".join(rhos)
    # mismatch
    mm = cfg["mismatch"]["kind"]
    for loss in ("vespo", "grpo", "cispo"):
        a, b = one(results, "main", loss=loss, n=1, mismatch=mm), one(results, "main", loss=loss, n=1, mismatch="none")
        out[f"mm1_{loss}"] = f"{_mean(a['final']) - _mean(b['final']):+.3f}" if a and b else "n/a"
    a = one(results, "main", loss="vespo", n=1, mismatch=mm)
    out["mm1_drop"] = _metric(a, "phi/frac_below_0.01", 3)
    # sensitivity statements
    first, ratio_ok = [], []
    for label, exp, match in sensitivity_settings(results):
        rs = [
            r
            for r in (one(results, exp, loss=loss, n=n_hi, **match) for loss in cfg.get("sens_losses", cfg["core"]))
            if r
        ]
        if rs and max(rs, key=lambda r: _mean(r["final"]))["loss"] == "vespo":
            first.append(label)
        v64, v4 = one(results, exp, loss="vespo", n=n_hi, **match), one(results, exp, loss="vespo", n=n_ref, **match)
        if v64 and v4 and _mean(v64["final"]) >= 0.9 * _mean(v4["final"]):
            ratio_ok.append(label)
    out["sens_first"] = ", ".join(first) or "none"
    ok_best = []
    for label, exp, match in sensitivity_settings(results):
        if label in ratio_ok:
            rs = [
                r
                for r in (one(results, exp, loss=loss, n=n_hi, **match) for loss in cfg.get("sens_losses", cfg["core"]))
                if r
            ]
            b = max(rs, key=lambda r: _mean(r["final"]))
            vv = one(results, exp, loss="vespo", n=n_hi, **match)
            ok_best.append(f"{b['loss']} at {label} ({_mean(b['final']):.3f} vs VESPO {_mean(vv['final']):.3f})")
    out["sens_ok_best"] = "; ".join(ok_best) or "n/a"
    out["sens_ratio_ok"] = ", ".join(ratio_ok) or "none"
    # kernel windows, from the library's phi
    from vespo.losses import vespo_phi

    def window(c1: float, c2: float, level: float) -> str:
        grid = [x / 100 for x in range(-1500, 501)]
        ok = [x for x in grid if float(vespo_phi(math.exp(x), c1, c2)) >= level]
        return f"{min(ok):.2f}, {max(ok):.2f}" if ok else "empty"

    out["win_pos"], out["win_neg"] = window(2.0, 3.0, 0.01), window(3.0, 2.0, 0.01)
    out["win_pos1"], out["win_neg1"] = window(2.0, 3.0, 0.1), window(3.0, 2.0, 0.1)
    out["v_kl"] = _metric(v, "is/token_kl", 4)
    for loss in ("topr", "cispo", "reinforce"):
        r = one(results, "main", loss=loss, n=n_hi, mismatch="none")
        out[f"{loss}_hi"] = _cell(r)
    out["cispo_kl"] = _metric(one(results, "main", loss="cispo", n=n_hi, mismatch="none"), "is/token_kl", 4)
    lr_runs = runs_of(results, "lr", n=n_hi)
    if lr_runs:
        vl = next((r for r in lr_runs if r["loss"] == "vespo"), None)
        bl = max((r for r in lr_runs if r["loss"] != "vespo"), key=lambda r: _mean(r["final"]))
        out["lr_drop"] = _metric(vl, "phi/frac_below_0.01", 3)
        out["lr_vespo"] = _cell(vl)
        out["lr_best_name"], out["lr_best"] = bl["loss"], _cell(bl)
    # gradient study numbers
    grad = results.get("gradient", [])
    if grad:
        ts = sorted({r["T"] for r in grad})
        t2 = min([t for t in ts if t > cfg["spec"]["keys"]] or ts)
        t_hi, k_lo, k_hi = max(ts), min(cfg["study_k"]), max(cfg["study_k"])

        def g(t: int, k: int, label: str, key: str) -> float | None:
            row = next((r for r in grad if r["T"] == t and r["k"] == k and r["loss"] == label), None)
            return row.get(key) if row else None

        def ratio(t: int, k: int) -> str:
            a_, b_ = g(t, k, "seq_is", "rel_var"), g(t, k, "reinforce", "rel_var")
            return _f(a_ / b_, 1) if a_ and b_ else "n/a"

        out.update(
            t_lo2=str(t2),
            k_lo=str(k_lo),
            seq_ratio_lo=ratio(t2, k_lo),
            seq_ratio_hi=ratio(t_hi, k_lo),
            ess_lo=_f(g(t2, k_lo, "seq_is", "ess_w"), 3),
            ess_hi=_f(g(t_hi, k_lo, "seq_is", "ess_w"), 3),
            tok_cos_lo=_f(g(t2, k_hi, "tok_is", "cosine_debiased"), 3),
            tok_cos_hi=_f(g(t_hi, k_hi, "tok_is", "cosine_debiased"), 3),
            ves_cos_lo=_f(g(t2, k_hi, "vespo", "cosine_debiased"), 3),
            ves_cos_hi=_f(g(t_hi, k_hi, "vespo", "cosine_debiased"), 3),
            ves_scale_lo=_f(g(t2, k_hi, "vespo", "scale"), 2),
            ves_scale_hi=_f(g(t_hi, k_hi, "vespo", "scale"), 2),
        )
        t_main = cfg["spec"]["length"]
        k_min = min(k for k in {r["k"] for r in grad} if k > 0)
        out["k_min"] = str(k_min)
        for label in ("vespo", "grpo"):
            out[f"toward_{label}_k1"] = _f(g(t_main, k_min, label, "toward_mu"), 2)
            out[f"toward_{label}_klo"] = _f(g(t_main, k_lo, label, "toward_mu"), 2)
        for label in ("grpo", "gspo", "topr", "vespo", "tok_is"):
            key = "tok" if label == "tok_is" else label
            out[f"toward_{key}"] = _f(g(t_main, k_hi, label, "toward_mu"), 2)
            out[f"scale_{key}"] = _f(g(t_main, k_hi, label, "scale"), 2)
        cos_tok = [g(t, k_hi, "tok_is", "cosine_debiased") for t in ts]
        out["tok_cos_min"] = (
            _f(min(c for c in cos_tok if c is not None), 2) if any(c is not None for c in cos_tok) else "n/a"
        )
    out["mm_abs"] = _metric(a, "sim/mismatch_abs", 4)
    out["mm_seq"] = _metric(a, "is/abs_log_w_mean", 2)
    n_fix = max(cfg["fix_ns"])
    tis, trn = (
        one(results, "mismatch_fix", label="vespo/tis", n=n_fix),
        one(results, "mismatch_fix", label="vespo/trainer", n=n_fix),
    )
    out["tis_verdict"] = (
        ("ends lower" if _mean(tis["final"]) < _mean(trn["final"]) else "ends no lower")
        if tis and trn
        else "was not run"
    )
    for loss, key in (("vespo", "v"), ("grpo", "g")):
        out[f"fix_{key}_sampler"] = _cell(one(results, "main", loss=loss, n=n_fix, mismatch=mm))
        for src in ("trainer", "tis"):
            out[f"fix_{key}_{src}"] = _cell(one(results, "mismatch_fix", label=f"{loss}/{src}", n=n_fix))
    return out


DOC_TEMPLATE = """# Tier-1 simulator: staleness, mismatch and the product-vs-sum argument

Everything below is generated by `benchmarks/simulator.py` from `benchmarks/results/simulator.json`;
no number in this file is typed by hand. The simulator is `benchmarks/lib/simulator.py` (torch only); every
loss is `vespo.losses.compute_policy_loss` with its registered defaults unless a table says otherwise.

## What was run

```
OMP_NUM_THREADS=1 $cmd
```

One thread (`torch.set_num_threads(1)`) on a machine shared with other jobs: **$cpu CPU-minutes**
in total ($wall minutes wall clock). CPU minutes per part: $timing.
`python benchmarks/simulator.py --quick` is the CI-sized variant (seconds; it writes
`benchmarks/results/simulator_quick.json` and no figures), and
`python benchmarks/simulator.py --from-json benchmarks/results/simulator.json` redraws the figures
and this page without training.

**Task.** $P prompts, each with its own hidden target. A response has T = $T tokens over a
vocabulary of V = $V. Each token is drawn from pi(y_t | prompt, t, y_{t-1}), a first-order
autoregressive policy (the first token sees a BOS context). The reward is a verifier-style 0/1:
R = 1 when all K = $K *key* positions, spread evenly over the response, carry the target token.
The other T − K positions are filler. They never enter R, but they set the context of the next
token, and each of them contributes a factor to W = prod_t pi/mu. Because the state is just the
previous token, the success probability J = E_pi[R] and its gradient are **exact**: a forward pass
over (previous token, keys correct so far), differentiated with autograd. J is the "accuracy" in
every table.

The initial policy is random logits of scale $scale, which gives about 0.6 nats per token: mostly
peaked rows plus some high-entropy forks. The target logit at every key is then calibrated so that
J = $J0 at the start, and all methods and all N start from this same point.

**Policy.** Trainable logits are added to the fixed initial ones:
delta(p, t, c) = tanh((e_p + f_t) W1 + b1) W2 + g_c W3, with embedding width $D and $H hidden
units. All prompts, positions and contexts share these weights, so an update aimed at a key also
moves the filler tokens, as an LLM's shared weights do. W2 and W3 start at 0.

**Training.** Adam (0.9, 0.999), gradient clipping at 1.0 (verl's default), no weight decay,
constant lr. G = $G responses per prompt and group advantages (R − mean)/(std + 1e-6).
Token-mean aggregation. $steps optimizer steps on mini-batches of $B responses.

**Staleness.** One rollout of N mini-batches is drawn from the current weights and trained
sequentially, so mini-batch k is k steps stale and W = pi_theta/pi_old. Every N uses the same
$steps × $B responses, as in the paper. $seeds seeds throughout (0–4). A seed fixes the task
instance, the initial weights and the sampling noise, so runs with the same seed are paired.

**Mismatch.** The sampler adds N(0, $mm_scale²) noise to every logit it samples from (fresh per
response and position), and mu is the probability it really drew the token with. In the main
mismatch runs the ratio is taken against mu (`old_log_prob = mu`, the fully-async setting). W then
contains staleness and mismatch together.

**Learning rate.** Tuned on-policy (N = 1, no mismatch) on a grid {$grid}. The tuning used seeds
100–104, which are not the evaluation seeds. The criterion was the mean exact J over the learning
curve. At N = 1 without mismatch W = 1, so all the losses compute the same update: `test_simulator`
checks this bit for bit for VESPO vs REINFORCE, and the grid below shows it for $tune_losses. The
chosen **lr = $lr** is kept for every loss, N and setting. The `lr` sensitivity part reruns the
N = 64 comparison at a quarter of it.

$tune_table

## 1. Learning curves versus staleness N (T = $T)

Final exact reward J after $steps steps, mean ± std over seeds, **no mismatch**:

$main_table

Best J along the curve (same runs):

$best_table

With the sampler mismatch (ratio against mu):

$mm_table

![learning curves](img/sim_curves.png)
![learning curves with mismatch](img/sim_curves_mismatch.png)
![final reward vs N](img/sim_final_vs_n.png)

**Targets** (final J, mean over seeds):

- VESPO J(N=64) / J(N=4) ≥ 0.90. No mismatch: **$ratio**, $ratio_verdict. With mismatch:
  **$ratio_m**, $ratio_m_verdict.
- VESPO ≥ every baseline at every N ≥ 16. No mismatch: $all_verdict. With mismatch: $all_m_verdict.
  Paired differences (no mismatch):

$targets_rows

At N = $n_hi without mismatch the order is $order. VESPO ranks $rank of $n_losses.

## 2. What the weights do: drift, |log W| and the share VESPO drops

Mean over training; the "median log W" columns are split by the sign of the advantage:

$diag_table

VESPO at N = $n_hi, by the staleness k of the mini-batch:

$stale_table

## 3. Gradient bias and variance against the exact gradient

For a loss L and a mini-batch b, the gradient estimate is g_b = −T · dL_b/dθ, in the MLP's
parameter space. With token-mean aggregation this makes on-policy REINFORCE with leave-one-out
advantages exactly unbiased: E g_b = ∇J.

The setup:

- mu is the initial policy; pi is mu after k on-policy Adam steps at the tuned lr. These are the
  weights a mini-batch that is k steps stale meets.
- The same $study_batches mini-batches from mu feed every loss.
- Reported: the cosine of E g with ∇J, ‖E g − ∇J‖/‖∇J‖, tr Cov(g_b)/‖∇J‖² and the step length
  along ∇J (`scale`).
- The first two are corrected for the Monte-Carlo noise of the mean. A debiased cosine can
  therefore come out slightly above 1, and "nan" means the mean is pure noise.

Extra estimators:

- `seq_is`: the true product W, unclipped (`seq_clip` with c = 1e8).
- `tok_is`: the per-token ratio rho_t, unclipped (`cispo` with eps_high = 1e8). This is App. A's
  first-order surrogate.
- `reinforce`: no ratio at all.

One task instance, seed 0.

At T = $t_main, by staleness k (cos / bias / var / scale):

$grad_k

Versus T at k = $k_hi:

$grad_t_cos

$grad_t_bias

$grad_t_var

Direction of the bias at k = $k_hi, cos(E g − ∇J, θ_mu − θ_pi); positive means it pulls pi back towards mu:

$grad_t_toward

![gradient bias and variance vs T](img/sim_gradient_vs_T.png)

## 4. VESPO ablations

$ablation_table

![ablations](img/sim_ablation.png)

## 5. Sensitivity of the N = 64 comparison

$sens_table

$sens_rank

![sensitivity](img/sim_sensitivity.png)

## 6. Where the mismatch enters the ratio

$fix_table

## Reading

**Do the targets hold?**

- Main setting (T = $T, lr tuned on-policy), without mismatch:
  - VESPO keeps $ratio of its N = 4 reward at N = 64, against a target of 0.90 ($ratio_verdict).
  - It is behind these baselines at N ≥ 16: $behind.
  - It is ahead of or equal to: $ahead.
- With mismatch the ratio is $ratio_m ($ratio_m_verdict).
- Section 5 reruns the N = 64 comparison in other settings. VESPO ranks first at N = 64 in:
  $sens_first. Its N = 64 / N = 4 ratio is at least 0.90 in: $sens_ratio_ok.

**Why VESPO loses reward at large N × T: the product.**

- W = prod_t rho_t over T tokens. Its logarithm is a sum, and its typical value drifts like
  −T × (per-token KL):
  - In the main N = $n_hi run the per-token KL between the behaviour and the trained policy is
    small ($v_kl on average).
  - But the median log W of the stale sequences is $v_pos (A > 0) and $v_neg (A < 0). It is
    negative for both signs: a sequence drawn from mu is simply less likely under the moved pi.
  - Its mean |log W| is $v_logw.
- The kernel only passes a narrow window of log W (computed here from `vespo_phi`):
  - phi ≥ 0.01 for log W ∈ [$win_pos] when A > 0, and [$win_neg] when A < 0.
  - phi ≥ 0.1 for log W ∈ [$win_pos1] and [$win_neg1].
- So **$v_drop of all sequences get phi < 0.01** and contribute nothing. Once a mini-batch is
  k = $k_half steps stale, more than half of it is dropped (mean |log W| there: $logw_at_k_half).
- What this costs, and who is hurt by it:
  - The dropped share is most of the stale data, and stale data are still informative here:
    re-weighted per token they point along the exact gradient of the moved policy (`tok_is`
    debiased cosine at k = $k_hi is at least $tok_cos_min at every T, section 3). Losses that
    keep them learn more.
  - TOPR keeps every positive sample at weight 1: $topr_hi at N = $n_hi.
  - CISPO keeps every token with a clipped token weight, and moves the policy much further per
    rollout (mean per-token KL $cispo_kl): $cispo_hi.
  - REINFORCE, with no ratio at all, collapses ($reinforce_hi). Some correction is needed; VESPO's
    soft sequence-level cut-off at the default (c1, c2) is more than this task needs.
- The ablations say the same:
  - A wider window keeps more and ends higher: (c1, c2) × 0.5, and length normalisation, which
    with equal-length responses only divides log W by a constant.
  - A narrower window (× 2, × 4) drops more and ends lower.
  - Spearman correlation between the share with phi < 0.01 and final J over the c-sweep: $c_rho.
  - Best variant at N = 64: $abl_best.
- Drops are not the whole story. At a quarter of the lr (section 5) VESPO drops only
  $lr_drop of sequences, and it still ends at $lr_vespo against $lr_best_name $lr_best.
  - At small staleness the smooth sequence weight acts as a trust region. The bias of VESPO's
    gradient points from pi back to mu: cos(E g − ∇J, θ_mu − θ_pi) at T = $t_main is
    $toward_vespo_k1 at k = $k_min and $toward_vespo_klo at k = $k_lo. GRPO's clip gives
    $toward_grpo_k1 and $toward_grpo_klo.
  - At k = $k_hi that component is gone ($toward_vespo), and only the shrinkage is left (scale
    $scale_vespo).
  - In this task, stale data re-weighted per token are good enough (CISPO, and SAPO at the small
    lr), so a trust region costs progress. Uncorrected stale data are harmful: REINFORCE collapses
    at N = $n_hi.

**The product-vs-sum argument, seen directly** (section 3; T = $t_lo has no filler, so T ≥ $t_lo2 is compared):

- The true-product IS weight (`seq_is`) is unbiased, but its variance relative to REINFORCE's
  grows with T: at k = $k_lo it is $seq_ratio_lo× REINFORCE's at T = $t_lo2 and $seq_ratio_hi× at
  T = $t_hi.
  - The normalised ESS of W falls from $ess_lo to $ess_hi.
  - At k = $k_hi W is so heavy-tailed that $study_batches mini-batches no longer see its tail.
    The "variance" there is an underestimate.
- The token-level first-order surrogate (`tok_is`) keeps REINFORCE's variance. Its debiased cosine
  with ∇J at k = $k_hi is $tok_cos_lo at T = $t_lo2 and $tok_cos_hi at T = $t_hi.
  - The bias App. A predicts (dropped cross-token terms) is present in this autoregressive toy.
  - It is small next to everything else, and not monotone in T on a single task instance.
- VESPO's variance at T = $t_hi, k = $k_hi is $ves_var_hi, against $seq_var_hi (true product) and
  $ref_var_hi (REINFORCE).
  - It pays with the step: its length along ∇J (`scale`) goes from $ves_scale_lo at T = $t_lo2 to
    $ves_scale_hi at T = $t_hi (debiased cosine $ves_cos_lo and $ves_cos_hi).
  - There, $ves_drop_hi of sequences have phi < 0.01 (mean |log W| $logw_hi).
- GRPO, GSPO and TOPR show a large "bias" that grows with T. It points back from pi to mu: the cosine
  between E g − ∇J and θ_mu − θ_pi at T = $t_main, k = $k_hi is $toward_grpo (GRPO), $toward_gspo
  (GSPO) and $toward_topr (TOPR), against $toward_tok for `tok_is` (and $toward_vespo for VESPO,
  whose gradient is mostly switched off there).
  - This is a trust region's restoring force, mostly spread over the many filler parameters,
    added to a `scale` along ∇J of $scale_grpo, $scale_gspo, $scale_topr and $scale_vespo.
  - It is not an error in the reward direction, and it is what keeps these losses slow but stable
    at large N.

**Mismatch.**

- At N = $n_hi: VESPO with the ratio against mu ends at $fix_v_sampler, against pi_old (mismatch
  ignored, the sync default) at $fix_v_trainer, with token-TIS folded into W at $fix_v_tis.
  GRPO ends at $fix_g_sampler, $fix_g_trainer and $fix_g_tis respectively.
- At N = 1 the injected sampler noise alone changes final J by $mm1_vespo for VESPO, $mm1_grpo
  for GRPO and $mm1_cispo for CISPO (each against its own no-mismatch run).
- Per token the noise is a mean |log pi_old − log mu| of $mm_abs. Summed into W over T tokens it is
  a mean |log W| of $mm_seq at N = 1, and VESPO already drops $mm1_drop of sequences with no
  staleness at all.
- Folding the token-TIS weights into W adds the mismatch to log W before phi. In this toy it
  $tis_verdict for VESPO than ignoring the mismatch.

**What does not transfer from this toy.**

- Every response has exactly T tokens. The paper's length-normalisation failure (Fig. 6: long
  responses dominate the batch) cannot happen here. Normalisation only widens the kernel, which is
  why it helps here.
- The context is one previous token; there is no response-length dynamics and no MoE routing.
- The drift per step is whatever the tuned lr gives, and the conclusion turns on T × drift:
  - VESPO keeps its N = 4 reward at N = 64 only where T × drift keeps |log W| inside its window:
    $sens_ratio_ok (section 5).
  - Even there the best loss at N = 64 is $sens_ok_best.
- In the paper's LLM runs the same N evidently keeps |log W| small enough. Nothing here says
  otherwise. What the toy shows is the failure mode when it is not: the soft sequence-level drop
  removes most of the stale data, and methods that keep the data learn faster.

**Follow-up: `vespo_adaptive`.** The adaptive member of the family (issue 11) tempers W to W^α per
mini-batch so that the ESS of φ reaches a target. It is measured against every baseline over
T ∈ {32, 128, 256, 512} × N ∈ {1, 4, 16, 64} with fixed lengths, and at T = 128 with variable
lengths and with an injected mismatch, in
[adaptive.md](adaptive.md) (`python benchmarks/simulator.py --adaptive`; this page's runs are
unchanged).
"""


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# vespo_adaptive sweep (docs/adaptive.md): python benchmarks/simulator.py --adaptive
# ---------------------------------------------------------------------------------------------

ADAPTIVE_OUT = ROOT / "benchmarks" / "results" / "simulator_adaptive.json"
ADAPTIVE_DOC = ROOT / "docs" / "adaptive.md"
ADAPTIVE_LOSSES = ("vespo_adaptive", "vespo", "grpo", "gspo", "sapo", "cispo", "topr", "gmpo")
ADAPTIVE_BASELINES = ADAPTIVE_LOSSES[1:]
#: ablations of vespo_adaptive: label -> parameters (the default is the first)
ADAPTIVE_ABLATIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "remainder=none": {"remainder": "none"},
    "remainder_cap=5": {"remainder_cap": 5.0},
    "per_sign": {"per_sign": True},
    "criterion=w": {"criterion": "w"},
    "tau=0.5": {"tau": 0.5},
    "tau=0.7": {"tau": 0.7},
    "tau=0.9": {"tau": 0.9},
    "mass_target=0.5": {"mass_target": 0.5},
    "adapt=kernel": {"adapt": "kernel"},
    "saturate_scale": {"saturate_scale": True},
    "alpha_min=0.2": {"alpha_min": 0.2},
}
ADAPTIVE_STUDY: dict[str, tuple[str, dict[str, Any]]] = {
    **{k: STUDY_LOSSES[k] for k in ("reinforce", "tok_is", "vespo")},
    "vespo_adaptive": ("vespo_adaptive", {}),
    **{k: STUDY_LOSSES[k] for k in ("cispo", "topr", "grpo")},
}


@dataclass
class AdaptiveConfig:
    """The vespo_adaptive sweep (stored in its JSON)."""

    steps: int = 256
    eval_every: int = 32
    lr: float = 0.007  # the on-policy-tuned lr of the main simulator run (docs/results_simulator.md)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    t_values: tuple[int, ...] = (32, 128, 256, 512)
    ns: tuple[int, ...] = (1, 4, 16, 64)
    arm_t: tuple[int, ...] = (128, 512)  # T of the variable-length and the mismatch arms
    n1_max_t: int = 256  # N = 1 (identical to vespo by construction) is run up to this T
    mismatch: Mismatch = field(default_factory=lambda: Mismatch("noise", 0.1))
    min_length_frac: float = 0.25  # variable lengths: EOS allowed from T/4 on
    stop_rate: float = 3.0
    ablation_t: tuple[int, ...] = (128,)
    ablation_n: int = 64
    study_t: tuple[int, ...] = (128,)
    study_k: tuple[int, ...] = (4, 16)
    study_batches: int = 384
    quick: bool = False


def adaptive_long(steps: int) -> AdaptiveConfig:
    """The targets' check at a longer budget: only what the targets read (fixed lengths at T = 128
    and 512, the variable-length and mismatch arms at 128), no ablations, no gradient study."""
    return AdaptiveConfig(steps=steps, t_values=(128, 512), arm_t=(128,), ablation_t=(), study_t=())


def adaptive_quick() -> AdaptiveConfig:
    return AdaptiveConfig(
        steps=16,
        eval_every=8,
        seeds=(0, 1),
        t_values=(16,),
        ns=(1, 4),
        arm_t=(16,),
        ablation_t=(16,),
        ablation_n=4,
        study_t=(16,),
        study_k=(2,),
        study_batches=64,
        quick=True,
    )


def _adaptive_jobs(acfg: AdaptiveConfig) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []

    def grid(experiment: str, t: int, mismatch: Mismatch | None, variable: bool) -> None:
        for n in acfg.ns:
            if n == 1 and t > acfg.n1_max_t:
                continue
            # on-policy without mismatch every loss computes the same update (test_simulator checks
            # it); N = 1 is run for vespo and vespo_adaptive only, unless there is a mismatch
            losses = ADAPTIVE_LOSSES if (n > 1 or mismatch is not None) else ("vespo_adaptive", "vespo")
            if (mismatch is not None and n in (1, 4)) or (n == 4 and t > acfg.n1_max_t):
                losses = ("vespo_adaptive", "vespo")  # enough for the N = 64 / N = 4 ratio
            for loss in losses:
                jobs.append(dict(experiment=experiment, loss=loss, n=n, t=t, mismatch=mismatch, variable=variable))

    for t in acfg.t_values:
        grid("adaptive_fixed", t, None, False)
    for t in acfg.arm_t:
        grid("adaptive_variable", t, None, True)
    for t in acfg.arm_t:
        grid("adaptive_mismatch", t, acfg.mismatch, False)
    for t in acfg.ablation_t:
        for label, params in ADAPTIVE_ABLATIONS.items():
            if label != "default":
                jobs.append(
                    dict(
                        experiment="adaptive_ablation",
                        loss="vespo_adaptive",
                        n=acfg.ablation_n,
                        t=t,
                        mismatch=None,
                        variable=False,
                        label=label,
                        loss_params=params,
                    )
                )
        jobs.append(
            dict(
                experiment="adaptive_ablation",
                loss="vespo",
                n=acfg.ablation_n,
                t=t,
                mismatch=None,
                variable=False,
                label="vespo len_sqrt",
                loss_params={"length_norm": "sqrt"},
            )
        )
    for t in acfg.ablation_t:  # length normalisation with variable lengths (the paper's Fig. 6 concern)
        jobs.append(
            dict(
                experiment="adaptive_ablation",
                loss="vespo",
                n=acfg.ablation_n,
                t=t,
                mismatch=None,
                variable=True,
                label="vespo len_sqrt (variable)",
                loss_params={"length_norm": "sqrt"},
            )
        )
    return jobs


def _job_key(experiment: str, loss: str, n: int, t: int, variable: bool, mismatch: str, label: str) -> tuple:
    return (experiment, loss, n, t, variable, mismatch, label)


def adaptive_sweep(
    acfg: AdaptiveConfig, save_to: Path | None = None, resume: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the whole vespo_adaptive sweep; returns the JSON-ready results. With ``resume`` (the
    results of an interrupted run with the same settings) the runs it holds are kept, not rerun."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    base = quick_config() if acfg.quick else full_config()
    cfg = replace(base, steps=acfg.steps, eval_every=acfg.eval_every, seeds=acfg.seeds)
    results: dict[str, Any] = {
        "config": {
            **asdict(acfg),
            "mismatch": asdict(acfg.mismatch),
            "spec": asdict(cfg.spec),
            "policy": asdict(cfg.policy),
        },
        "runs": [],
        "gradient": [],
        "timing": {},
    }
    done = {}
    if resume is not None:
        for r in resume["runs"]:
            done[
                _job_key(
                    r["experiment"],
                    r["loss"],
                    r["n"],
                    r["T"],
                    r.get("min_length") is not None,
                    r["mismatch"],
                    r["label"],
                )
            ] = r
        results["timing"]["resumed_runs_cpu"] = sum(r["cpu_seconds"] for r in resume["runs"])
        earlier = resume.get("timing", {})  # a resumed run may itself have resumed one: add its part
        results["timing"]["resumed_wall"] = earlier.get(
            "total", sum(r["seconds"] for r in resume["runs"])
        ) + earlier.get("resumed_wall", 0.0)
    # the long fixed-length runs (T > n1_max_t) last, so that an interrupted sweep has every arm
    jobs = sorted(_adaptive_jobs(acfg), key=lambda j: j["experiment"] == "adaptive_fixed" and j["t"] > acfg.n1_max_t)

    def key_of(job: dict[str, Any]) -> tuple:
        mismatch = job["mismatch"].kind if job["mismatch"] else "none"
        return _job_key(
            job["experiment"],
            job["loss"],
            job["n"],
            job["t"],
            job["variable"],
            mismatch,
            job.get("label") or job["loss"],
        )

    # the resumed runs first, so that every intermediate save holds all of them (the output may be
    # the resumed file itself)
    results["runs"] = [done[key_of(job)] for job in jobs if key_of(job) in done]
    for job in jobs:
        if key_of(job) in done:
            continue
        t, variable = job.pop("t"), job.pop("variable")
        spec = replace(
            cfg.spec,
            length=t,
            keys=min(cfg.spec.keys, t),
            min_length=max(cfg.spec.keys, int(t * acfg.min_length_frac)) if variable else None,
            stop_rate=acfg.stop_rate,
        )
        rec = run_one(cfg, job.pop("experiment"), lr=acfg.lr, spec=spec, **job)
        results["runs"].append(rec)
        _log(_fmt_run(rec) + (f"  len {rec['metrics'].get('sim/length_mean') or 0:.0f}" if variable else ""))
        if save_to is not None and len(results["runs"]) % 8 == 0:
            save(results, save_to)
    t0 = time.perf_counter()
    for t in acfg.study_t:
        for k in acfg.study_k:
            spec = replace(cfg.spec, length=t, keys=min(cfg.spec.keys, t))
            res = gradient_study(
                ADAPTIVE_STUDY,
                spec,
                policy=cfg.policy,
                drift_steps=k,
                drift_lr=acfg.lr,
                n_batches=acfg.study_batches,
                chunk=128,
                seed=0,
            )
            for label, st in res.stats.items():
                row = {"T": t, "k": k, "loss": label, "token_kl": res.token_kl}
                row.update({key: val for key, val in asdict(st).items() if key != "metrics"})
                row["phi_frac_below_0.01"] = st.metrics.get("phi/frac_below_0.01")
                row["alpha"] = st.metrics.get("vespo_adaptive/alpha_pos")
                results["gradient"].append(row)
            _log(f"  gradient T={t} k={k} KL/token {res.token_kl:.4f}")
    results["timing"]["gradient"] = time.perf_counter() - t0
    results["timing"]["total"] = time.perf_counter() - t_start
    results["timing"]["total_cpu"] = time.process_time() - cpu_start
    results["timing"]["runs_cpu"] = sum(r["cpu_seconds"] for r in results["runs"])
    results["timing"]["total_cpu_all"] = results["timing"]["total_cpu"] + results["timing"].get("resumed_runs_cpu", 0.0)
    return results


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean, standard error) of the seed-wise differences a - b."""
    d = [x - y for x, y in zip(a, b)]
    return _mean(d), (_std(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0)


def adaptive_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per arm and T: N=64/N=4 ratio, paired differences against every baseline at N >= 16, N = 1."""
    rows = []
    for exp in ("adaptive_fixed", "adaptive_variable", "adaptive_mismatch"):
        for t in sorted({r["T"] for r in runs_of(results, exp)}):

            def get(loss: str, n: int, exp: str = exp, t: int = t) -> dict[str, Any] | None:
                return one(results, exp, loss=loss, n=n, T=t)

            ad4, ad64 = get("vespo_adaptive", 4), get("vespo_adaptive", 64)
            row: dict[str, Any] = {"experiment": exp, "T": t}
            if ad4 and ad64:
                row["ratio"] = _mean(ad64["final"]) / _mean(ad4["final"])
            diffs = []
            for n in (16, 64):
                ad = get("vespo_adaptive", n)
                for base in ADAPTIVE_BASELINES:
                    other = get(base, n)
                    if ad and other:
                        m, se = paired_difference(ad["final"], other["final"])
                        diffs.append({"n": n, "baseline": base, "diff": m, "se": se})
            row["diffs"] = diffs
            v1, a1 = get("vespo", 1), get("vespo_adaptive", 1)
            if v1 and a1:
                row["n1_max_abs_diff"] = max(abs(x - y) for x, y in zip(v1["final"], a1["final"]))
            rows.append(row)
    return rows


def _arm_table(results: dict[str, Any], exp: str, t: int) -> str:
    ns = sorted({r["n"] for r in runs_of(results, exp, T=t)})
    header = ["loss"] + [f"N={n}" for n in ns] + ["N=64 / N=4"]
    rows = []
    for loss in ADAPTIVE_LOSSES:
        cells = []
        for n in ns:
            r = one(results, exp, loss=loss, n=n, T=t)
            cells.append(ms(r["final"]) if r else "—")
        r4, r64 = one(results, exp, loss=loss, n=4, T=t), one(results, exp, loss=loss, n=64, T=t)
        ratio = f"{_mean(r64['final']) / _mean(r4['final']):.2f}" if r4 and r64 else "—"
        name = f"**{loss}**" if loss == "vespo_adaptive" else loss
        rows.append([name] + cells + [ratio])
    return _table(header, rows)


def _targets_md(results: dict[str, Any]) -> str:
    lines = []
    names = {
        "adaptive_fixed": "fixed lengths",
        "adaptive_variable": "variable lengths",
        "adaptive_mismatch": "fixed lengths + sampler mismatch",
    }
    rows = []
    for row in adaptive_targets(results):
        if row["T"] not in (128, 512) and row["experiment"] == "adaptive_fixed":
            continue
        ratio = row.get("ratio")
        behind = [d for d in row["diffs"] if d["diff"] < 0]
        behind_2se = [d for d in behind if -d["diff"] > 2 * d["se"]]
        ahead_2se = [d for d in row["diffs"] if d["diff"] > 2 * d["se"]]
        rows.append(
            [
                names[row["experiment"]],
                str(row["T"]),
                f"{ratio:.3f} ({'met' if ratio is not None and ratio >= 0.9 else 'not met'})"
                if ratio is not None
                else "—",
                "met"
                if not behind
                else "not met: behind "
                + ", ".join(f"{d['baseline']}@N={d['n']} ({d['diff']:+.3f} ± {d['se']:.3f})" for d in behind),
                ", ".join(f"{d['baseline']}@N={d['n']}" for d in behind_2se) or "none",
                f"{len(ahead_2se)} of {len(row['diffs'])}",
                f"{row['n1_max_abs_diff']:.1e}" if "n1_max_abs_diff" in row else "—",
            ]
        )
    lines.append(
        _table(
            [
                "arm",
                "T",
                "J(N=64)/J(N=4) ≥ 0.90",
                "≥ every baseline at N ≥ 16",
                "behind by > 2 SE",
                "ahead by > 2 SE",
                "N=1: max |J − J_vespo| over seeds",
            ],
            rows,
        )
    )
    lines.append("")
    lines.append(
        "Paired differences vespo_adaptive − baseline (final J, mean ± standard error over the 5 paired "
        "seeds), every arm and T:"
    )
    lines.append("")
    drows = []
    for row in adaptive_targets(results):
        for n in (16, 64):
            cells = []
            for base in ADAPTIVE_BASELINES:
                d = next((d for d in row["diffs"] if d["n"] == n and d["baseline"] == base), None)
                if d is None:
                    cells.append("—")
                else:
                    mark = "**" if abs(d["diff"]) > 2 * d["se"] else ""
                    cells.append(f"{mark}{d['diff']:+.3f} ± {d['se']:.3f}{mark}")
            drows.append([names[row["experiment"]], str(row["T"]), str(n)] + cells)
    lines.append(_table(["arm", "T", "N"] + list(ADAPTIVE_BASELINES), drows))
    lines.append("")
    lines.append("Bold: beyond two standard errors.")
    return "\n".join(lines)


def _alpha_table(results: dict[str, Any]) -> str:
    rows = []
    ks = (0, 1, 2, 4, 8, 16, 32, 63)
    for exp in ("adaptive_fixed", "adaptive_variable"):
        for t in sorted({r["T"] for r in runs_of(results, exp)}):
            r = one(results, exp, loss="vespo_adaptive", n=64, T=t)
            v = one(results, exp, loss="vespo", n=64, T=t)
            if not r:
                continue
            by = r["metrics_by_staleness"]
            for key, label, src in (
                ("vespo_adaptive/alpha_pos", "alpha", r),
                ("phi/ess_pos_before", "ESS(phi) before, A>0", r),
                ("phi/ess_pos_after", "ESS(phi) after, A>0", r),
                ("phi/frac_below_0.01", "vespo_adaptive: share phi<0.01", r),
            ):
                vals = src["metrics_by_staleness"].get(key) if src else None
                if vals:
                    rows.append(
                        [exp.replace("adaptive_", ""), str(t), label]
                        + [_f(vals[k], 2) if k < len(vals) else "—" for k in ks]
                    )
            if v and v["metrics_by_staleness"].get("phi/frac_below_0.01"):
                vals = v["metrics_by_staleness"]["phi/frac_below_0.01"]
                rows.append(
                    [exp.replace("adaptive_", ""), str(t), "vespo: share phi<0.01"]
                    + [_f(vals[k], 2) if k < len(vals) else "—" for k in ks]
                )
            del by
    return _table(["lengths", "T", "quantity (N=64)"] + [f"k={k}" for k in ks], rows)


def _ablation_md(results: dict[str, Any]) -> str:
    rows = []
    for r in runs_of(results, "adaptive_ablation"):
        fixed = r.get("min_length") is None
        default = one(
            results, "adaptive_fixed" if fixed else "adaptive_variable", loss="vespo_adaptive", n=r["n"], T=r["T"]
        )
        d = paired_difference(r["final"], default["final"]) if default else None
        rows.append(
            [
                r["label"],
                str(r["T"]),
                "fixed" if fixed else "variable",
                json.dumps(r["params"]),
                ms(r["final"]),
                f"{d[0]:+.3f} ± {d[1]:.3f}" if d else "—",
                _f(r["metrics"].get("vespo_adaptive/alpha_pos"), 3),
            ]
        )
    for t in sorted({r["T"] for r in runs_of(results, "adaptive_ablation")}):
        r = one(results, "adaptive_fixed", loss="vespo_adaptive", n=64, T=t)
        if r:
            rows.insert(
                0,
                [
                    "**default**",
                    str(t),
                    "fixed",
                    "{}",
                    ms(r["final"]),
                    "0",
                    _f(r["metrics"].get("vespo_adaptive/alpha_pos"), 3),
                ],
            )
    return _table(
        ["variant (N=64)", "T", "lengths", "parameters", "final J", "minus default (paired, ± SE)", "mean alpha (A>0)"],
        rows,
    )


def _gradient_md(results: dict[str, Any]) -> str:
    rows = []
    for g in results["gradient"]:
        rows.append(
            [
                str(g["T"]),
                str(g["k"]),
                g["loss"],
                _f(g["cosine_debiased"], 2),
                _f(g["rel_bias_debiased"], 2),
                _f(g["rel_var"], 3),
                _f(g["scale"], 2),
                _f(g.get("toward_mu"), 2),
                _f(g["phi_frac_below_0.01"], 2),
            ]
        )
    return _table(
        [
            "T",
            "k",
            "loss",
            "cos (debiased)",
            "rel. bias (debiased)",
            "rel. var",
            "scale",
            "bias toward mu (cos)",
            "phi<0.01",
        ],
        rows,
    )


def _length_md(results: dict[str, Any]) -> str:
    rows = []
    for t in sorted({r["T"] for r in runs_of(results, "adaptive_variable")}):
        for loss in ("vespo_adaptive", "vespo", "topr", "cispo"):
            r = one(results, "adaptive_variable", loss=loss, n=64, T=t)
            if r:
                rows.append([str(t), loss, _f(r["metrics"].get("sim/length_mean"), 1), ms(r["final"])])
        r = next((x for x in runs_of(results, "adaptive_ablation", T=t) if x.get("min_length") is not None), None)
        if r:
            rows.append([str(t), r["label"], _f(r["metrics"].get("sim/length_mean"), 1), ms(r["final"])])
    return _table(["T max", "loss (N=64, variable lengths)", "mean length over training", "final J"], rows)


def _suffix(results: dict[str, Any]) -> str:
    """'' for the main sweep (256 steps), '_steps512' etc. for a longer-budget check."""
    steps = results["config"]["steps"]
    return "" if steps == AdaptiveConfig.steps else f"_steps{steps}"


def plot_adaptive(results: dict[str, Any], img_dir: Path) -> list[Path]:
    plt = pyplot()
    suffix = _suffix(results)
    panels = [("adaptive_fixed", t) for t in sorted({r["T"] for r in runs_of(results, "adaptive_fixed")})]
    panels += [
        (e, t)
        for e in ("adaptive_variable", "adaptive_mismatch")
        for t in sorted({r["T"] for r in runs_of(results, e)})
    ]
    cols = 4
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False)
    colors = {**COLORS, "vespo_adaptive": "black", "gmpo": "tab:brown"}
    for ax, (exp, t) in zip(axes.flat, panels):
        for loss in ADAPTIVE_LOSSES:
            pts = sorted((r["n"], _mean(r["final"]), _std(r["final"])) for r in runs_of(results, exp, loss=loss, T=t))
            if not pts:
                continue
            ns, mu, sd = zip(*pts)
            ax.errorbar(
                ns,
                mu,
                yerr=sd,
                marker="o",
                ms=3,
                capsize=2,
                label=loss,
                color=colors.get(loss),
                lw=2.2 if loss == "vespo_adaptive" else 1.0,
            )
        ax.set_xscale("log", base=2)
        ax.set_title(f"{exp.replace('adaptive_', '')}, T={t}", fontsize=9)
        ax.set_xlabel("staleness N")
        ax.set_ylabel("final exact J")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out = [img_dir / f"sim_adaptive_final_vs_n{suffix}.png"]
    fig.savefig(out[0], dpi=110)
    plt.close(fig)
    if suffix:  # a longer-budget check: the staleness plot below belongs to the main sweep
        return out

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    for exp, ls in (("adaptive_fixed", "-"), ("adaptive_variable", "--")):
        for t in sorted({r["T"] for r in runs_of(results, exp)}):
            r = one(results, exp, loss="vespo_adaptive", n=64, T=t)
            v = one(results, exp, loss="vespo", n=64, T=t)
            if r and r["metrics_by_staleness"].get("vespo_adaptive/alpha_pos"):
                ax[0].plot(r["metrics_by_staleness"]["vespo_adaptive/alpha_pos"], ls, label=f"{exp[9:]} T={t}")
            if v and v["metrics_by_staleness"].get("phi/frac_below_0.01"):
                ax[1].plot(v["metrics_by_staleness"]["phi/frac_below_0.01"], ls, label=f"vespo {exp[9:]} T={t}")
            if r and r["metrics_by_staleness"].get("phi/frac_below_0.01"):
                ax[1].plot(
                    r["metrics_by_staleness"]["phi/frac_below_0.01"], ls, lw=2.2, label=f"adaptive {exp[9:]} T={t}"
                )
    ax[0].set_xlabel("staleness k of the mini-batch (N = 64)")
    ax[0].set_ylabel("alpha")
    ax[0].set_yscale("log")
    ax[1].set_xlabel("staleness k of the mini-batch (N = 64)")
    ax[1].set_ylabel("share of sequences with phi < 0.01")
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=6)
    fig.tight_layout()
    out.append(img_dir / "sim_adaptive_alpha.png")
    fig.savefig(out[1], dpi=110)
    plt.close(fig)
    return out


def render_adaptive(results: dict[str, Any]) -> str:
    """The generated block of docs/adaptive.md."""
    tm = results["timing"]
    resumed = ""
    if "resumed_runs_cpu" in tm:
        resumed = (
            f" (this invocation; the resumed earlier parts added {tm['resumed_wall'] / 60:.1f} minutes wall clock "
            f"and {tm['resumed_runs_cpu'] / 60:.1f} CPU-minutes: "
            f"{(tm['total'] + tm['resumed_wall']) / 60:.1f} wall and {tm['total_cpu_all'] / 60:.1f} CPU-minutes "
            "in all, on a machine shared with other jobs)"
        )
    parts = [
        f"Generated by `{results.get('command', 'python benchmarks/simulator.py --adaptive')}` from "
        f"`benchmarks/results/simulator_adaptive{_suffix(results)}.json`: {tm['total'] / 60:.1f} minutes wall clock, "
        f"{tm['total_cpu'] / 60:.1f} CPU-minutes on one thread{resumed}. "
        f"{results['config']['steps']} optimizer steps of "
        f"64 responses, lr {results['config']['lr']}, seeds {', '.join(map(str, results['config']['seeds']))}; "
        "final exact J, mean ± std over seeds.",
        "",
        "### Targets",
        "",
        _targets_md(results),
        "",
    ]
    for exp, title in (
        ("adaptive_fixed", "Fixed lengths, no mismatch"),
        ("adaptive_variable", "Variable lengths (EOS from T/4 on), no mismatch"),
        ("adaptive_mismatch", "Fixed lengths, sampler mismatch (logit noise 0.1, ratio against mu)"),
    ):
        for t in sorted({r["T"] for r in runs_of(results, exp)}):
            parts += [f"### {title}, T = {t}", "", _arm_table(results, exp, t), ""]
    if _suffix(results):  # a longer-budget check has no staleness, ablation or gradient parts
        return "\n".join([*parts, f"![final J vs N](img/sim_adaptive_final_vs_n{_suffix(results)}.png)", ""])
    parts += [
        "![final J vs N](img/sim_adaptive_final_vs_n.png)",
        "",
        "### What the adaptation does, by staleness k of the mini-batch (N = 64, mean over training)",
        "",
        _alpha_table(results),
        "",
        "![alpha and dropped share](img/sim_adaptive_alpha.png)",
        "",
        "### Response length with variable lengths",
        "",
        _length_md(results),
        "",
        "### Ablations",
        "",
        _ablation_md(results),
        "",
        "### Gradient bias and variance against the exact gradient (fixed lengths, seed 0)",
        "",
        _gradient_md(results),
        "",
    ]
    return "\n".join(parts)


def write_adaptive_doc(results: dict[str, Any], path: Path = ADAPTIVE_DOC) -> None:
    """Replace the generated block of docs/adaptive.md (between the markers) with fresh tables."""
    steps = "" if not _suffix(results) else f" --steps {results['config']['steps']}"
    replace_generated_block(path, f"benchmarks/simulator.py --adaptive{steps}", render_adaptive(results))


def resume_results(out: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The results JSON at ``out`` when it holds runs of ``cfg`` (a run resumes from it), else a new
    one. A file that is not such a JSON, or holds another configuration, stops the script with one
    line and is left as it was."""
    results: dict[str, Any] = {"config": cfg, "runs": []}
    if out.exists():
        try:
            old = json.loads(out.read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"{out} is not a results JSON of this script ({err}); pass another --out") from None
        if not isinstance(old, dict) or old.get("config") != cfg:
            raise SystemExit(f"{out} holds runs of another configuration; pass another --out or remove it")
        results = old
    out.parent.mkdir(parents=True, exist_ok=True)
    return results


def append_run(
    results: dict[str, Any], out: Path, row: dict[str, Any], final: list[float], start: tuple[float, float]
) -> dict[str, Any]:
    """Add one finished run (``row`` plus its per-seed final J and its wall and CPU seconds since
    ``start`` = (perf_counter, process_time)) to ``results`` and save them atomically to ``out``."""
    row = dict(
        row,
        final=[round(x, 5) for x in final],
        seconds=round(time.perf_counter() - start[0], 1),
        cpu_seconds=round(time.process_time() - start[1], 1),
    )
    results["runs"].append(row)
    write_text_atomic(out, json.dumps(results, indent=1))
    return row


def replace_generated_block(path: Path, command: str, body: str) -> None:
    """Put ``body`` between ``<!-- BEGIN GENERATED: command -->`` and the next end marker of ``path``
    (appending the markers if the file lacks them); the rest of the file is kept."""
    begin, end = f"<!-- BEGIN GENERATED: {command} -->", "<!-- END GENERATED -->"
    text = path.read_text() if path.exists() else f"# {path.stem}\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)  # the first end marker after this block's begin
    write_text_atomic(path, f"{head}{begin}\n{body}\n{end}{tail}")  # a kill leaves the old doc or the new


def adaptive_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        if args.steps is not None and args.steps < 1:
            raise SystemExit(f"--steps must be a positive number of optimizer steps, got {args.steps}")
        if args.quick:
            acfg, name = adaptive_quick(), "simulator_adaptive_quick.json"
        elif args.steps is not None and args.steps != AdaptiveConfig.steps:
            acfg, name = adaptive_long(args.steps), f"simulator_adaptive_steps{args.steps}.json"
        else:
            acfg, name = AdaptiveConfig(), ADAPTIVE_OUT.name
        out = args.out or ADAPTIVE_OUT.with_name(name)
        resume = json.loads(args.resume.read_text()) if args.resume else None
        results = adaptive_sweep(acfg, save_to=out, resume=resume)
        results["command"] = "OMP_NUM_THREADS=1 python benchmarks/simulator.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        save(results, out)
        print(f"wrote {out} ({results['timing']['total']:.0f}s wall, {results['timing']['total_cpu']:.0f}s cpu)")
    for row in adaptive_targets(results):
        print(row["experiment"], row["T"], "ratio", row.get("ratio"), "n1", row.get("n1_max_abs_diff"))
    if results["config"].get("quick"):
        print(render_adaptive(results)[:2000])
        return 0
    if not args.no_plots:
        for p in plot_adaptive(results, args.img_dir):
            print(f"wrote {p}")
    if not args.no_doc:
        write_adaptive_doc(results)
        print(f"wrote {ADAPTIVE_DOC}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (seconds)")
    parser.add_argument("--parts", default=",".join(ALL_PARTS), help=f"comma-separated subset of {','.join(ALL_PARTS)}")
    parser.add_argument("--lr", type=float, default=None, help="skip tuning and use this learning rate")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON path (default {DEFAULT_OUT.relative_to(ROOT)}; quick: benchmarks/results/simulator_quick.json)",
    )
    parser.add_argument("--img-dir", type=Path, default=DEFAULT_IMG)
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--from-json", type=Path, default=None, help="only redo plots, summary and doc from a JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="--adaptive only: keep the runs of this (interrupted) JSON and run the rest",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"--adaptive only: optimizer steps; other than {AdaptiveConfig.steps}, a check of the targets at that "
        "budget (T = 128 and 512, no ablations) in its own JSON and doc block",
    )
    parser.add_argument(
        "--adaptive",
        action="store_true",
        help="the vespo_adaptive sweep (docs/adaptive.md, benchmarks/results/simulator_adaptive.json)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.adaptive:
        return adaptive_main(args, argv)

    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        cfg = quick_config(losses=("vespo", "grpo", "cispo"), ns=(1, 4)) if args.quick else full_config()
        cfg.lr = args.lr
        parts = tuple(p for p in args.parts.split(",") if p)
        unknown = set(parts) - set(ALL_PARTS)
        if unknown:
            parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
        out = args.out or (DEFAULT_OUT.with_name("simulator_quick.json") if args.quick else DEFAULT_OUT)
        results = run(cfg, parts, save_to=out)
        results["command"] = "python benchmarks/simulator.py " + " ".join(argv if argv is not None else sys.argv[1:])
        results["threads"] = args.threads
        save(results, out)
        print(f"wrote {out} ({results['timing']['total']:.0f}s wall, {results['timing']['total_cpu']:.0f}s cpu)")
    print_summary(results)
    quick = results["config"].get("quick", False)
    if not args.no_plots and not quick:
        for p in make_plots(results, args.img_dir):
            print(f"wrote {p}")
    if not args.no_doc and not quick:
        args.doc.write_text(render_doc(results))
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
