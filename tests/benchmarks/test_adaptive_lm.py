"""benchmarks/adaptive_lm.py: the tier-2 sweep plan (the runs themselves are benchmarks, not CI)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.adaptive_lm import EXTRA, MAIN, plan


def _arg(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_plan_runs_every_loss_at_the_given_seeds_and_n1_at_the_first(tmp_path: Path):
    steps = dict(plan(tmp_path, baselines=True, seeds="0,1,2"))
    assert list(steps) == ["N=64", "N=16", "N=1", "baselines N=64", "baselines N=16"]
    for label, cmd in steps.items():
        assert _arg(cmd, "--out") == [str(tmp_path / "sweep")]  # one directory, one shared warm-up
        assert _arg(cmd, "--seeds") == (["0"] if label == "N=1" else ["0,1,2"])
    losses = {
        loss
        for cmd in steps.values()
        for g in _arg(cmd, "--grid")
        if g.startswith("algorithm.loss=")
        for loss in g.split("=", 1)[1].split(",")
    }
    assert losses == {*MAIN, *EXTRA}
    assert "baselines N=64" not in dict(plan(tmp_path, baselines=False))
