"""Tier-1 staleness benchmark on the sequence-level simulator (:mod:`vespo.simulator`).

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
  These four "sensitivity" parts run every core loss at N = 64 and VESPO and CISPO at N = 4.
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

from vespo.simulator import Mismatch, PolicySpec, TaskSpec, gradient_study, make_task, train

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
    sens_n: int = 64  # sensitivity parts: every core loss at this N ...
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
        spec=spec, policy=PolicySpec("mlp", embed=8, hidden=16), steps=16, eval_every=4, seeds=(0, 1),
        tune_seeds=(100,), lr_grid=(0.005, 0.01), tune_losses=losses[:1], ns=ns, losses=losses,
        core=losses, mismatch_losses=losses, ablation_ns=ns[-1:], c_scales=(2.0,), c_sweep_ns=ns[-1:],
        sens_n=ns[-1], sens_ref_n=ns[0], sens_ref_losses=losses[:1], t_values=(8,), fix_ns=ns[-1:],
        study_t=(8, 16), study_k=(2,),
        study_k_extra=(), study_batches=64, study_chunk=32, quick=True,
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


def run_one(cfg: Config, experiment: str, loss: str, n: int, *, lr: float, label: str | None = None,
            spec: TaskSpec | None = None, mismatch: Mismatch | None = None, is_source: str | None = None,
            loss_params: dict[str, Any] | None = None, seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Train one configuration over the seeds and summarise it as a JSON-ready record."""
    spec = spec or cfg.spec
    mm = mismatch or Mismatch()
    src = is_source or ("sampler" if mm.kind != "none" else "trainer")
    seeds = seeds or cfg.seeds
    task = make_task(spec, seeds)
    res = train(loss, task, n_stale=n, steps=cfg.steps, lr=lr, policy=cfg.policy, mismatch=mm,
                is_source=src, loss_params=loss_params, eval_every=cfg.eval_every, sample_seed=1234)
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
        "metrics_by_staleness": {k: [None if x != x else round(x, 5) for x in v]
                                 for k, v in res.metrics_by_staleness.items()
                                 if k in ("phi/frac_below_0.01", "is/abs_log_w_mean", "is/token_kl", "phi/mean")},
        "grad_norm_max": max(res.grad_norm),
        "seconds": round(res.seconds, 2),
        "cpu_seconds": round(res.cpu_seconds, 2),
        "context": spec.context,
    }
    return rec


def _log(msg: str) -> None:
    print(msg, flush=True)


def _fmt_run(r: dict[str, Any]) -> str:
    return (f"  {r['experiment']:<12} {r['label']:<14} N={r['n']:<3} T={r['T']:<4} mm={r['mismatch']:<5} "
            f"final {_mean(r['final']):.3f}±{_std(r['final']):.3f}  best {_mean(r['best']):.3f}  "
            f"phi<.01 {r['metrics'].get('phi/frac_below_0.01') or 0:.3f}  ({r['seconds']:.1f}s, cpu {r['cpu_seconds']:.1f}s)")


def tune(cfg: Config) -> dict[str, Any]:
    """Grid over lr at N = 1 (no mismatch) on the tuning seeds; returns the grid and the choice."""
    grid = []
    for loss in cfg.tune_losses:
        for lr in cfg.lr_grid:
            r = run_one(cfg, "tune", loss, 1, lr=lr, seeds=cfg.tune_seeds)
            grid.append({"loss": loss, "lr": lr, "auc": _mean(r["auc"]), "final": _mean(r["final"]),
                         "auc_seeds": r["auc"], "final_seeds": r["final"], "seconds": r["seconds"]})
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
        res = gradient_study(losses, spec, policy=cfg.policy, drift_steps=k, drift_lr=lr,
                             n_batches=cfg.study_batches, chunk=cfg.study_chunk, seed=0)
        for label, st in res.stats.items():
            row = {"T": t, "k": k, "loss": label, "token_kl": res.token_kl, "reward_mu": res.reward_mu,
                   "reward_pi": res.reward_pi, "num_params": res.num_params}
            row.update({key: val for key, val in asdict(st).items() if key != "metrics"})
            row["phi_frac_below_0.01"] = st.metrics.get("phi/frac_below_0.01")
            row["abs_log_w_mean"] = st.metrics.get("is/abs_log_w_mean")
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
    abl = [dict(loss="vespo", n=n, label=label, loss_params=params)
           for label, params in ablation_configs(cfg) for n in cfg.ablation_ns]
    abl += [dict(loss="vespo", n=n, label=label, loss_params=params)
            for label, params in ablation_configs(cfg) if label.startswith("c_x")
            for n in cfg.c_sweep_ns if n not in cfg.ablation_ns]
    do("ablation", abl)

    def sensitivity(**kw: Any) -> list[dict[str, Any]]:
        jobs = [dict(loss=loss, n=cfg.sens_n, **kw) for loss in cfg.core]
        return jobs + [dict(loss=loss, n=cfg.sens_ref_n, **kw) for loss in cfg.sens_ref_losses]

    do("tsweep", [job for t in cfg.t_values
                  for job in sensitivity(spec=replace(cfg.spec, length=t, keys=min(cfg.spec.keys, t)))])
    do("context", sensitivity(spec=replace(cfg.spec, context="none")))
    do("entropy", sensitivity(spec=replace(cfg.spec, init_scale=cfg.entropy_scale)))
    do("lr", sensitivity(lr=lr * cfg.lr_factor))
    do("mismatch_fix", [dict(loss=loss, n=n, mismatch=cfg.mismatch, is_source=src, label=f"{loss}/{src}")
                        for loss in ("vespo", "grpo") for src in ("trainer", "tis") for n in cfg.fix_ns])
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
            return None if not math.isfinite(x) else round(x, 6)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(results), indent=1) + "\n")


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
            rows.append({"n": n, "baseline": r["loss"], "diff_mean": _mean(diff), "diff_std": _std(diff),
                         "ok": _mean(diff) >= 0})
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
            print(f"  target VESPO J(64)/J(4) >= 0.90: {t['vespo_ratio_64_4']:.3f} -> {'met' if t['ratio_ok'] else 'NOT met'}")
        for row in t["vs_baselines"]:
            print(f"  VESPO - {row['baseline']:<9} at N={row['n']:<3}: {row['diff_mean']:+.3f} ± {row['diff_std']:.3f} "
                  f"(paired over seeds) -> {'ok' if row['ok'] else 'VESPO behind'}")


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

