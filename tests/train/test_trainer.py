"""End-to-end tests of the trainer on a very small model (seconds each)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_run import TINY_RUN

from vespo.losses import list_losses
from vespo.rollout.advantages import group_advantages
from vespo.train.config import ConfigError, load_config
from vespo.train.trainer import Trainer, train

TINY = [*TINY_RUN, "logging.progress=false", "warmup.steps=0", "run.threads=1"]


def tiny_config(tmp_path: Path, *extra: str):
    return load_config(None, [*TINY, f"run.out_dir={tmp_path / 'run'}", *extra])


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std()
    expected_first = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-6)
    assert torch.allclose(adv[:4], expected_first, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # a group with equal rewards has no signal
    centred = group_advantages(rewards, 4, normalize_std=False)
    assert torch.allclose(centred[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_staleness_bookkeeping(tmp_path):
    """Mini-batch k of a rollout batch is trained k optimizer steps after it was sampled."""
    cfg = tiny_config(tmp_path, "algorithm.staleness=3", "run.total_steps=6")
    train(cfg)
    rows = [r for r in read_rows(tmp_path / "run") if "stale/index" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["stale/index"] for r in rows] == [0, 1, 2, 0, 1, 2]
    assert [r["stale/versions_behind_mean"] for r in rows] == [0, 1, 2, 0, 1, 2]
    assert [r["rollout/index"] for r in rows] == [0, 0, 0, 1, 1, 1]
    # the first mini-batch is on-policy: pi_old was recomputed with the same weights
    assert rows[0]["is/log_w_max"] == 0.0 and rows[0]["is/log_w_min"] == 0.0
    assert rows[2]["is/abs_log_w_mean"] > 0.0


def test_on_policy_weight_is_exactly_one(tmp_path):
    cfg = tiny_config(tmp_path, "algorithm.staleness=1", "run.total_steps=3")
    train(cfg)
    rows = [r for r in read_rows(tmp_path / "run") if "stale/index" in r]
    for row in rows:
        assert row["is/log_w_max"] == 0.0 and row["is/log_w_min"] == 0.0
        assert row["phi/mean"] == 1.0
    assert rows[-1]["step"] == 3


@pytest.mark.parametrize("measure", [True, False])
def test_measure_mismatch_splits_log_w_when_pi_old_is_mu(tmp_path, measure):
    """old_log_prob=sampler with a bf16 sampler: algorithm.measure_mismatch adds the trainer-precision
    reference (metrics only), so log W splits into staleness + engine mismatch; the loss still uses mu."""
    cfg = tiny_config(
        tmp_path,
        "algorithm.staleness=2",
        "run.total_steps=4",
        "algorithm.old_log_prob=sampler",
        "sampling.sampler_dtype=bfloat16",
        f"algorithm.measure_mismatch={str(measure).lower()}",
    )
    train(cfg)
    rows = [r for r in read_rows(tmp_path / "run") if "stale/index" in r]
    assert len(rows) == 4
    if not measure:
        assert not any("stale/log_w_mean" in r or "mismatch/engine_k3_kl" in r for r in rows)
        return
    for r in rows:
        assert r["mismatch/engine_log_prob_diff_abs_mean"] > 0  # bf16 sampler against the fp32 trainer
        # the two parts add up to log W = log pi_theta - log mu (means over the same sequences)
        assert r["stale/log_w_mean"] + r["mismatch/log_w_mean"] == pytest.approx(r["is/log_w_pi_mu_mean"], abs=1e-4)
        assert "perf/reference_time_s" in r
    on_policy = [r for r in rows if r["stale/index"] == 0]
    assert all(abs(r["stale/log_w_mean"]) < 1e-5 for r in on_policy)  # same weights: only the mismatch is left


def test_on_policy_vespo_grpo_gspo_cispo_train_bit_identically(tmp_path):
    """At N = 1 with recompute W = 1 exactly, and these four losses reduce to -A grad log pi.

    The staleness benchmark relies on it: its N = 1 row is one computation for the four losses.
    """
    finals = {}
    for loss in ("vespo", "grpo", "gspo", "cispo"):
        cfg = tiny_config(
            tmp_path / loss,
            f"algorithm.loss={loss}",
            "algorithm.staleness=1",
            "run.total_steps=4",
            "task.reward_fn=tiny_run:length_parity_reward",
        )
        trainer = Trainer(cfg)
        trainer.train()
        finals[loss] = [p.detach().clone() for p in trainer.model.parameters()]
        rows = [r for r in read_rows(tmp_path / loss / "run") if "stale/index" in r]
        assert any(r["reward/informative_group_frac"] > 0 for r in rows)  # the updates were not all zero
    for loss in ("grpo", "gspo", "cispo"):
        assert all(torch.equal(a, b) for a, b in zip(finals["vespo"], finals[loss])), loss


@pytest.mark.parametrize("loss", sorted(list_losses()))
def test_every_loss_takes_an_informative_step(tmp_path, loss):
    """Every registered loss moves the weights through its gradient: rewards that split every group
    (so A != 0), no weight decay (so only the loss's gradient can move a weight), and staleness 2
    (so the second step sees W != 1)."""
    cfg = tiny_config(
        tmp_path,
        f"algorithm.loss={loss}",
        "algorithm.staleness=2",
        "run.total_steps=2",
        "optim.weight_decay=0.0",
        "task.reward_fn=tiny_run:text_hash_reward",
    )
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    rows = [r for r in read_rows(tmp_path / "run") if "stale/index" in r]
    assert len(rows) == 2
    for row in rows:
        assert row["grad/skipped"] == 0.0
        assert row["reward/informative_group_frac"] > 0
        assert row["grad/norm"] > 0, f"{loss}: zero gradient at step {row['step']}"
        assert all(v is None or isinstance(v, (int, float)) for v in row.values())
    assert rows[1]["is/abs_log_w_mean"] > 0  # the second step is off-policy
    moved = sum(float((a - b.detach()).abs().sum()) for a, b in zip(before, trainer.model.parameters()))
    assert moved > 0, f"{loss}: the weights did not move"


@pytest.mark.parametrize("loss", ["vespo", "vespo_adaptive"])
def test_micro_batches_log_the_same_diagnostics_as_one_pass(tmp_path, loss):
    """Quantiles, ESS and phi shares are not additive: with micro-batches they must still be the
    whole mini-batch's (the first rollout batch: the same data in both runs). vespo_adaptive's alpha
    depends on the whole mini-batch: the trainer's pre-pass makes it the same too."""
    common = [
        "algorithm.staleness=3",
        "run.total_steps=3",
        "algorithm.mini_batch_prompts=4",
        "task.reward_fn=tiny_run:text_hash_reward",
        f"algorithm.loss={loss}",
        "sampling.max_new_tokens=16",
        "optim.lr=0.05",
    ]
    train(tiny_config(tmp_path / "whole", *common))
    train(tiny_config(tmp_path / "micro", *common, "algorithm.micro_batch_size=3"))
    whole = [r for r in read_rows(tmp_path / "whole" / "run") if "stale/index" in r]
    micro = [r for r in read_rows(tmp_path / "micro" / "run") if "stale/index" in r]
    keys = [k for k in whole[-1] if k.startswith(("is/", "phi/", "loss/")) and isinstance(whole[-1][k], float)]
    assert any("p90" in k or "ess" in k for k in keys) and len(keys) > 10
    for a, b in zip(whole, micro):
        for key in keys:
            assert key in b, key
            # float rounding of the accumulated gradient moves the later steps by ~1e-4 relative at lr 0.05
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), (a["step"], key)
    assert whole[-1]["is/abs_log_w_mean"] > 0  # the comparison covers stale mini-batches too
    if loss == "vespo_adaptive":  # and batches where the adaptation is active
        assert whole[-1]["vespo_adaptive/alpha_pos"] < 0.5


