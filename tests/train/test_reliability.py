"""Reliability (issue 12): every bad input is one line + exit 2 with nothing written, every expected
OS error is one line, a rejected resume leaves the run intact, damaged checkpoints fall back, a
kill in the warm-up resumes, over-long prompts are refused or skipped, hostile reward functions
do not stop the run. The slow kill/resume cases are in benchmarks/reliability.py.
"""

from __future__ import annotations

import errno
import json
import os
import textwrap
import warnings
from pathlib import Path

import pytest
from tiny_run import TINY_RUN

from vespo import cli
from vespo.tasks.base import in_eval_partition, prompt_key

TINY = [*TINY_RUN, "logging.progress=false", "warmup.steps=0", "run.threads=1"]


@pytest.fixture(autouse=True)
def _keep_warning_format(monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # cli.main sets its own


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    code = cli.main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def _row(question: str, answer: str = "2") -> dict:
    return {
        "data_source": "t",
        "prompt": [{"role": "user", "content": question}],
        "reward_model": {"ground_truth": answer},
    }


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows_without_eval(n: int, fraction: float) -> list[dict]:
    rows, i = [], 0
    while len(rows) < n:
        row = _row(f"{i}+1=?")
        if not in_eval_partition(prompt_key(row["prompt"]), fraction):
            rows.append(row)
        i += 1
    return rows


def _fake_run(run: Path) -> Path:
    ckpt = run / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": 1}')
    return run


# ----------------------------------------------------------------------- the bad-input battery
# Each case: (name, argv builder(tmp) -> list, expected text). Every one must give exit 2, one
# "vespo: error:" line naming the problem, no traceback, and leave tmp/run unwritten.
def _verl(tmp, rows=None, name="data.jsonl", raw: bytes | None = None):
    path = tmp / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        _write_jsonl(path, rows if rows is not None else [_row(f"{i}+1=?") for i in range(20)])
    return ["task.kind=verl_file", f"task.train_path={path}"]


def _cfg_file(tmp, text: str | bytes, name="c.yaml"):
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


BAD_INPUTS = [
    # configuration values
    ("unknown key", lambda t: ["algorithm.lossx=1"], "unknown config key 'algorithm.lossx'"),
    ("unknown section", lambda t: ["nosection.key=1"], "unknown config key 'nosection'"),
    ("wrong type", lambda t: ["algorithm.staleness=zero"], "algorithm.staleness"),
    ("unknown loss", lambda t: ["algorithm.loss=nope"], "unknown policy loss 'nope'"),
    ("loss parameter out of range", lambda t: ["algorithm.loss_params={k_pos: 0.5}"], "variance bound"),
    (
        "parameter of another loss",
        lambda t: ["algorithm.loss=grpo", "algorithm.loss_params={k_pos: 2}"],
        "has no parameter 'k_pos'",
    ),
    ("negative lr", lambda t: ["optim.lr=-1"], "optim.lr"),
    ("top_p above 1", lambda t: ["sampling.top_p=1.5"], "sampling.top_p"),
    ("zero temperature", lambda t: ["sampling.temperature=0"], "sampling.temperature"),
    ("group of one", lambda t: ["sampling.group_size=1"], "sampling.group_size"),
    ("pretrained without a name", lambda t: ["model.kind=pretrained"], "needs model.name_or_path"),
    ("heads do not divide", lambda t: ["model.hidden_size=30", "model.num_heads=4"], "not divisible"),
    (
        "correction with sampler mu",
        lambda t: ["algorithm.correction=token_tis", "algorithm.old_log_prob=sampler"],
        "old_log_prob=recompute",
    ),
    ("bad aggregation", lambda t: ["algorithm.loss_agg_mode=mean"], "loss_agg_mode"),
    ("eval every 0", lambda t: ["eval.every=0"], "eval.every"),
    ("unknown mode", lambda t: ["run.mode=bogus"], "run.mode"),
    ("unsupported dtype", lambda t: ["model.dtype=float16"], "model.dtype"),
    ("bad overlong choice", lambda t: ["task.overlong=truncate"], "task.overlong"),
    ("negative worker resource", lambda t: ["async.worker_resources={node_b: -1}"], "async.worker_resources"),
    ("no cuda", lambda t: ["run.device=cuda:3"], "run.device"),
    ("not a device", lambda t: ["run.device=tpu9"], "run.device"),
    # overrides
    ("override without =", lambda t: ["justakey"], "key=value"),
    ("override with an empty key", lambda t: [".x=1"], "empty key"),
    ("dotted key into a scalar", lambda t: ["algorithm.loss=vespo", "algorithm.loss.k=1"], "conflicts"),
    (
        "mapping erases an earlier override",
        lambda t: ["algorithm.loss_params.k_pos=3", "algorithm.loss_params={k_neg: 2}"],
        "would erase",
    ),
    # config files
    ("missing config file", lambda t: [t / "missing.yaml"], "does not exist"),
    ("config file is a directory", lambda t: [t], "is a directory"),
    ("binary config file", lambda t: [_cfg_file(t, b"\x00\xff\xfe binary", "c.bin")], "not UTF-8"),
    ("invalid YAML", lambda t: [_cfg_file(t, "run: [1, 2\n")], "not valid YAML"),
    ("YAML scalar", lambda t: [_cfg_file(t, "3\n")], "mapping"),
    ("YAML with a tab", lambda t: [_cfg_file(t, "run:\n\tseed: 1\n")], "not valid YAML"),
    # the output directory
    ("out_dir is a file", lambda t: [f"run.out_dir={_cfg_file(t, 'x', 'afile')}"], "is an existing file"),
    ("out_dir under a file", lambda t: [f"run.out_dir={_cfg_file(t, 'x', 'afile')}/sub/run"], "which is a file"),
    ("out_dir not writable", lambda t: ["run.out_dir=/sys/vespo-reliability-run"], "cannot write"),
    (
        "out_dir broken symlink",
        lambda t: [f"run.out_dir={(os.symlink(t / 'nowhere', t / 'link'), t / 'link')[1]}"],
        "broken symbolic link",
    ),
    ("out_dir holds a run", lambda t: [f"run.out_dir={_fake_run(t / 'other')}"], "already holds a run"),
    # data files
    ("missing data file", lambda t: ["task.kind=verl_file", f"task.train_path={t / 'none.jsonl'}"], "none.jsonl"),
    ("data path is a directory", lambda t: ["task.kind=verl_file", f"task.train_path={t}"], "is a directory"),
    (
        "non-UTF-8 data file",
        lambda t: _verl(t, raw=json.dumps(_row("1+1?")).encode() + b"\n\xff\xfe\n"),
        "data.jsonl is not UTF-8 text",
    ),
    (
        "Latin-1 data file",
        lambda t: _verl(t, raw=json.dumps(_row("é")).encode("ascii").replace(b"\\u00e9", b"\xe9") + b"\n"),
        "line 1",
    ),
    ("invalid JSON row", lambda t: _verl(t, raw=b'{"prompt": \n'), "invalid JSON"),
    ("missing column", lambda t: _verl(t, rows=[{"prompt": "1+1?", "data_source": "x"}]), "reward_model"),
    ("empty data file", lambda t: _verl(t, raw=b""), "no rows"),
    ("unknown extension", lambda t: _verl(t, name="data.csv"), "unknown extension"),
    (
        "empty eval split",
        lambda t: [*_verl(t, rows=_rows_without_eval(6, 0.05)), "task.eval_fraction=0.05"],
        "evaluation split is empty",
    ),
    (
        "10 MB prompt",
        lambda t: _verl(t, rows=[_row("1+" * 5_000_000 + "1=?")] + [_row(f"{i}+1=?") for i in range(30)]),
        "too long",
    ),
    ("max_new_tokens beyond the context", lambda t: ["sampling.max_new_tokens=5000"], "leaves no room"),
    # weights and reward functions named by the config
    ("init_from missing", lambda t: [f"model.init_from={t / 'nothing.safetensors'}"], "model.init_from"),
    ("reward module missing", lambda t: ["task.reward_fn=no_such_module_xyz:score"], "no_such_module_xyz"),
    ("reward not callable", lambda t: ["task.reward_fn=tiny_run:TINY_RUN"], "TINY_RUN"),
]


@pytest.mark.parametrize(("name", "build", "expected"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, name, build, expected):
    run = tmp_path / "run"
    args = build(tmp_path)
    first = [a for a in args if isinstance(a, Path)]  # a config file goes first
    rest = [a for a in args if not isinstance(a, Path)]
    code, err = run_cli(capsys, "train", *first, *TINY, f"run.out_dir={run}", *rest)
    errors = [line for line in err if line.startswith("vespo: error:")]
    assert code == 2, err
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    assert all(line.startswith(("vespo: error:", "vespo: warning:")) for line in err), err
    assert expected in errors[0], errors[0]
    assert not run.exists(), f"{name}: wrote {sorted(p.name for p in run.iterdir())}"


def test_battery_has_at_least_40_cases():
    assert len(BAD_INPUTS) >= 40


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--resume", "{t}/nothing"], "no config.yaml"),
        (["--resume", "{t}/afile"], "no config.yaml"),
        (["{t}/c.yaml", "--resume", "{t}/nothing"], "not both"),
    ],
)
def test_bad_resume_arguments(tmp_path, capsys, argv, expected):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "c.yaml").write_text("run: {seed: 1}\n")
    code, err = run_cli(capsys, "train", *[a.format(t=tmp_path) for a in argv])
    assert code == 2 and len(err) == 1 and expected in err[0], err


