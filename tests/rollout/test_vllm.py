"""The vLLM sampler engine (``sampling.engine=vllm``): mu against the trainer's fp32 forward after weight
syncs (tied LM head), temperature / top-p log-probs, partial rollouts, reproducibility, bad options, a
dead engine, and sync / async training runs through the Trainer.

Needs vLLM (on CPU: ``bash scripts/install_vllm_cpu.sh``); skipped otherwise. Run with
``pytest -m vllm tests/rollout/test_vllm.py`` (about 3 engine starts: a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from vespo.rollout.vllm_engine import vllm_unavailable_reason

_REASON = vllm_unavailable_reason()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(_REASON is not None, reason=f"vLLM is not usable here: {_REASON}"),
]

from tiny_run import QUIET_ON_POLICY  # noqa: E402

from vespo.rollout.batch import Rollout  # noqa: E402
from vespo.rollout.engine import EngineError, build_engine  # noqa: E402
from vespo.rollout.log_probs import sequence_log_probs  # noqa: E402
from vespo.rollout.vllm_engine import EngineDiedError  # noqa: E402
from vespo.train.models import build_char_tokenizer, build_tiny_model  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
TOL = 1e-4  # per token, fp32 engine against the trainer's fp32 forward


def _vllm_processes() -> list:
    """Live vLLM engine processes started from this test process (children of any depth)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any(s in p.name() for s in ("VLLM", "EngineCore")):
                out.append(p)
        except psutil.Error:
            continue
    return out


