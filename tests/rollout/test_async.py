"""Asynchronous training on Ray: staleness bound, token versions, partial rollouts, zero-staleness
equivalence with the sync trainer, worker crashes, a killed trainer, and clean shutdown."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_run import QUIET_ON_POLICY

pytest.importorskip("ray")

from vespo.rollout.generate import RolloutSettings
from vespo.rollout.log_probs import sequence_log_probs
from vespo.rollout.prompts import encode_prompts
from vespo.rollout.ray_source import (
    RolloutWorker,
    RolloutWorkerError,
    WorkerSpec,
    staleness_bound,
    staleness_budget,
)
from vespo.rollout.ray_utils import process_alive, start_ray
from vespo.tasks import build_task
from vespo.train.checkpoint import latest_checkpoint
from vespo.train.config import ConfigError, load_config
from vespo.train.models import build_char_tokenizer, build_tiny_model
from vespo.train.trainer import Trainer

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def length_reward(response: str, example) -> float:
    """A reward with variance on a random model (half the responses score), so weights move."""
    return float(len(response) % 2)


TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "task.train_size=200",
    f"task.reward_fn={__file__}:length_reward",
    "sampling.group_size=4",
    "sampling.max_new_tokens=12",
    "algorithm.mini_batch_prompts=4",
    *QUIET_ON_POLICY,
]


def tiny_config(run_dir: Path, *extra: str):
    return load_config(None, [*TINY, f"run.out_dir={run_dir}", *extra])


def async_config(run_dir: Path, *extra: str):
    return tiny_config(run_dir, "run.mode=async", *extra)


def read_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "loss/value" in r]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the in-process tests of this module (~4 s to start)."""
    session = start_ray(num_cpus=2)
    yield session
    session.stop()
    assert not session.alive_processes(), "Ray processes survived shutdown"