# ------------------------------------------------------------------ expected OS errors: one line
def _raiser(make):
    def command(args):
        make()
        return 0

    return command


def _read_under_a_file(tmp: Path):
    (tmp / "f").write_text("x")
    open(tmp / "f" / "g")


def _read_latin1(tmp: Path):
    path = tmp / "latin1.txt"
    path.write_bytes(b"caf\xe9\n")
    with open(path, encoding="utf-8") as fh:
        fh.read()


OS_ERRORS = [
    ("FileExistsError", lambda t: os.mkdir(t), "exists already"),
    ("NotADirectoryError", _read_under_a_file, "not a directory"),
    ("IsADirectoryError", lambda t: open(t), "is a directory"),
    ("PermissionError", lambda t: os.mkdir("/sys/vespo-x"), "not permitted"),
    ("FileNotFoundError", lambda t: open(t / "nope"), "no such file"),
    (
        "ENOSPC",
        lambda t: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", str(t / "ck"))),
        "disk is full",
    ),
    ("UnicodeDecodeError", _read_latin1, "latin1.txt is not UTF-8 text"),
]


@pytest.mark.parametrize(("name", "make", "expected"), OS_ERRORS, ids=[c[0] for c in OS_ERRORS])
def test_expected_os_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, name, make, expected):
    """Defect 4: only ValueError was turned into one line; OSErrors were tracebacks with exit 1."""
    monkeypatch.setattr(cli, "cmd_plot", _raiser(lambda: make(tmp_path)))
    code, err = run_cli(capsys, "plot", tmp_path)
    assert code == 2 and len(err) == 1, err
    assert expected in err[0] and err[0].startswith("vespo: error:"), err


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_run(tmp_path, capsys, monkeypatch):
    """A full disk at a checkpoint (safetensors loses the write silently): one line, exit 2."""
    import shutil
    import types

    import vespo.train.checkpoint as ck

    real = ck.save_file
    monkeypatch.setattr(ck, "save_file", lambda t, p, *a, **k: real(t, "/dev/full", *a, **k))
    # the disk fills up after the pre-flight: only the checkpoint writer sees 0 bytes free
    monkeypatch.setattr(
        ck, "shutil", types.SimpleNamespace(rmtree=shutil.rmtree, disk_usage=lambda p: types.SimpleNamespace(free=0))
    )
    run = tmp_path / "run"
    code, err = run_cli(
        capsys,
        "train",
        *TINY,
        f"run.out_dir={run}",
        "run.total_steps=1",
        "algorithm.staleness=1",
        "eval.at_start=false",
    )
    assert code == 2 and len(err) == 1 and "disk is full" in err[0], err
    assert (run / "config.yaml").exists()  # the run is valid: it can be resumed once there is space