def _no_vllm_left(timeout: float = 30.0, keep: tuple = ()) -> list:
    """vLLM processes still alive after ``timeout`` s, other than the ``keep`` pids."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in _vllm_processes() if p.pid not in keep]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _tiny(seed: int = 0):
    tok = build_char_tokenizer()
    model = build_tiny_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        seed=seed,
        init_std=0.1,
        tie_word_embeddings=True,
    )
    return model.eval(), tok


def _perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _token_errors(model: torch.nn.Module, rollout: Rollout, select=None, *, temperature: float = 1.0) -> torch.Tensor:
    """|mu - trainer fp32 log-prob| of every (selected) response token."""
    b = rollout.to_batch(0)
    with torch.no_grad():
        ref = sequence_log_probs(model, b.input_ids, b.attention_mask, b.response_length, temperature=temperature)
    mask = b.response_mask if select is None else b.response_mask & select(b)
    return (ref - b.rollout_log_prob).abs()[mask]


def _prompts(tok, n_per: int = 4) -> list[list[int]]:
    texts = ["12+3=", "7*8=", "(4-1)*2=", "99+1="]
    return [tok.encode(t) for t in texts for _ in range(n_per)]


@pytest.fixture(scope="module")
def tiny_engine():
    """One fp32 engine on a tiny tied-head Llama, shared by the engine tests (the last one kills it)."""
    model, tok = _tiny()
    engine = build_engine("vllm", model, dtype="float32")
    yield engine, model, tok
    engine.close()
    assert not _no_vllm_left(), "vLLM processes survived close()"


# ------------------------------------------------------------------------------------------ engine
def test_log_probs_equal_the_trainer_fp32_forward_after_weight_syncs(tiny_engine):
    engine, model, tok = tiny_engine
    assert engine.start_time_s > 0 and engine.supports_partial_rollout
    prompts = _prompts(tok)
    g = torch.Generator().manual_seed(0)
    first = engine.generate(prompts, max_new_tokens=32, eos_token_id=tok.eos_token_id, pad_token_id=0, generator=g)
    assert _token_errors(model, first).max() < TOL
    assert all(len(r) == 32 or f for r, f in zip(first.response_ids, first.finished))
    assert all(v == [0] * len(v) for v in first.token_versions)
    for version in (1, 2):  # two syncs: the tied head must follow the embedding every time
        _perturb(model, 0.05, seed=version)
        engine.load_state_dict(model.state_dict(), version=version)
        r = engine.generate(prompts, max_new_tokens=32, eos_token_id=tok.eos_token_id, pad_token_id=0, generator=g)
        err = _token_errors(model, r)
        assert err.numel() > 100 and err.max() < TOL, float(err.max())
        assert {v for vs in r.token_versions for v in vs} == {version}
    assert len(engine.sync_times_s) == 2 and all(t > 0 for t in engine.sync_times_s)


def test_temperature_and_top_p_log_probs_are_of_the_renormalised_nucleus(tiny_engine):
    """mu under temperature 0.7 and top-p 0.9 is the truncated, renormalised log-prob (the hf engine's)."""
    engine, model, tok = tiny_engine
    prompts = _prompts(tok, 2)
    t, top_p = 0.7, 0.9
    r = engine.generate(
        prompts,
        max_new_tokens=24,
        eos_token_id=None,
        pad_token_id=0,
        temperature=t,
        top_p=top_p,
        generator=torch.Generator().manual_seed(1),
    )
    worst, log_s = 0.0, []
    with torch.no_grad():
        for p, resp, mu in zip(r.prompt_ids, r.response_ids, r.rollout_log_probs):
            logits = model(torch.tensor([p + resp])).logits[0, len(p) - 1 : -1].float() / t
            full = torch.log_softmax(logits, -1)
            srt, order = full.sort(-1, descending=True)
            drop = torch.zeros_like(full, dtype=torch.bool).scatter_(
                -1, order, (srt.exp().cumsum(-1) - srt.exp()) >= top_p
            )
            kept = full.masked_fill(drop, float("-inf"))
            nucleus = kept - torch.logsumexp(kept, -1, keepdim=True)
            idx = torch.tensor(resp)[:, None]
            worst = max(worst, float((nucleus.gather(-1, idx).squeeze(-1) - torch.tensor(mu)).abs().max()))
            log_s.append(torch.logsumexp(kept, -1))  # log S: what the ratio against the full softmax carries
    assert worst < TOL
    assert torch.cat(log_s).min() < -1e-3  # the truncation is real here, so the check above means something
    greedy = engine.generate(prompts[:2], max_new_tokens=8, eos_token_id=None, pad_token_id=0, temperature=0)
    assert greedy.response_ids[0] == greedy.response_ids[1]
    assert _token_errors(model, greedy).max() < TOL  # greedy: log-prob of the untempered distribution


def test_same_generator_same_samples(tiny_engine):
    engine, _, tok = tiny_engine
    prompts = _prompts(tok, 2)
    a = engine.generate(
        prompts, max_new_tokens=16, eos_token_id=None, pad_token_id=0, generator=torch.Generator().manual_seed(5)
    )
    b = engine.generate(
        prompts, max_new_tokens=16, eos_token_id=None, pad_token_id=0, generator=torch.Generator().manual_seed(5)
    )
    c = engine.generate(
        prompts, max_new_tokens=16, eos_token_id=None, pad_token_id=0, generator=torch.Generator().manual_seed(6)
    )
    assert a.response_ids == b.response_ids and a.rollout_log_probs == b.rollout_log_probs
    assert a.response_ids != c.response_ids
    assert a.response_ids[0] != a.response_ids[1]  # each request has its own seed


def test_many_long_prompts(tiny_engine):
    """More prompt tokens than one engine step takes by default (4,096): with per-request seeds, a prompt
    split over two steps killed vLLM 0.32 on CPU, so the engine prefills prompts whole."""
    engine, model, tok = tiny_engine
    prompts = [tok.encode(f"{i}+" * 100 + "1=")[:300] for i in range(24)]  # 7,200 prompt tokens
    r = engine.generate(
        prompts, max_new_tokens=4, eos_token_id=None, pad_token_id=0, generator=torch.Generator().manual_seed(3)
    )
    assert r.response_lengths == [4] * 24
    assert _token_errors(model, r).max() < TOL


def test_partial_rollout_resumes_under_new_weights(tiny_engine):
    engine, model, tok = tiny_engine
    prompts = _prompts(tok, 2)
    v0 = engine.policy_version
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 6

    g = torch.Generator().manual_seed(2)
    part = engine.generate(prompts, max_new_tokens=40, eos_token_id=None, pad_token_id=0, generator=g, stop_flag=stop)
    lengths = part.response_lengths
    assert 0 < min(lengths) and max(lengths) < 40 and not any(part.finished)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    _perturb(model, 0.05, seed=11)
    engine.load_state_dict(model.state_dict(), version=v0 + 1)
    full = engine.generate(prompts, max_new_tokens=40, eos_token_id=None, pad_token_id=0, generator=g, resume=part)
    assert full.response_lengths == [40] * len(prompts)
    for i, n in enumerate(lengths):
        assert full.response_ids[i][:n] == part.response_ids[i]
        assert full.token_versions[i] == [v0] * n + [v0 + 1] * (40 - n)
    assert _token_errors(model, full, lambda b: b.token_version == v0 + 1).max() < TOL
    new = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(old)
    assert _token_errors(model, full, lambda b: b.token_version == v0).max() < TOL
    model.load_state_dict(new)


def test_bad_engine_options_give_one_clear_error():
    model, _ = _tiny()
    running = tuple(p.pid for p in _vllm_processes())  # the shared engine's
    cases = [
        (
            {"enforce_eagre": True},
            "unknown sampling.engine_options key 'enforce_eagre' for vLLM (did you mean 'enforce_eager'?)",
        ),
        ({"logprobs_mode": "raw_logprobs"}, "cannot be set"),
        ({"max_model_len": 10**6}, "vLLM could not start"),  # longer than the model allows: vLLM refuses it
    ]
    for options, expected in cases:
        with pytest.raises(EngineError) as info:
            build_engine("vllm", model, dtype="float32", options=options)
        message = str(info.value)
        assert expected in message and "\n" not in message, message
    tok = build_char_tokenizer()  # a model vLLM's CPU kernels cannot run: refused before anything starts
    odd = build_tiny_model("llama", vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2)
    with pytest.raises(EngineError, match="does not support head_dim=16"):
        build_engine("vllm", odd, dtype="bfloat16")
    with pytest.raises(EngineError, match="hf takes no engine options"):
        build_engine("hf", model, options={"enforce_eager": True})
    assert not _no_vllm_left(keep=running), "a failed start left vLLM processes behind"


def test_a_dead_engine_raises_engine_died_error(tiny_engine):
    """Last user of the shared engine: kill its processes; generate and sync then raise EngineDiedError,
    a RolloutSourceError (the trainer checkpoints and stops; a Ray worker is replaced)."""
    from vespo.rollout.source import RolloutSourceError

    engine, model, tok = tiny_engine
    victims = _vllm_processes()
    assert victims
    for p in victims:
        os.kill(p.pid, signal.SIGKILL)
    with pytest.raises(EngineDiedError) as info:
        for _ in range(3):  # the client may need a moment to notice
            engine.generate(_prompts(tok, 1), max_new_tokens=8, eos_token_id=None, pad_token_id=0)
            time.sleep(1.0)
    assert isinstance(info.value, RolloutSourceError) and "\n" not in str(info.value)
    with pytest.raises(EngineDiedError):
        engine.load_state_dict(model.state_dict(), version=99)


# ------------------------------------------------------------------------------------- trainer runs
TINY = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",  # head_dim 32: vLLM's CPU attention needs it
    "task.params={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}",
    "task.train_size=200",
    "sampling.group_size=4",
    "sampling.max_new_tokens=12",
    "algorithm.mini_batch_prompts=2",
    *QUIET_ON_POLICY,
    "sampling.engine=vllm",
]


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "loss/value" in r]


