"""A CI-sized sweep: two methods x two staleness values, a few steps each, run as processes."""

from __future__ import annotations

import json

import pytest

from vespo.config import ConfigError
from vespo.sweep import build_cells, parse_grid, results_table, run_sweep

from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "run.total_steps=4", "warmup.steps=3", "warmup.batch_size=8"]


def test_grid_parsing_and_cells():
    grid = parse_grid(["algorithm.loss=vespo,grpo", "algorithm.staleness=1,4"])
    assert grid == {"algorithm.loss": ["vespo", "grpo"], "algorithm.staleness": [1, 4]}
    names = [c.name for c in build_cells(grid)]
    assert names == ["vespo_N1", "vespo_N4", "grpo_N1", "grpo_N4"]
    with pytest.raises(ConfigError, match="key=v1,v2"):
        parse_grid(["algorithm.loss"])


def test_smoke_sweep_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "sweep"
    grid = parse_grid(["algorithm.loss=vespo,grpo", "algorithm.staleness=1,2"])
    results = run_sweep(out=out, grid=grid, overrides=TINY, jobs=2, threads_per_job=1)
    assert len(results["cells"]) == 4
    assert (out / "warmup" / "warmup" / "model.safetensors").exists()  # one shared warm-up
    for cell in results["cells"]:
        assert cell["final_step"] == 4
        assert 0.0 <= cell["final_accuracy"] <= 1.0
        # every cell started from the same warmed-up weights: same step-0 accuracy
        assert cell["start_accuracy"] == results["cells"][0]["start_accuracy"]
    table = (out / "results.md").read_text()
    assert "| 2 | vespo |" in table and "| 1 | grpo |" in table
    assert (out / "reward_curves.png").exists() and (out / "accuracy_vs_n.png").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["failures"] == []
    # a second call finds every cell done and runs nothing
    again = run_sweep(out=out, grid=grid, overrides=TINY, jobs=2, threads_per_job=1)
    assert [c["name"] for c in again["cells"]] == [c["name"] for c in results["cells"]]
    assert results_table(again) == table


def test_sweep_rejects_a_bad_cell_before_running(tmp_path):
    grid = parse_grid(["algorithm.loss=vespo,nope"])
    with pytest.raises(ConfigError, match="unknown policy loss 'nope'"):
        run_sweep(out=tmp_path / "s", grid=grid, overrides=TINY, jobs=1)
    assert not (tmp_path / "s" / "cells").exists()