def test_too_little_disk_space_is_found_before_the_run_starts(tmp_path, capsys, monkeypatch):
    import shutil
    import types

    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=2**20))
    run = tmp_path / "run"
    code, err = run_cli(capsys, "train", *TINY, f"run.out_dir={run}")
    assert code == 2 and len(err) == 1 and "1 MiB free" in err[0] and not run.exists(), err


# --------------------------------------------------------------------- defect 1: rejected resume
def test_a_rejected_resume_leaves_the_run_intact(tmp_path, capsys):
    """Defect 1: the refused override was written into config.yaml first, so the run was stuck."""
    run = tmp_path / "run"
    code, err = run_cli(
        capsys,
        "train",
        *TINY,
        f"run.out_dir={run}",
        "run.total_steps=1",
        "algorithm.staleness=1",
        "eval.at_start=false",
    )
    assert code == 0, err
    before = (run / "config.yaml").read_bytes()
    code, err = run_cli(capsys, "train", "--resume", run, "model.num_layers=1")
    assert code == 2 and len(err) == 1 and "does not fit this model" in err[0], err
    # defect 8: a changed hidden size is one summarised line, not one line per tensor
    code, err = run_cli(capsys, "train", "--resume", run, "model.hidden_size=64")
    assert code == 2 and len(err) == 1 and "tensors differ in shape" in err[0] and len(err[0]) < 600, err
    assert (run / "config.yaml").read_bytes() == before
    code, err = run_cli(capsys, "train", "--resume", run, "run.total_steps=2")
    assert code == 0, err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "stale/index" in r] == [1, 2]
    assert "total_steps: 2" in (run / "config.yaml").read_text()  # an accepted override is saved