def _train_rows(run_dir: Path) -> list[dict]:
    skip = ("perf/", "optim/lr")
    return [{k: v for k, v in r.items() if not k.startswith(skip)} for r in read_rows(run_dir)]


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    extra = ["algorithm.staleness=3", "checkpoint.every=2", "eval.every=2", "sampling.sampler_dtype=float32"]
    full = load_config(None, [*TINY, f"run.out_dir={tmp_path / 'full'}", "run.total_steps=6", *extra])
    train(full)
    # stop after 4 steps (mid rollout batch: step 4 is mini-batch 1 of 3), then resume to 6
    part = load_config(None, [*TINY, f"run.out_dir={tmp_path / 'part'}", "run.total_steps=4", *extra])
    train(part)
    resumed = load_config(tmp_path / "part" / "config.yaml", ["run.total_steps=6"])
    train(resumed, resume=True)
    assert _train_rows(tmp_path / "full") == _train_rows(tmp_path / "part")


def test_resume_after_a_kill_loses_at_most_the_steps_since_the_checkpoint(tmp_path):
    """kill -9 in the middle of a run: the newest checkpoint loads and the run continues."""
    run_dir = tmp_path / "killed"
    overrides = [*TINY, f"run.out_dir={run_dir}", "run.total_steps=200", "checkpoint.every=1", "algorithm.staleness=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vespo.cli", "train", *overrides], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    import time

    deadline = time.time() + 120
    while time.time() < deadline:
        if len(list((run_dir / "checkpoints").glob("step_*"))) >= 2 and (run_dir / "metrics.jsonl").exists():
            if len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 4:
                break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    from vespo.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    saved_step = json.loads((ckpt / "state.json").read_text())["step"]
    resumed = load_config(run_dir / "config.yaml", [f"run.total_steps={saved_step + 2}"])
    train(resumed, resume=True)
    steps = [r["step"] for r in read_rows(run_dir) if "stale/index" in r]
    assert steps == list(range(1, saved_step + 3))