def test_sync_run_with_a_bf16_vllm_engine_measures_the_mismatch(tmp_path):
    from vespo.train.config import load_config
    from vespo.train.trainer import Trainer

    cfg = load_config(
        None,
        [
            *TINY,
            f"run.out_dir={tmp_path / 'run'}",
            "run.total_steps=3",
            "sampling.sampler_dtype=bfloat16",
            "algorithm.old_log_prob=recompute",
        ],
    )
    result = Trainer(cfg).train()
    assert result.steps == 3
    rows = _rows(tmp_path / "run")
    assert len(rows) == 3
    assert rows[0]["perf/engine_start_s"] > 0
    assert all(r["perf/sync_time_s"] > 0 for r in rows)
    # bf16 engine against the fp32 trainer under the same weights: a real, measured gap (this near-uniform
    # random model gives ~1e-5 per token; an fp32 engine stays at ~1e-6, see the async test)
    assert all(r["mismatch/engine_log_prob_diff_abs_mean"] > 4e-6 for r in rows)
    assert max(r["mismatch/engine_log_prob_diff_abs_max"] for r in rows) > 2e-5
    assert all(r["mismatch/log_w_abs_mean"] > 0 for r in rows)
    assert not _no_vllm_left(), "the sync run left vLLM processes behind"


def test_async_run_with_a_vllm_engine_in_the_ray_worker(tmp_path):
    """An fp32 vLLM engine inside the Ray worker, weight syncs every 2 steps with partial rollouts:
    mu equals the worker's fp32 reference under the weights that drew each token."""
    pytest.importorskip("ray")
    from vespo.rollout.ray_utils import start_ray
    from vespo.train.config import load_config
    from vespo.train.trainer import Trainer

    session = start_ray(num_cpus=2)
    try:
        cfg = load_config(
            None,
            [
                *TINY,
                f"run.out_dir={tmp_path / 'run'}",
                "run.total_steps=4",
                "run.mode=async",
                "async.sync_every=2",
                "async.partial_rollout=true",
                "algorithm.old_log_prob=sampler",
                "sampling.max_new_tokens=16",
            ],
        )
        result = Trainer(cfg).train()
    finally:
        session.stop()
    assert result.steps == 4
    rows = _rows(tmp_path / "run")
    assert len(rows) == 4
    assert all(r["mismatch/engine_log_prob_diff_abs_max"] < TOL for r in rows)
    assert all(r["mismatch/engine_log_prob_diff_abs_mean"] < 2e-6 for r in rows)
    assert any(r.get("perf/engine_start_s", 0) > 0 for r in rows)
    assert any(r.get("perf/engine_sync_time_s", 0) > 0 for r in rows)
    assert all(r["stale/bound_violations"] == 0 for r in rows)
    assert not session.alive_processes(), "Ray processes survived shutdown"
    assert not _no_vllm_left(60.0), "vLLM processes of the Ray worker survived shutdown"