# ------------------------------------------------------------------- defect 2: damaged checkpoint
def test_resume_from_a_damaged_latest_checkpoint_falls_back(tmp_path, capsys):
    run = tmp_path / "run"
    code, _ = run_cli(
        capsys,
        "train",
        *TINY,
        f"run.out_dir={run}",
        "run.total_steps=2",
        "algorithm.staleness=1",
        "checkpoint.every=1",
        "eval.at_start=false",
    )
    assert code == 0
    latest = run / "checkpoints" / "step_000002" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:1000])
    code, err = run_cli(capsys, "train", "--resume", run, "run.total_steps=3")
    assert code == 0, err
    warn = [line for line in err if "warning" in line]
    assert len(warn) == 1 and "step_000002" in warn[0] and "resuming from step_000001" in warn[0]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "stale/index" in r] == [1, 2, 3]


# -------------------------------------------------------------- defect 5: over-long prompts, skip
def test_overlong_prompts_are_skipped_and_counted_by_choice(tmp_path, capsys):
    from vespo.train.config import load_config
    from vespo.train.trainer import Trainer

    rows = [_row("1+" * 800 + "1=?"), _row("2+" * 900 + "2=?")] + [_row(f"{i}+1=?") for i in range(40)]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = load_config(
        None,
        [
            *TINY,
            f"run.out_dir={tmp_path / 'run'}",
            "task.kind=verl_file",
            f"task.train_path={data}",
            "task.overlong=skip",
            "task.train_size=50",
        ],
    )
    trainer = Trainer(cfg)
    err = capsys.readouterr().err
    assert "skipped" in err and "task.overlong=skip" in err
    longest = max(len(ex.prompt_text()) for ex in trainer.train_examples + trainer.eval_examples)
    assert longest < 100
    trainer.source.close()


