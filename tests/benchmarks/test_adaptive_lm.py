"""benchmarks/adaptive_lm.py: the tier-2 sweep plan (the runs themselves are benchmarks, not CI)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.adaptive_lm import EXTRA, MAIN, STUDIES, plan, warm_up_commands


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


def _flag(cmd: list[str], prefix: str) -> list[str]:
    return [a.split("=", 1)[1] for a in cmd if a.startswith(prefix)]


def test_strong_study_warms_up_in_three_chained_stages_and_skips_finished_ones(tmp_path: Path):
    study = STUDIES["strong"]
    cmds = warm_up_commands(tmp_path, study)
    outs = [Path(_flag(c, "run.out_dir=")[0]) for c in cmds]
    assert outs == [tmp_path / "stage1", tmp_path / "stage2", tmp_path / "sweep" / "warmup"]
    assert [_flag(c, "warmup.steps=") for c in cmds] == [["300"], ["300"], ["600"]]
    assert _flag(cmds[0], "model.init_from=") == []  # stage 1 starts from scratch, each later one from the last
    for prev, cmd in zip(outs, cmds[1:]):
        assert _flag(cmd, "model.init_from=") == [str(prev / "warmup" / "model.safetensors")]
    (tmp_path / "stage1" / "warmup").mkdir(parents=True)
    (tmp_path / "stage1" / "warmup" / "model.safetensors").write_bytes(b"")
    assert [Path(_flag(c, "run.out_dir=")[0]).name for c in warm_up_commands(tmp_path, study)] == ["stage2", "warmup"]
    (tmp_path / "sweep" / "warmup" / "warmup").mkdir(parents=True)
    (tmp_path / "sweep" / "warmup" / "warmup" / "model.safetensors").write_bytes(b"")
    assert warm_up_commands(tmp_path, study) == []  # the sweep's warm-up exists: nothing to redo


def test_studies_differ_in_the_batch_and_lr_not_the_task(tmp_path: Path):
    mixed, strong = STUDIES["mixed"].common(), STUDIES["strong"].common()
    assert "algorithm.mini_batch_prompts=1" in mixed and "algorithm.mini_batch_prompts=4" in strong
    assert [a for a in strong if "mini_batch" not in a] == [
        *(a for a in mixed if "mini_batch" not in a),
        "optim.lr=1e-4",
    ]
    cmd = dict(plan(tmp_path, baselines=False, study=STUDIES["strong"], jobs=2))["N=64"]
    assert _arg(cmd, "--jobs") == ["2"] and "algorithm.mini_batch_prompts=4" in cmd
