"""A CI-sized sweep: two methods x two staleness values, a few steps each, run as processes."""

from __future__ import annotations

import json

import pytest
from tiny_run import TINY_RUN

from vespo.experiment.sweep import (
    build_cells,
    group_cells,
    parse_grid,
    results_table,
    run_sweep,
    variant_label,
)
from vespo.train.config import ConfigError

TINY = [*TINY_RUN, "run.total_steps=4", "warmup.steps=3", "warmup.batch_size=8"]


def test_grid_parsing_and_cells():
    grid = parse_grid(["algorithm.loss=vespo,grpo", "algorithm.staleness=1,4"])
    assert grid == {"algorithm.loss": ["vespo", "grpo"], "algorithm.staleness": [1, 4]}
    names = [c.name for c in build_cells(grid)]
    assert names == ["vespo_N1", "vespo_N4", "grpo_N1", "grpo_N4"]
    with pytest.raises(ConfigError, match="key=v1,v2"):
        parse_grid(["algorithm.loss"])


def test_grid_values_may_be_mappings_with_commas():
    grid = parse_grid(["algorithm.loss_params={},{length_norm: sqrt},{k_neg: 2, lambda_neg: 3}", "run.seed=0,1"])
    assert grid["algorithm.loss_params"] == [{}, {"length_norm": "sqrt"}, {"k_neg": 2, "lambda_neg": 3}]
    cells = build_cells(grid)
    assert [c.name for c in cells][:3] == [
        "loss_params-default_s0",
        "loss_params-default_s1",
        "loss_params-length_normsqrt_s0",
    ]
    assert cells[4].name == "loss_params-k_neg2-lambda_neg3_s0"
    # the override a cell passes to `vespo train` parses back to the same mapping
    from vespo.train.config import load_config

    assert load_config(None, cells[4].overrides).algorithm.loss_params == {"k_neg": 2, "lambda_neg": 3}
    for bad in ["algorithm.loss_params={a: 1", "algorithm.loss_params=}a{"]:
        with pytest.raises(ConfigError, match="unbalanced"):
            parse_grid([bad])


def test_a_mapping_on_a_section_sets_paired_keys():
    grid = parse_grid(
        ["algorithm.loss=grpo", "algorithm={old_log_prob: sampler},{old_log_prob: recompute, correction: token_tis}"]
    )
    cells = build_cells(grid)
    assert [c.name for c in cells] == [
        "grpo_algorithm-old_log_probsampler",
        "grpo_algorithm-old_log_probrecompute-correctiontoken_tis",
    ]
    assert cells[1].overrides == [
        'algorithm.loss="grpo"',
        'algorithm.old_log_prob="recompute"',
        'algorithm.correction="token_tis"',
    ]
    from vespo.train.config import load_config

    cfg = load_config(None, cells[1].overrides)
    assert (cfg.algorithm.loss, cfg.algorithm.old_log_prob, cfg.algorithm.correction) == (
        "grpo",
        "recompute",
        "token_tis",
    )
    # an invalid pairing is caught by the up-front validation, before any process starts
    bad = parse_grid(["algorithm={old_log_prob: sampler, correction: token_tis}"])
    with pytest.raises(ConfigError, match="old_log_prob=recompute"):
        load_config(None, build_cells(bad)[0].overrides)


def test_grid_edge_cases():
    from vespo.experiment.sweep import split_values

    assert split_values('"a,b",c') == ['"a,b"', "c"]
    with pytest.raises(ConfigError, match="unbalanced quotes"):
        split_values('"a,b')
    # repeated values would share a run directory
    with pytest.raises(ConfigError, match="share the run directory"):
        build_cells(parse_grid(["algorithm.staleness=4,4"]))
    # strings that YAML would read as something else survive the round trip to `vespo train`
    from vespo.train.config import parse_overrides

    cell = build_cells({"task.name": ["on"], "task.reward_fn": ["m:f #x"]})[0]
    parsed = parse_overrides(cell.overrides)["task"]
    assert parsed == {"name": "on", "reward_fn": "m:f #x"}
    # a section known by its alias (`async`) takes a mapping too
    cell = build_cells(parse_grid(["async={sync_every: 2, num_workers: 3}"]))[0]
    assert cell.overrides == ["async.sync_every=2", "async.num_workers=3"]
    # very long names are cut and made unique with a hash
    long = build_cells(
        {"algorithm.loss_params": [{f"k{i}": i for i in range(40)}, {f"k{i}": i + 1 for i in range(40)}]}
    )
    assert all(len(c.name) <= 120 for c in long) and long[0].name != long[1].name


def test_cells_differing_beyond_n_and_seed_are_separate_methods():
    assert variant_label({"algorithm.loss": "grpo", "algorithm.staleness": 4, "run.seed": 1}) == "grpo"
    label = variant_label({"algorithm.loss": "grpo", "algorithm.correction": "token_tis", "run.seed": 0})
    assert label == "grpo correction-token_tis"
    cells = [
        {
            "variant": "grpo",
            "algorithm.staleness": 4,
            "final_accuracy": 0.2,
            "best_accuracy": 0.2,
            "start_accuracy": 0.1,
        },
        {
            "variant": "grpo",
            "algorithm.staleness": 4,
            "final_accuracy": 0.4,
            "best_accuracy": 0.4,
            "start_accuracy": 0.1,
        },
        {
            "variant": label,
            "algorithm.staleness": 4,
            "final_accuracy": 0.9,
            "best_accuracy": 0.9,
            "start_accuracy": 0.1,
        },
    ]
    groups = group_cells({"cells": cells}, "final_accuracy")
    assert groups == {("grpo", 4): [0.2, 0.4], (label, 4): [0.9]}
    table = results_table({"cells": cells})
    assert "| 4 | grpo | 2 | 0.100 | 0.300 ± 0.141 |" in table
    assert f"| 4 | {label} | 1 | 0.100 | 0.900 ± 0.000 |" in table


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
    assert (out / "diagnostics_N1.png").exists() and (out / "diagnostics_N2.png").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["failures"] == []
    # a second call finds every cell done and runs nothing
    again = run_sweep(out=out, grid=grid, overrides=TINY, jobs=2, threads_per_job=1)
    assert [c["name"] for c in again["cells"]] == [c["name"] for c in results["cells"]]
    assert results_table(again) == table
    # --report-only writes the same report and trains nothing, also with a cell removed
    import shutil

    shutil.rmtree(out / "cells" / "grpo_N2")
    partial = run_sweep(out=out, grid=grid, overrides=TINY, report_only=True)
    assert len(partial["cells"]) == 3 and not (out / "cells" / "grpo_N2").exists()
    assert "| 2 | grpo |" not in (out / "results.md").read_text()


def test_unfinished_rows_are_marked():
    cells = [
        {
            "variant": "vespo",
            "algorithm.staleness": 4,
            "final_accuracy": 0.3,
            "best_accuracy": 0.3,
            "start_accuracy": 0.1,
            "done": False,
        }
    ]
    table = results_table({"cells": cells})
    assert "| 4 | vespo* |" in table and "has not finished" in table


def test_sweep_rejects_a_bad_cell_before_running(tmp_path):
    grid = parse_grid(["algorithm.loss=vespo,nope"])
    with pytest.raises(ConfigError, match="unknown policy loss 'nope'"):
        run_sweep(out=tmp_path / "s", grid=grid, overrides=TINY, jobs=1)
    assert not (tmp_path / "s" / "cells").exists()