# ------------------------------------------------------------------ defect 6: kill in the warm-up
def _warm_cfg(run: Path, *extra: str):
    from vespo.train.config import load_config

    return load_config(
        None,
        [
            *TINY,
            f"run.out_dir={run}",
            "warmup.steps=10",
            "warmup.batch_size=4",
            "warmup.checkpoint_every=3",
            "run.total_steps=1",
            "algorithm.staleness=1",
            "eval.at_start=false",
            *extra,
        ],
    )


def test_resume_after_a_kill_in_the_warm_up_continues_it(tmp_path, capsys, monkeypatch):
    """Defect 6: '--resume' after a kill in the warm-up said only 'has no checkpoint to resume from'."""
    from vespo.train.trainer import Trainer, resume_config, train

    full = train(_warm_cfg(tmp_path / "full"))
    assert full.steps == 1
    calls = {"n": 0}
    real = Trainer._sft_loss

    def dies_at_step_8(self, batch, pad):
        calls["n"] += 1
        if calls["n"] == 8:
            raise SystemExit(137)  # as good as a kill: nothing after this line runs
        return real(self, batch, pad)

    monkeypatch.setattr(Trainer, "_sft_loss", dies_at_step_8)
    with pytest.raises(SystemExit):
        train(_warm_cfg(tmp_path / "part"))
    monkeypatch.setattr(Trainer, "_sft_loss", real)
    part = tmp_path / "part"
    assert (part / "warmup" / "checkpoints" / "step_000006").is_dir()
    capsys.readouterr()
    train(resume_config(part), resume=True)
    assert "continuing the warm-up from step 6" in capsys.readouterr().err
    losses = lambda run: [json.loads(x)["warmup/loss"] for x in (run / "warmup.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(part) == losses(tmp_path / "full")  # the same ten steps, none twice
    assert (part / "warmup" / "model.safetensors").read_bytes() == (
        tmp_path / "full" / "warmup" / "model.safetensors"
    ).read_bytes()
    assert not (part / "warmup" / "checkpoints").exists()


def test_resume_before_any_checkpoint_restarts_from_the_saved_config(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {total_steps: 1}\n")
    code, err = run_cli(capsys, "train", "--resume", run, *TINY, "algorithm.staleness=1", "eval.at_start=false")
    assert code == 0, err
    assert any("starting it again from its saved config" in line for line in err)
    assert (run / "checkpoints").is_dir()


# ------------------------------------------------------------------------ hostile reward functions
HOSTILE = textwrap.dedent("""
    import math, time
    calls = 0
    def reward(response, example):
        global calls
        calls += 1
        kind = calls % 7
        if kind == 0:
            raise RuntimeError("verifier crashed")
        if kind == 1:
            return float("nan")
        if kind == 2:
            return "not a number"
        if kind == 3:
            return float("inf")
        if kind == 4:
            return None
        if kind == 5 and calls < 10:
            time.sleep(3)  # beyond task.reward_timeout_s
        return 1.0 if len(response) % 2 else 0.0
""")


def test_hostile_reward_function_does_not_stop_the_run(tmp_path, monkeypatch):
    from vespo.train.config import load_config
    from vespo.train.trainer import train

    (tmp_path / "hostile_reward.py").write_text(HOSTILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(
        None,
        [
            *TINY,
            f"run.out_dir={tmp_path / 'run'}",
            "task.reward_fn=hostile_reward:reward",
            "task.reward_timeout_s=0.5",
            "run.total_steps=2",
            "algorithm.staleness=1",
            "eval.at_start=false",
        ],
    )
    result = train(cfg)
    assert result.steps == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "stale/index" in r]
    assert len(steps) == 2
    for row in steps:
        assert row["reward/mean"] is not None and 0.0 <= row["reward/mean"] <= 1.0
        assert row["loss/value"] is not None if "loss/value" in row else True
    assert sum(r.get("reward/errors", 0) for r in steps) > 0
