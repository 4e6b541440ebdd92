"""PNG figures: the kernel curves (paper Fig. 2) and training curves of one or more runs.

matplotlib is imported lazily with the non-interactive Agg backend, so importing this module is
cheap and works on machines without a display.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vespo.experiment.kernel_curves import effective_weights
from vespo.losses import list_losses


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kernels(path: str | Path, losses: Sequence[str] | None = None, w_max: float = 3.0) -> Path:
    """Draw phi(W) for A > 0 and A < 0, one panel per loss, into ``path`` (PNG).

    VESPO's curves are repeated faintly in every panel as the reference.
    """
    plt = _pyplot()
    names = list(losses) if losses else list(list_losses())
    if "vespo" in names:
        names = ["vespo"] + [n for n in names if n != "vespo"]
    grid = torch.linspace(0.01, w_max, 600, dtype=torch.float64)
    x = grid.numpy()
    reference = {adv: effective_weights("vespo", grid, adv).numpy() for adv in (1.0, -1.0)}
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), sharex=True, sharey=True, squeeze=False)
    colors = {1.0: "tab:blue", -1.0: "tab:red"}
    for ax, name in zip(axes.flat, names):
        for adv, label in ((1.0, "A > 0"), (-1.0, "A < 0")):
            if name != "vespo":
                ax.plot(x, reference[adv], color=colors[adv], alpha=0.25, linewidth=1, linestyle="--")
            ax.plot(x, effective_weights(name, grid, adv).numpy(), color=colors[adv], linewidth=2, label=label)
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(name, fontweight="bold" if name == "vespo" else None)
        ax.set_xlim(0, w_max)
        ax.set_ylim(-0.05, 2.2)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("ratio W = pi_theta / mu")
    for ax in axes[:, 0]:
        ax.set_ylabel("phi(W)")
    axes.flat[0].legend(loc="upper right", fontsize=8)
    fig.suptitle(
        "Effective weight phi(W) on A * grad log pi of each loss (one-token sequence, via autograd); dashed: VESPO",
        fontsize=10,
    )
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG, parent folders made) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``run_dir/metrics.jsonl``; a truncated last line (crash mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{run_dir} has no metrics.jsonl (is it a vespo run directory?)")
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


#: (metric key, panel title) drawn by :func:`plot_runs`, in order.
RUN_PANELS: tuple[tuple[str, str], ...] = (
    ("reward/mean", "training reward"),
    ("eval/accuracy", "eval accuracy (greedy)"),
    ("is/abs_log_w_mean", "|log W| (mean over sequences)"),
    ("phi/mean", "phi mass (mean weight)"),
    ("phi/frac_below_0.01", "share of sequences with phi < 0.01"),
    ("is/ess", "normalised ESS of W"),
    ("policy/entropy", "token entropy"),
    ("response/length_mean", "response length (tokens)"),
    ("loss/clip_frac", "clip fraction"),
    # vespo_adaptive only (a panel is drawn when some run logged its key)
    ("vespo_adaptive/alpha_pos", "vespo_adaptive: tempering alpha, A > 0"),
    ("vespo_adaptive/alpha_neg", "vespo_adaptive: tempering alpha, A < 0"),
    ("phi/frac_below_0.01_before", "share with phi < 0.01 before adapting (paper kernel)"),
)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(row.get("step", len(xs)))
            ys.append(float(value))
    return xs, ys


def _smooth(ys: list[float], window: int) -> list[float]:
    if window <= 1 or len(ys) < window:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def run_panels(runs: Sequence[list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """The panels of :data:`RUN_PANELS` that at least one run (its metric rows) has data for."""
    return [(k, t) for k, t in RUN_PANELS if any(_series(rows, k)[0] for rows in runs)]


def plot_runs(
    run_dirs: Sequence[str | Path],
    path: str | Path,
    labels: Sequence[str] | None = None,
    smooth: int = 5,
) -> Path:
    """Overlay the training curves of ``run_dirs`` (one panel per metric) into ``path`` (PNG)."""
    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    names = list(labels) if labels else [d.name for d, _ in runs]
    return save_figure(runs_figure([rows for _, rows in runs], names, smooth), path)


def runs_figure(runs: Sequence[list[dict[str, Any]]], names: Sequence[str], smooth: int = 5) -> Any:
    """The figure of :func:`plot_runs`; each run keeps one colour in every panel, even where it has no data."""
    plt = _pyplot()
    panels = run_panels(runs)
    if not panels:
        raise ValueError("none of the runs has any metric to plot yet")
    cols = 2 if len(panels) > 1 else 1
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for i, (name, rows) in enumerate(zip(names, runs)):
            xs, ys = _series(rows, key)
            if not xs:
                continue
            marker = "o" if key.startswith("eval/") else None
            ys = ys if key.startswith("eval/") else _smooth(ys, smooth)
            ax.plot(xs, ys, label=name, color=f"C{i % 10}", marker=marker, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return fig