class Recorder:
    """Wraps a trainer's async source: keeps every consumed mini-batch and the weights of every sync."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.source = trainer.source
        self.batches: list[tuple[int, object]] = []
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.on_step = None
        next_batch, after = self.source.next_batch, self.source.after_optimizer_step

        def recording_next(model, policy_version):
            if not self.weights:
                self.weights[policy_version] = copy.deepcopy(model.state_dict())
            mb = next_batch(model, policy_version)
            self.batches.append((policy_version, mb))
            return mb

        def recording_after(model, step):
            if step % self.source.sync_every == 0:
                self.weights[step] = copy.deepcopy(model.state_dict())
            out = after(model, step)
            if self.on_step is not None:
                self.on_step(step)
            return out

        self.source.next_batch = recording_next
        self.source.after_optimizer_step = recording_after


def _mu_error(model_like: torch.nn.Module, weights: dict, mb, select: torch.Tensor) -> float:
    """Largest |mu - log pi_weights| over the selected response tokens (full forward, fp32)."""
    model = copy.deepcopy(model_like)
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        logp = sequence_log_probs(model, mb.input_ids, mb.attention_mask, mb.response_mask.shape[1])
    return (logp - mb.rollout_log_prob)[select].abs().max().item()


# --------------------------------------------------------------------------------- semantics
def test_budget_and_bound_follow_verl():
    # worked example of docs/async.md: K=4, s=1, m=8 -> 64 groups per window, tokens <= 7 steps old
    assert staleness_budget(4, 1.0, 8) == 64 and staleness_bound(4, 1.0, 8) == 7
    # s=0 is verl's "stream off-policy pipeline": exactly K*m groups per window, lag <= K-1
    assert staleness_budget(4, 0.0, 8) == 32 and staleness_bound(4, 0.0, 8) == 3
    # K=1, s=0 is on-policy
    assert staleness_budget(1, 0.0, 8) == 8 and staleness_bound(1, 0.0, 8) == 0
    # fractional thresholds round the budget down to whole groups
    assert staleness_budget(4, 0.1, 8) == 35 and staleness_bound(4, 0.1, 8) == 4


def test_queue_smaller_than_a_step_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="queue_size"):
        async_config(tmp_path / "run", "async.queue_size=2")


def test_partial_rollout_tokens_carry_the_weights_that_sampled_them():
    """In-process worker: a sync lands mid-generation; the tokens before it carry version 0 and
    mu of version 0, the ones after it version 1 and mu of version 1."""
    tok = build_char_tokenizer()
    model = build_tiny_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        seed=0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        init_std=0.05,
    )
    task = build_task({"kind": "reasoning_gym", "name": "chain_sum"})
    settings = RolloutSettings(group_size=3, max_new_tokens=20)
    spec = WorkerSpec(
        model=model, tokenizer=tok, task=task, settings=settings, threads=1, partial_rollout=True, measure_mismatch=True
    )
    worker = RolloutWorker(spec)
    w0 = copy.deepcopy(model.state_dict())
    w1 = {k: v + 0.05 * torch.randn_like(v) for k, v in w0.items()}
    worker.set_weights(w0, 0, seed=1)

    class SyncAfter:  # the stop flag of the generation: a weight sync arrives at the 6th check
        def __init__(self):
            self.calls, self.event = 0, threading.Event()

        def is_set(self):
            self.calls += 1
            if self.calls == 6:
                worker.set_weights(w1, 1)
            return self.event.is_set()

        def set(self):
            self.event.set()

        def clear(self):
            self.event.clear()

    worker._interrupt = SyncAfter()
    examples = task.train_examples(2, seed=0)
    out = worker.generate({"ticket": 0, "min_version": 0, "examples": examples})
    assert out["stats"]["segments"] == 2.0
    for group, prompt in zip(out["groups"], encode_prompts(tok, examples)):
        for resp, mu, ver, ref in zip(
            group.response_ids, group.rollout_log_probs, group.token_versions, group.reference_log_probs
        ):
            assert ver == sorted(ver) and set(ver) <= {0, 1}
            ids = torch.tensor([prompt + resp])
            mask = torch.ones_like(ids)
            for version, weights in ((0, w0), (1, w1)):
                m = copy.deepcopy(model)
                m.load_state_dict(weights)
                m.eval()
                with torch.no_grad():
                    logp = sequence_log_probs(m, ids, mask, len(resp))[0]
                sel = torch.tensor(ver) == version
                if sel.any():
                    assert torch.allclose(logp[sel], torch.tensor(mu)[sel], atol=1e-4)
                    assert torch.allclose(logp[sel], torch.tensor(ref)[sel], atol=1e-4)
        assert any(0 in v and 1 in v for v in group.token_versions) or all(len(r) < 6 for r in group.response_ids)
    assert out["stats"]["interrupted_rows"] > 0


def test_bf16_sampler_flips_moe_routing():
    """A tiny Qwen3-MoE: the bf16 sampler and the fp32 reference route some tokens differently."""
    tok = build_char_tokenizer()
    model = build_tiny_model(
        "qwen3_moe",
        vocab_size=len(tok),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        seed=0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    task = build_task({"kind": "reasoning_gym", "name": "chain_sum"})
    settings = RolloutSettings(group_size=4, max_new_tokens=12, sampler_dtype="bfloat16")
    spec = WorkerSpec(
        model=model,
        tokenizer=tok,
        task=task,
        settings=settings,
        threads=1,
        partial_rollout=False,
        measure_mismatch=True,
    )
    worker = RolloutWorker(spec)
    worker.set_weights(copy.deepcopy(model.state_dict()), 0, seed=0)
    out = worker.generate({"ticket": 0, "min_version": 0, "examples": task.train_examples(4, seed=0)})
    assert out["stats"]["routing_flip_frac"] > 0
    diffs = [
        abs(r - m)
        for g in out["groups"]
        for rr, mm in zip(g.reference_log_probs, g.rollout_log_probs)
        for r, m in zip(rr, mm)
    ]
    assert max(diffs) > 1e-3  # bf16 sampling against fp32: a real log-prob gap


# ------------------------------------------------------------------------------ async runs
def test_async_run_bounded_staleness_and_exact_mu_with_partial_rollouts(tmp_path, ray_session):
    cfg = async_config(
        tmp_path / "run",
        "run.total_steps=8",
        "async.sync_every=2",
        "async.staleness_threshold=1.0",
        "async.partial_rollout=true",
        "algorithm.old_log_prob=sampler",
        "sampling.max_new_tokens=24",
    )
    trainer = Trainer(cfg)
    rec = Recorder(trainer)
    trainer.train()
    bound = staleness_bound(2, 1.0, 4)
    assert bound == 3
    sync_points = set(rec.weights)
    assert sync_points == {0, 2, 4, 6, 8}
    partial, wrong_version_error = 0, 0.0
    for version, mb in rec.batches:
        mask = mb.response_mask.bool()
        versions = mb.token_version[mask]
        assert set(versions.tolist()) <= sync_points  # every token was made by pushed weights
        assert (version - versions).max().item() <= bound  # no consumed token beyond the bound
        assert (version - versions).min().item() >= 0
        for row in range(mb.num_sequences):  # versions never go back within a response
            v = mb.token_version[row][mask[row]]
            assert torch.all(v[1:] >= v[:-1])
            partial += int(v.unique().numel() > 1)
        for v in versions.unique().tolist():  # mu == log-prob under the weights that sampled each token
            select = mask & (mb.token_version == v)
            assert _mu_error(trainer.model, rec.weights[v], mb, select) < 1e-4
            if v > 0:
                wrong = _mu_error(trainer.model, rec.weights[v - 2], mb, select)
                wrong_version_error = max(wrong_version_error, wrong)
    rows = read_rows(tmp_path / "run")
    assert len(rows) == 8
    assert all(r["stale/bound_violations"] == 0 for r in rows)
    assert all(r["stale/versions_behind_max"] <= bound for r in rows)
    # the worker is the bottleneck here, so every sync lands in a chunk in flight
    assert partial > 0 and sum(r["stale/partial_frac"] for r in rows) > 0
    assert wrong_version_error > 1e-3  # the mu check above can tell versions apart
    for key in (
        "perf/queue_depth",
        "perf/worker_util",
        "perf/trainer_util",
        "stale/lag_frac_0",
        "mismatch/pi_mu_k3_kl",
        "stale/log_w_mean",
        "mismatch/log_w_mean",
        "is/log_w_pi_mu_mean",
    ):
        assert key in rows[-1], key


def test_async_two_workers_bf16_moe_without_partial_rollouts(tmp_path, ray_session):
    """Responses are never split; prompts are trained in stream order, none skipped or repeated.
    The policy is a tiny Qwen3-MoE sampled in bf16 and trained in fp32: the mismatch is real."""
    cfg = async_config(
        tmp_path / "run",
        "run.total_steps=6",
        "async.num_workers=2",
        "async.sync_every=2",
        "async.staleness_threshold=0.5",
        "async.partial_rollout=false",
        "model.arch=qwen3_moe",
        "model.num_experts=4",
        "model.num_experts_per_tok=2",
        "sampling.sampler_dtype=bfloat16",
        "algorithm.old_log_prob=sampler",
    )
    trainer = Trainer(cfg)
    rec = Recorder(trainer)
    expected = trainer.source.stream
    order = [expected.index(i) for i in range(6 * 4)]
    prompts = encode_prompts(trainer.tokenizer, [trainer.train_examples[i] for i in order])
    trainer.train()
    bound = staleness_bound(2, 0.5, 4)
    seen = []
    for version, mb in rec.batches:
        mask = mb.response_mask.bool()
        for row in range(mb.num_sequences):
            v = mb.token_version[row][mask[row]]
            assert v.unique().numel() == 1 and v[0].item() % 2 == 0
            assert version - v[0].item() <= bound
        for row in range(0, mb.num_sequences, 4):  # one prompt per group of G=4
            ids = mb.input_ids[row, : mb.prompt_length][mb.attention_mask[row, : mb.prompt_length].bool()]
            seen.append(ids.tolist())
    assert seen == prompts
    rows = read_rows(tmp_path / "run")
    assert all(r["mismatch/engine_log_prob_diff_abs_mean"] > 1e-4 for r in rows)  # bf16 vs fp32
    assert all(r["mismatch/engine_k3_kl"] >= 0 for r in rows)
    assert any("mismatch/routing_flip_frac" in r for r in rows)


def _run_rows(run_dir: Path) -> list[dict]:
    return read_rows(run_dir)


def test_zero_staleness_async_reproduces_the_sync_trainer(tmp_path, ray_session):
    """K=1, s=0, no partial rollouts is verl's on-policy pipeline; it must be the sync trainer at
    N=1 (verl #6780 reports the opposite). Same seeds, one thread each: identical samples."""
    common = ["run.total_steps=4", "algorithm.old_log_prob=recompute"]
    sync_cfg = tiny_config(tmp_path / "sync", *common)
    Trainer(sync_cfg).train()
    async_cfg = async_config(
        tmp_path / "async", *common, "async.sync_every=1", "async.staleness_threshold=0", "async.partial_rollout=false"
    )
    Trainer(async_cfg).train()
    sync_rows, async_rows = _run_rows(tmp_path / "sync"), _run_rows(tmp_path / "async")
    assert len(sync_rows) == len(async_rows) == 4
    for s, a in zip(sync_rows, async_rows):
        assert a["stale/versions_behind_max"] == 0.0
        assert a["reward/mean"] == s["reward/mean"]
        assert a["response/length_mean"] == s["response/length_mean"]
        assert a["loss/value"] == pytest.approx(s["loss/value"], rel=1e-4, abs=1e-6)
        assert a["grad/norm"] == pytest.approx(s["grad/norm"], rel=1e-4)


def test_dead_workers_are_replaced_then_the_run_stops_with_a_checkpoint(tmp_path, ray_session):
    """The first crash is repaired (one replacement allowed); the second stops the run cleanly with
    a checkpoint of the current step and a message saying how to resume; the resume completes."""
    import ray

    # K=1, s=0: the chunk of the next step is always in flight when the worker is killed after a step
    cfg = async_config(
        tmp_path / "run",
        "run.total_steps=6",
        "async.sync_every=1",
        "async.max_worker_restarts=1",
        "async.staleness_threshold=0",
        "async.partial_rollout=false",
    )
    trainer = Trainer(cfg)
    rec = Recorder(trainer)

    def kill_worker(step: int) -> None:
        if step in (2, 4):
            handle = trainer.source._slots[0].handle
            ray.kill(handle, no_restart=True)
            # ray.kill is asynchronous: a call may still be served just after it. Wait until Ray
            # reports the actor dead, so the trainer meets a dead worker at its next step.
            deadline = time.monotonic() + 60
            while True:
                try:
                    ray.get(handle.ready.remote(), timeout=10)
                except ray.exceptions.RayActorError:
                    break
                assert time.monotonic() < deadline, "the killed worker still answers after 60 s"
                time.sleep(0.1)

    rec.on_step = kill_worker
    with pytest.raises(RolloutWorkerError, match="--resume"):
        trainer.train()
    rows = read_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["async/worker_restarts"] == 1.0
    assert latest_checkpoint(tmp_path / "run").name == "step_000004"
    resumed = Trainer(async_config(tmp_path / "run", "run.total_steps=6", "async.sync_every=1"), resume=True)
    assert resumed.step == 4
    resumed.train()
    assert [r["step"] for r in read_rows(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------- processes, kill -9
RUN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vespo.train.config import load_config
    from vespo.train.trainer import Trainer, resume_config
    out, resume = sys.argv[1], sys.argv[2] == "resume"
    overrides = sys.argv[3:]
    cfg = resume_config(out, overrides) if resume else load_config(None, overrides)
    trainer = Trainer(cfg, resume=resume)
    trainer.train()
    print("PIDS", json.dumps(sorted(trainer.source.session.processes)))
    """
)


def test_killed_trainer_resumes_and_leaves_no_ray_processes(tmp_path):
    """SIGKILL the trainer mid-run, resume it; afterwards no process of either Ray instance lives."""
    run = tmp_path / "run"
    overrides = [
        *TINY,
        f"run.out_dir={run}",
        "run.mode=async",
        "run.total_steps=200",
        "checkpoint.every=2",
        "async.sync_every=2",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, str(run), "new", *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 240  # generous: a loaded 2-core machine starts Ray slowly
    record = run / "ray_processes.json"
    latest = run / "checkpoints" / "latest"

    def checkpointed_step() -> int:  # old checkpoints are pruned, so read the "latest" pointer
        try:
            return int(latest.read_text().strip().split("_")[-1])
        except (OSError, ValueError):
            return -1

    while time.monotonic() < deadline and not (record.exists() and checkpointed_step() >= 2):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.1)
    assert record.exists() and checkpointed_step() >= 2, "the run never reached step 2"
    first = [int(p) for p in json.loads(record.read_text())["processes"]]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # resume in a fresh process for a few more steps; it first reaps the dead run's Ray leftovers
    target = checkpointed_step() + 3  # the kill may land a few steps after the first checkpoint we saw
    done = subprocess.run(
        [sys.executable, "-c", RUN_SCRIPT, str(run), "resume", f"run.total_steps={target}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [r["step"] for r in read_rows(run) if "stale/index" in r] == list(range(1, target + 1))
    assert not record.exists()  # removed by the clean shutdown of the resumed run
    second = json.loads(done.stdout.split("PIDS", 1)[1])
    assert second, "the resumed run recorded no Ray processes"
    alive = [pid for pid in first + second if process_alive(pid)]
    assert not alive, f"Ray processes still alive: {alive}"