def test_raising_reward_function_is_contained(tmp_path, monkeypatch):
    module = tmp_path / "bad_reward.py"
    module.write_text(
        textwrap.dedent("""
        calls = 0
        def reward(response, example):
            global calls
            calls += 1
            if calls % 2:
                raise RuntimeError("flaky verifier")
            return 1.0
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_config(tmp_path, "task.reward_fn=bad_reward:reward", "algorithm.staleness=1", "run.total_steps=2")
    train(cfg)
    rows = [r for r in read_rows(tmp_path / "run") if "stale/index" in r]
    assert len(rows) == 2
    assert all(r["reward/errors"] > 0 for r in rows)
    assert all(0.0 < r["reward/mean"] < 1.0 for r in rows)


def test_refuses_to_overwrite_a_run(tmp_path):
    cfg = tiny_config(tmp_path, "run.total_steps=1", "algorithm.staleness=1")
    train(cfg)
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(cfg)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vespo.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "algorithm.lossx=vespo"], "unknown config key 'algorithm.lossx'"),
        (["train", "algorithm.loss=nope"], "unknown policy loss 'nope'"),
        (["train", "algorithm.staleness=zero"], "algorithm.staleness"),
        (["train", "algorithm.loss_params={k_pos: 0.5}"], "variance bound"),
        (["train", "missing.yaml"], "does not exist"),
        (["train", "task.kind=verl_file", "task.train_path=nowhere.jsonl"], "nowhere.jsonl"),
        (["train", "--resume", "no_such_run"], "no_such_run"),
        (["plot", "no_such_run"], "no_such_run"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_cli_bad_data_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [{"role": "user", "content": "1+1?"}], "data_source": "x"}\n')
    result = _cli(
        "train",
        "task.kind=verl_file",
        f"task.train_path={bad}",
        f"run.out_dir={tmp_path / 'r'}",
        "logging.progress=false",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "bad.jsonl" in result.stderr and "reward_model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_plot_of_a_run(tmp_path):
    cfg = tiny_config(tmp_path, "run.total_steps=2", "algorithm.staleness=1", "eval.every=1")
    train(cfg)
    result = _cli("plot", str(tmp_path / "run"), "--out", str(tmp_path / "curves.png"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_eval_command_scores_the_latest_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "run.total_steps=2", "algorithm.staleness=1")
    result = train(cfg)
    run = tmp_path / "run"
    out = _cli("eval", str(run), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "eval/accuracy" in out.stdout
    # same weights, same eval prompts and seed as the run's final eval: the same greedy accuracy
    from vespo.train.trainer import evaluate_run

    again = evaluate_run(run)
    assert again["eval/accuracy"] == result.final_eval["eval/accuracy"]


def test_evaluation_is_pure_and_eval_which_best_scores_the_best_weights(tmp_path):
    """evaluate() records the best result but evaluate_run writes nothing; --which best evaluates
    best/model.safetensors at the step it was saved."""
    reward = Path(__file__).parents[1] / "tiny_run.py"  # by path: the CLI subprocess imports it too
    cfg = tiny_config(
        tmp_path,
        "run.total_steps=4",
        "algorithm.staleness=2",
        "eval.every=2",
        f"task.reward_fn={reward}:text_hash_reward",
    )
    result = train(cfg)
    run = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    from vespo.train.trainer import evaluate_run

    best = evaluate_run(run, which="best")
    assert best["eval/accuracy"] == result.best_eval["eval/accuracy"]
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing written or touched
    out = _cli("eval", str(run), "--which", "best", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"step {int(result.best_eval['step'])}" in out.stdout
    bad = _cli("eval", str(run), "--which", "worst", cwd=tmp_path)
    assert bad.returncode == 2


def test_reward_outcome_counts_are_logged_once_per_response(tmp_path):
    """A rollout batch feeds N step rows; its reward error count appears on its first row only, so
    summing the column over steps gives the number of failed responses."""
    cfg = tiny_config(
        tmp_path, "algorithm.staleness=3", "run.total_steps=6", "task.reward_fn=tiny_run:failing_half_reward"
    )
    train(cfg)
    rows = [r for r in read_rows(tmp_path / "run") if "stale/index" in r]
    errors = [r.get("reward/errors") for r in rows]
    assert [e is not None for e in errors] == [True, False, False, True, False, False]
    # every failed response scored 0, every other one 1: the failures are the zero rewards
    sequences = 2 * 4 * 3  # mini_batch_prompts x G x N per rollout batch
    for first in (0, 3):
        zeros = sum((1.0 - rows[k]["reward/mean"]) * sequences / 3 for k in range(first, first + 3))
        assert errors[first] == pytest.approx(zeros) and errors[first] > 0


def test_time_limit_ends_the_run_with_a_final_eval_and_checkpoint(tmp_path, capsys):
    from vespo.train.checkpoint import latest_checkpoint

    cfg = tiny_config(tmp_path, "run.total_steps=50", "run.time_limit_minutes=1e-6", "eval.every=1000")
    result = train(cfg)
    assert result.steps == 1  # checked after each optimizer step: no step starts that would end past the limit
    rows = read_rows(tmp_path / "run")
    assert rows[-1]["step"] == 1 and "eval/accuracy" in rows[-1]  # the final eval ran
    assert latest_checkpoint(tmp_path / "run").name == "step_000001"
    assert "run.time_limit_minutes=1e-06: stopping after step 1 of 50" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1
    # a resume with a limit the run has not used up goes on to total_steps
    resumed = load_config(tmp_path / "run" / "config.yaml", ["run.total_steps=3", "run.time_limit_minutes=600"])
    assert train(resumed, resume=True).steps == 3
    assert "time_limit" not in capsys.readouterr().err
