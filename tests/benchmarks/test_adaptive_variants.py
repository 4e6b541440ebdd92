"""benchmarks/adaptive_variants.py: the quick run, resume, refusal of another configuration, render."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.adaptive_variants import LOSSES, config, render, run


def test_quick_run_resumes_and_renders(tmp_path: Path):
    out = tmp_path / "variants.json"
    cfg = config(quick=True)
    first = run(cfg, out)
    assert len(first["runs"]) == len(cfg["settings"]) * len(cfg["ns"]) * len(LOSSES)
    assert {r["label"] for r in first["runs"]} == set(LOSSES)
    cut = dict(first, runs=first["runs"][:3])
    out.write_text(json.dumps(cut))
    again = run(cfg, out)
    assert [r["final"] for r in again["runs"]] == [r["final"] for r in first["runs"]]
    text = render(again)
    assert "| sparse reward (2 keys), T=256 | 4 |" in text and "best baseline" in text
    # the first version is a row of its own, not a baseline: the difference is against a baseline
    row = next(line for line in text.splitlines() if line.startswith("| sparse reward"))
    assert row.split("|")[-3].strip() in LOSSES and "remainder" not in row.split("|")[-3]


def test_another_configuration_or_a_bad_file_is_refused(tmp_path: Path):
    out = tmp_path / "variants.json"
    out.write_text(json.dumps({"config": {"steps": 1}, "runs": []}))
    with pytest.raises(SystemExit, match="another configuration"):
        run(config(quick=True), out)
    out.write_text("not json")
    with pytest.raises(SystemExit, match="not a results JSON"):
        run(config(quick=True), out)
    assert out.read_text() == "not json"  # left as it was