COLORS = {"vespo": "tab:red", "grpo": "tab:blue", "gspo": "tab:green", "sapo": "tab:orange", "cispo": "tab:purple",
          "reinforce": "tab:gray", "topr": "tab:brown", "seq_is": "black", "tok_is": "tab:cyan"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def plot_curves(results: dict[str, Any], path: Path, mismatch: str) -> None:
    plt = _plt()
    rows = runs_of(results, "main", mismatch=mismatch)
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    ns = results["config"]["ns"]
    cols = min(4, len(losses))
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
    for ax in axes.flat[len(losses):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    for ax in axes[:, 0]:
        ax.set_ylabel("exact reward J")
    axes.flat[0].legend(loc="upper left", fontsize=8)
    title = "no mismatch" if mismatch == "none" else f"sampler mismatch ({mismatch} {results['config']['mismatch']['scale']}, W vs mu)"
    fig.suptitle(f"Learning curves by staleness N (T={results['config']['spec']['length']}, mean ± std over "
                 f"{len(results['config']['seeds'])} seeds; {title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_final_vs_n(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    cfg = results["config"]
    mms = [m for m in ("none", cfg["mismatch"]["kind"]) if runs_of(results, "main", mismatch=m)]
    fig, axes = plt.subplots(1, len(mms), figsize=(5.6 * len(mms), 3.9), sharey=True, squeeze=False)
    for ax, mm in zip(axes[0], mms):
        rows = runs_of(results, "main", mismatch=mm)
        for loss in dict.fromkeys(r["loss"] for r in rows):
            pts = [one(results, "main", loss=loss, n=n, mismatch=mm) for n in cfg["ns"]]
            pts = [p for p in pts if p]
            ax.errorbar([p["n"] for p in pts], [_mean(p["final"]) for p in pts], yerr=[_std(p["final"]) for p in pts],
                        label=loss, color=COLORS.get(loss), marker="o", capsize=3, lw=2.2 if loss == "vespo" else 1.3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg["ns"], [str(n) for n in cfg["ns"]])
        ax.set_xlabel("staleness N (mini-batches per rollout)")
        ax.set_title("no mismatch" if mm == "none" else f"with sampler mismatch ({mm})")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"final exact reward J (step {cfg['steps']})")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gradient(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = results["gradient"]
    ks = sorted({r["k"] for r in rows if r["k"] > 0 and len({x["T"] for x in rows if x["k"] == r["k"]}) > 1})
    metrics = [("cosine_debiased", "cos(E g, grad J)", False), ("rel_bias_debiased", "||E g - grad J|| / ||grad J||", True),
               ("rel_var", "tr Cov(g) / ||grad J||^2", True), ("scale", "<E g, grad J> / ||grad J||^2", False)]
    fig, axes = plt.subplots(len(ks), len(metrics), figsize=(4.0 * len(metrics), 3.1 * len(ks)), squeeze=False)
    labels = list(dict.fromkeys(r["loss"] for r in rows if r["k"] > 0))
    for i, k in enumerate(ks):
        for j, (key, name, logy) in enumerate(metrics):
            ax = axes[i][j]
            for label in labels:
                pts = sorted([r for r in rows if r["k"] == k and r["loss"] == label], key=lambda r: r["T"])
                ys = [r[key] if r[key] is not None else float("nan") for r in pts]
                ax.plot([r["T"] for r in pts], ys, marker="o", ms=3, color=COLORS.get(label), label=label,
                        lw=2.2 if label == "vespo" else 1.2, ls="--" if label in ("seq_is", "tok_is", "reinforce") else "-")
            if key == "rel_var":
                ref = sorted([r for r in rows if r["k"] == 0], key=lambda r: r["T"])
                ax.plot([r["T"] for r in ref], [r["rel_var"] for r in ref], color="k", lw=0.8, ls=":", label="on-policy")
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            if key == "cosine_debiased":
                ax.set_ylim(-0.2, 1.05)
            kl = _mean([r["token_kl"] for r in rows if r["k"] == k])
            ax.set_title(f"{name}\nstaleness k={k} (KL/token ~{kl:.3g})", fontsize=9)
            ax.set_xlabel("response length T")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle("Mini-batch gradient vs the exact on-policy gradient (data k steps stale; debiased for MC noise)")
    fig.tight_layout()
    fig.savefig(path, dpi=105)
    plt.close(fig)


def plot_ablation(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
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
            r = one(results, "main", loss="vespo", n=n, mismatch="none") if lab == "vespo" else one(results, "ablation", label=lab, n=n)
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
            r = one(results, "main", loss="vespo", n=n, mismatch="none") if s_label == "vespo" else one(results, "ablation", label=s_label, n=n)
            if r:
                pts.append((scale, r["metrics"].get("phi/frac_below_0.01") or 0.0, _mean(r["final"]), _std(r["final"])))
        pts.sort()
        ax2.errorbar([p[1] for p in pts], [p[2] for p in pts], yerr=[p[3] for p in pts], marker="o", capsize=3, label=f"N={n}")
        for p in pts:
            ax2.annotate(f"x{p[0]:g}", (p[1], p[2]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax2.set_xlabel("share of sequences with phi < 0.01 (mean over training)")
    ax2.set_ylabel("final exact reward J")
    ax2.set_title("(c1, c2) scaled by x s for both signs")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sensitivity_settings(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, experiment, match) of each setting compared at N = sens_n: the main one first."""
    cfg = results["config"]
    out = [(f"main (T={cfg['spec']['length']})", "main", {"mismatch": "none"})]
    out += [(f"T={t}", "tsweep", {"T": t}) for t in cfg["t_values"]]
    out += [("no context", "context", {}), (f"init_scale={cfg['entropy_scale']:g}", "entropy", {}),
            (f"lr x{cfg['lr_factor']:g}", "lr", {})]
    return [o for o in out if runs_of(results, o[1], **o[2])]


def plot_sensitivity(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    cfg = results["config"]
    settings = sensitivity_settings(results)
    n = cfg["sens_n"]
    fig, ax = plt.subplots(figsize=(11, 4.0))
    width = 0.8 / len(cfg["core"])
    for i, loss in enumerate(cfg["core"]):
        ys, es = [], []
        for _, exp, match in settings:
            r = one(results, exp, loss=loss, n=n, **match)
            ys.append(_mean(r["final"]) if r else float("nan"))
            es.append(_std(r["final"]) if r else 0.0)
        ax.bar([x + i * width for x in range(len(settings))], ys, width, yerr=es, capsize=2, label=loss,
               color=COLORS.get(loss), edgecolor="k" if loss == "vespo" else None)
        if loss in cfg["sens_ref_losses"]:  # the same loss at N = sens_ref_n: a tick
            ref = [one(results, exp, loss=loss, n=cfg["sens_ref_n"], **match) for _, exp, match in settings]
            ax.scatter([x + i * width for x in range(len(settings))],
                       [_mean(r["final"]) if r else float("nan") for r in ref], marker="_", s=220, color="k", zorder=5)
    ax.set_xticks([x + width * (len(cfg["core"]) - 1) / 2 for x in range(len(settings))], [s[0] for s in settings])
    ax.set_ylabel(f"final exact reward J at N={n}")
    ax.set_ylim(0, 1)
    ax.set_title(f"Sensitivity of the N={n} comparison (black ticks: the same loss at N={cfg['sens_ref_n']}; "
                 f"mean ± std over {len(cfg['seeds'])} seeds)", fontsize=10)
    ax.legend(fontsize=8, ncol=len(cfg["core"]), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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


def render_doc(results: dict[str, Any]) -> str:
    """docs/results_simulator.md from the results (placeholder until the full run exists)."""
    return "# Tier-1 simulator results\n"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (seconds)")
    parser.add_argument("--parts", default=",".join(ALL_PARTS), help=f"comma-separated subset of {','.join(ALL_PARTS)}")
    parser.add_argument("--lr", type=float, default=None, help="skip tuning and use this learning rate")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(ROOT)}; "
                        "quick: benchmarks/results/simulator_quick.json)")
    parser.add_argument("--img-dir", type=Path, default=DEFAULT_IMG)
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--from-json", type=Path, default=None, help="only redo plots, summary and doc from a JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

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
