"""`vespo plot`: which panels a set of runs gets, and the PNG it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vespo.experiment.plots import plot_runs, run_panels, runs_figure


def _run(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_vespo_adaptive_runs_get_their_alpha_panels(tmp_path):
    plain = [{"step": s, "reward/mean": 0.1 * s, "phi/mean": 0.5} for s in range(1, 4)]
    adaptive = [
        {**r, "vespo_adaptive/alpha_pos": 0.5, "vespo_adaptive/alpha_neg": 1.0, "phi/frac_below_0.01_before": 0.7}
        for r in plain
    ]
    keys = [k for k, _ in run_panels([plain])]
    assert "reward/mean" in keys and not any(k.startswith("vespo_adaptive/") for k in keys)
    keys = [k for k, _ in run_panels([plain, adaptive])]
    assert {"vespo_adaptive/alpha_pos", "vespo_adaptive/alpha_neg", "phi/frac_below_0.01_before"} <= set(keys)
    png = plot_runs([_run(tmp_path, "vespo", plain), _run(tmp_path, "adaptive", adaptive)], tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_without_metrics_are_refused(tmp_path):
    with pytest.raises(ValueError, match="none of the runs has any metric"):
        plot_runs([_run(tmp_path, "empty", [{"step": 1}])], tmp_path / "c.png")


def test_a_run_keeps_its_colour_in_panels_where_the_first_run_has_no_data():
    vespo = [{"step": s, "reward/mean": 0.1, "phi/mean": 0.5} for s in range(1, 4)]
    grpo = [{"step": s, "reward/mean": 0.2, "loss/clip_frac": 0.01} for s in range(1, 4)]
    fig = runs_figure([vespo, grpo], ["vespo", "grpo"])
    colours = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert colours == {"vespo": {"C0"}, "grpo": {"C1"}}  # clip_frac (grpo only) is not drawn in vespo's colour
    clip = next(ax for ax in fig.axes if ax.get_title() == "clip fraction")
    assert [line.get_label() for line in clip.get_lines()] == ["grpo"]
