"""benchmarks/smollm2_offpolicy.py: every planned cell is a valid config, and the report reads runs."""

from __future__ import annotations

import json

import yaml

from benchmarks import smollm2_offpolicy as study
from vespo.experiment.sweep import build_cells, parse_grid
from vespo.train.config import load_config


def test_every_cell_of_the_plan_is_a_valid_config():
    seen = set()
    for _, grid in study.PLAN:
        for cell in build_cells(parse_grid(grid)):
            cfg = load_config(
                str(study.REPO / "configs" / "smollm2.yaml"), [*study.COMMON, *study.PINS, *cell.overrides]
            )
            assert cfg.sampling.engine == "vllm" and cfg.model.autocast == "none"
            # the grid's settings, whatever configs/smollm2.yaml says today
            assert cfg.sampling.group_size == 8 and not cfg.algorithm.packing and cfg.run.time_limit_minutes is None
            alg = cfg.algorithm
            key = (alg.loss, alg.staleness, alg.correction)
            assert key not in seen  # no cell is run twice
            seen.add(key)
            if alg.correction == "token_tis":
                assert alg.old_log_prob == "recompute"
            else:
                assert alg.old_log_prob == "sampler" and alg.measure_mismatch
    assert ("vespo_adaptive", 1, "none") in seen and ("vespo_adaptive", 16, "none") in seen


def test_report_averages_the_training_rows_of_each_cell(tmp_path):
    run = tmp_path / "mismatch" / "cells" / "vespo_N1_s0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": {"loss": "vespo", "staleness": 1}}))
    rows = [
        {"step": 1, "reward/mean": 0.0, "is/log_w_pi_mu_abs_mean": 0.4, "phi/mean": 0.9, "perf/elapsed_s": 30.0},
        {"step": 2, "reward/mean": 0.5, "is/log_w_pi_mu_abs_mean": 0.6, "phi/mean": 0.7, "perf/elapsed_s": 60.0},
        {"step": 2, "eval/accuracy": 0.25, "perf/elapsed_s": 90.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (cell,) = study.collect(tmp_path)
    assert cell["loss"] == "vespo" and cell["n"] == 1 and cell["steps"] == 2 and not cell["tis"] and not cell["done"]
    assert cell["reward"] == 0.25 and abs(cell["abs_log_w"] - 0.5) < 1e-12 and abs(cell["phi_mass"] - 0.8) < 1e-12
    assert cell["final_accuracy"] == 0.25 and cell["wall_s"] == 90.0
    line = study.table([cell]).splitlines()[-1]
    assert line.startswith("| 1 | vespo | 2 | 0.250 | 0.250 | 0.50 |")


def test_report_keeps_finished_cells_of_the_results_file_that_the_root_lacks(tmp_path):
    run = tmp_path / "runs" / "stale16" / "cells" / "grpo_N16_s0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": {"loss": "grpo", "staleness": 16}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    (run / "summary.json").write_text("{}")
    results = tmp_path / "results.json"
    blank = {**dict.fromkeys(study.KEYS), "steps": 16, "final_accuracy": 0.0, "wall_s": 60.0, "tis": False}
    earlier = {**blank, "sweep": "mismatch", "name": "vespo_N1_s0", "done": True, "loss": "vespo", "n": 1}
    stopped = {**blank, "sweep": "stale16", "name": "vespo_N16_s0", "done": False, "loss": "vespo", "n": 16}
    replaced = {**blank, "sweep": "stale16", "name": "grpo_N16_s0", "done": True, "loss": "grpo", "n": 16}
    results.write_text(json.dumps({"common": study.COMMON, "cells": [earlier, stopped, replaced]}))
    argv = ["report", "--root", str(tmp_path / "runs"), "--results", str(results)]
    assert study.main(argv) == 0
    cells = {c["name"]: c for c in json.loads(results.read_text())["cells"]}
    assert set(cells) == {"vespo_N1_s0", "grpo_N16_s0"}  # the stopped cell is not reported
    assert cells["grpo_N16_s0"]["reward"] == 0.5  # the fresh measurement wins
    assert study.main([*argv, "--replace"]) == 0
    assert [c["name"] for c in json.loads(results.read_text())["cells"]] == ["grpo_N16_s0"]


def test_report_refuses_a_damaged_results_file_in_one_line(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text('{"common": [')  # cut off mid-write
    assert study.main(["report", "--root", str(tmp_path), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "is not a results file" in err and "--replace" in err and len(err.strip().splitlines()) == 1
    assert results.read_text() == '{"common": ['  # left as it was
