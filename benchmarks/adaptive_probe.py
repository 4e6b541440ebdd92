"""Why vespo_adaptive keeps learning at T = 512, N = 64, and which changes to it do not help.

    OMP_NUM_THREADS=1 python benchmarks/adaptive_probe.py            # ~20 CPU-minutes, 1 core
    OMP_NUM_THREADS=1 python benchmarks/adaptive_probe.py --quick    # CI-sized (seconds)

The tier-1 simulator (benchmarks/lib/simulator.py) at the main page's budget (512 optimizer steps of
64 responses, lr 0.007), on the **tuning seeds** 100-104 (not the evaluation seeds of the sweeps in
docs/adaptive.md, so nothing here is tuned on them), fixed lengths, T in {128, 512}, N in {4, 16, 64}.
Every variant is compared with the default ``vespo_adaptive`` of the same run, seed by seed:

- ``tau 0.99``: a stricter ESS target (alpha falls further, the weights are closer to uniform);
- ``kernel x0.5``: (c1, c2) halved to (1, 1.5) and (1.5, 1), a wider kernel (c1 >= 1 still holds);
- ``token bridge``: per-token weight phi(rho_t^(1 - alpha) W^alpha), the importance weight towards
  pi at token t and towards the geometric bridge at every other token (alpha = 1: vespo);
- ``pull x0.5``, ``pull x0.25``, ``sign-normalised``: the mean weight of each advantage sign m moved
  towards 1 (phi * m^(pull - 1), pull 0.5, 0.25 and 0). The kernel's sign asymmetry gives the signs
  different means, which pulls the step back towards mu; sign normalisation removes the pull;
- ``uniform (REINFORCE)``: no weight at all, the limit alpha -> 0 without the kernel;
- ``per-token remainder``: the untempered part W^(1 - alpha) = prod_t rho_t^(1 - alpha) applied per
  decision, min(rho_t^(1 - alpha), 2) on token t (``remainder='token'``, found after these probes
  and now the library default). Every other row is the first version (``remainder='none'``).

The probe kernels are registered here, on top of ``vespo_adaptive``'s own kernel and statistics,
and not in the library: besides the measurements below, the pull variants take their per-sign means
from the call's own batch, so unlike ``vespo_adaptive`` they are not exact under micro-batching.
Register them with :func:`register_probe_losses` only in a process of their own (the tests remove
them again). Writes ``benchmarks/results/adaptive_probe.json`` (saved after every run; an interrupted
run resumes from it), ``docs/img/adaptive_probe.png`` and the generated block of docs/adaptive.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.simulator import PolicySpec, TaskSpec, make_task, train  # noqa: E402
from benchmarks.simulator import (  # noqa: E402
    ADAPTIVE_DOC,
    append_run,
    ms,
    paired_difference,
    pyplot,
    replace_generated_block,
    resume_results,
)
from vespo.losses import get_loss_spec, list_losses, register_policy_loss, vespo_adaptive_batch_stats  # noqa: E402
from vespo.losses.reinforce import _logp_coeff  # noqa: E402
from vespo.losses.types import KernelOutput, LossBatch  # noqa: E402
from vespo.losses.vespo import vespo_log_phi  # noqa: E402
from vespo.losses.vespo_adaptive import AdaptiveStats, _coefficients, resolve_alpha  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "adaptive_probe.json"
IMG = ROOT / "docs" / "img" / "adaptive_probe.png"
COMMAND = "benchmarks/adaptive_probe.py"
_KERNEL_X05 = {"k_pos": 1.0, "lambda_pos": 1.5, "k_neg": 1.5, "lambda_neg": 1.0}

#: probe kernel -> the share of the pull towards mu it keeps (see :func:`pull_loss`)
PULLS = {"probe_pull_half": 0.5, "probe_pull_quarter": 0.25, "probe_sign_norm": 0.0}

#: the defaults when these probes were run (2026-12-02/07): tau 0.9 and no mass floor, pinned so that
#: a rerun reproduces benchmarks/results/adaptive_probe.json
_THEN = {"tau": 0.9, "mass_target": 0.0}
#: the first version of vespo_adaptive, which these probes were run against: no per-token remainder
_FIRST = {**_THEN, "remainder": "none"}

#: label -> (registered loss, parameters); the first is the reference of every paired difference.
#: "default" is the first version (remainder 'none'); "per-token remainder" is today's default.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("vespo_adaptive", _FIRST),
    "tau 0.99": ("vespo_adaptive", {**_FIRST, "tau": 0.99}),
    "kernel x0.5": ("vespo_adaptive", {**_FIRST, **_KERNEL_X05}),
    "token bridge": ("probe_token_bridge", _FIRST),
    "pull x0.5": ("probe_pull_half", _FIRST),
    "pull x0.25": ("probe_pull_quarter", _FIRST),
    "sign-normalised": ("probe_sign_norm", _FIRST),
    "uniform (REINFORCE)": ("reinforce", {}),
    "per-token remainder": ("vespo_adaptive", {**_THEN, "remainder": "token"}),
}


def _adaptive_parts(batch: LossBatch, params: dict[str, Any]) -> tuple[KernelOutput, torch.Tensor, torch.Tensor]:
    """The first version's output on ``batch`` (vespo_adaptive with ``remainder='none'``, whatever
    ``params`` says: the probe kernels are variants of it), its [B] alpha and its [B] group index."""
    params = {**params, "remainder": "none"}
    out = get_loss_spec("vespo_adaptive").kernel(batch, **params)
    stats: AdaptiveStats | None = params["batch_stats"]
    if stats is None:  # the call's own batch, as vespo_adaptive does
        own = {k: v for k, v in params.items() if k != "batch_stats"}
        stats = vespo_adaptive_batch_stats(out.seq_log_w, batch.seq_advantages, batch.lengths > 0, **own)
    alpha, _ = resolve_alpha(
        stats,
        alpha_min=params["alpha_min"],
        grid=int(params["grid"]),
        tau=params["tau"],
        mass_target=params["mass_target"],
        per_sign=params["per_sign"],
        criterion=params["criterion"],
    )
    n = batch.seq_advantages.numel()
    groups = stats.groups if stats.groups is not None else torch.zeros(n, dtype=torch.long)
    sign = (batch.seq_advantages < 0).long()
    alpha_b = torch.tensor(alpha, dtype=torch.float64)[groups, sign].to(batch.log_prob.dtype)
    return out, alpha_b, groups


def token_bridge_loss(batch: LossBatch, **params: Any) -> KernelOutput:
    """-phi(rho_t^(1 - alpha) W^alpha) * A * log pi_t per token, alpha from vespo_adaptive."""
    out, alpha, _ = _adaptive_parts(batch, params)
    c1, c2 = _coefficients(batch.seq_advantages, alpha, params)  # vespo_adaptive's (c1, c2) per sequence
    log_v = alpha[:, None] * out.seq_log_w[:, None] + (1.0 - alpha[:, None]) * batch.log_ratio.detach()
    phi_t = torch.exp(vespo_log_phi(log_v, c1[:, None], c2[:, None])).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    out.logp_coeff = -(phi_t * batch.token_advantages)
    return out


def pull_loss(batch: LossBatch, pull: float, **params: Any) -> KernelOutput:
    """vespo_adaptive's phi times m^(pull - 1), m its mean over the same group and advantage sign.

    The kernel gives A >= 0 and A < 0 different mean weights; the difference makes the step raise the
    likelihood of the behaviour samples, a pull back towards mu. ``pull`` = 1 keeps it (the default
    loss), 0 removes it (each sign's weights have mean 1), values between scale the two means down
    towards 1 geometrically."""
    out, _, groups = _adaptive_parts(batch, params)
    slot = groups * 2 + (batch.seq_advantages < 0).long()
    ok = (batch.lengths > 0).to(out.seq_weight.dtype)
    n_slots = int(slot.max()) + 1
    mass = torch.zeros(n_slots, dtype=ok.dtype).index_add_(0, slot, out.seq_weight * ok)
    count = torch.zeros(n_slots, dtype=ok.dtype).index_add_(0, slot, ok)
    phi = out.seq_weight * (mass / count.clamp_min(1.0)).clamp_min(1e-30)[slot] ** (pull - 1.0)
    out.seq_weight, out.logp_coeff = phi, _logp_coeff(batch, phi)
    return out


def register_probe_losses() -> None:
    """Register the probe kernels (once per process) with vespo_adaptive's parameters."""
    spec = get_loss_spec("vespo_adaptive")
    kernels = {"probe_token_bridge": token_bridge_loss}
    kernels.update({name: functools.partial(pull_loss, pull=pull) for name, pull in PULLS.items()})
    for name, kernel in kernels.items():
        summary = f"vespo_adaptive variant {name} (benchmarks/adaptive_probe.py)"
        if name not in list_losses():
            register_policy_loss(name, params=spec.params, summary=summary, level="sequence")(kernel)


def config(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(t_values=[16], ns=[1, 4], steps=8, seeds=[100, 101], lr=0.007, eval_every=4, quick=True)
    return dict(
        t_values=[128, 512], ns=[4, 16, 64], steps=512, seeds=[100, 101, 102, 103, 104], lr=0.007, eval_every=64
    )


def run(cfg: dict[str, Any], out: Path, variants: dict[str, tuple[str, dict[str, Any]]] = VARIANTS) -> dict[str, Any]:
    """Every (variant, T, N) run, saved after each one; runs already in ``out`` are kept."""
    register_probe_losses()
    results = resume_results(out, cfg)
    done = {(r["label"], r["T"], r["N"]) for r in results["runs"]}
    jobs = [(label, t, n) for t in cfg["t_values"] for n in cfg["ns"] for label in variants]
    todo = [j for j in jobs if j not in done]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already in {out}", flush=True)
    for i, (label, t, n) in enumerate(todo, 1):
        loss, params = variants[label]
        task = make_task(TaskSpec(length=t, keys=min(8, t)), cfg["seeds"])
        t0, c0 = time.perf_counter(), time.process_time()
        res = train(
            loss,
            task,
            n_stale=n,
            steps=cfg["steps"],
            lr=cfg["lr"],
            policy=PolicySpec(),
            loss_params=params,
            eval_every=cfg["eval_every"],
            sample_seed=1234,
        )
        alpha = res.metrics.get("vespo_adaptive/alpha_pos")
        alpha_mean = None if alpha is None else round(sum(alpha) / len(alpha), 4)
        row = dict(label=label, loss=loss, params=params, T=t, N=n, alpha_mean=alpha_mean)
        r = append_run(results, out, row, res.final(), (t0, c0))
        print(f"[{i}/{len(todo)}] T={t:<4} N={n:<3} {label:20s} J {ms(r['final'])}  ({r['seconds']:.0f}s)", flush=True)
    return results


def _get(results: dict[str, Any], label: str, t: int, n: int) -> dict[str, Any] | None:
    return next((r for r in results["runs"] if (r["label"], r["T"], r["N"]) == (label, t, n)), None)


def render(results: dict[str, Any]) -> str:
    """The tables of the doc block: final J per variant and N, and the paired difference to default."""
    cfg = results["config"]
    ref = next(iter(VARIANTS))
    cpu = sum(r["cpu_seconds"] for r in results["runs"]) / 60
    lines = [
        f"Generated by `OMP_NUM_THREADS=1 python {COMMAND}` from `benchmarks/results/adaptive_probe.json`: "
        f"{len(results['runs'])} runs, {cpu:.1f} CPU-minutes. {cfg['steps']} optimizer steps of 64 responses, "
        f"lr {cfg['lr']}, tuning seeds {', '.join(map(str, cfg['seeds']))}, fixed lengths; final exact J, "
        f"mean ± std over seeds, and in brackets the paired difference to `{ref}` (mean ± standard error; "
        "bold: beyond two standard errors).",
        "",
    ]
    for t in cfg["t_values"]:
        ns = cfg["ns"]
        lines += [
            f"**T = {t}**",
            "",
            "| variant | " + " | ".join(f"N={n}" for n in ns) + f" | N={max(ns)} / N={min(ns)} |",
        ]
        lines.append("|---" * (len(ns) + 2) + "|")
        for label in VARIANTS:
            cells = []
            for n in ns:
                r, base = _get(results, label, t, n), _get(results, ref, t, n)
                if r is None:
                    cells.append("—")
                    continue
                cell = ms(r["final"])
                if label != ref and base is not None:
                    d, se = paired_difference(r["final"], base["final"])
                    diff = f"{d:+.3f} ± {se:.3f}"
                    cell += f" ({'**' + diff + '**' if abs(d) > 2 * se else diff})"
                cells.append(cell)
            lo, hi = _get(results, label, t, min(ns)), _get(results, label, t, max(ns))
            ratio = "—"
            if lo and hi and sum(lo["final"]) > 0:
                ratio = f"{sum(hi['final']) / sum(lo['final']):.2f}"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
        lines.append("")
    lines.append(f"![probe variants: final J vs N](img/{IMG.name})")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    cfg = results["config"]
    fig, axes = plt.subplots(1, len(cfg["t_values"]), figsize=(5 * len(cfg["t_values"]), 3.8), squeeze=False)
    for ax, t in zip(axes[0], cfg["t_values"]):
        for label in VARIANTS:
            pts = [(n, r["final"]) for n in cfg["ns"] if (r := _get(results, label, t, n))]
            if pts:
                xs = [n for n, _ in pts]
                ys = [sum(f) / len(f) for _, f in pts]
                ax.plot(xs, ys, marker="o", lw=2.2 if label == "default" else 1.2, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("staleness N")
        ax.set_ylabel("final exact J (mean over seeds)")
        ax.set_title(f"T = {t}")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (seconds); writes nothing but --out")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {OUT.relative_to(ROOT)})")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/adaptive.md or the plot")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out or (OUT.with_name("adaptive_probe_quick.json") if args.quick else OUT)
    results = run(config(args.quick), out)
    print(render(results))
    if not args.no_doc and not args.quick:
        print(f"wrote {plot(results, IMG)}")
        replace_generated_block(ADAPTIVE_DOC, COMMAND, render(results))
        print(f"wrote {ADAPTIVE_DOC}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
