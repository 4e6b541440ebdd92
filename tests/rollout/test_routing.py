"""MoE routing replay (R2/R3): record, replay, gradients, the mismatch it removes, end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_run import TINY_RUN

from vespo.rollout.log_probs import sequence_log_probs
from vespo.rollout.routing import (
    RoutingReplayError,
    TrainerRouting,
    find_routers,
    record_routing,
    replay_routing,
    unknown_index,
)
from vespo.rollout.sampler import Sampler
from vespo.train.config import ConfigError, load_config
from vespo.train.models import build_char_tokenizer, build_tiny_model
from vespo.train.trainer import Trainer, train

torch.set_num_threads(1)
TOK = build_char_tokenizer()
PROMPTS = ["3+4=", "12+7+1=", "5+5=", "9+18=", "2+2+2=", "41+3=", "7+0=", "66+6="]


def moe(arch: str, **kw):
    args = dict(
        vocab_size=len(TOK),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        init_std=0.2,
        seed=0,
        num_experts=4,
        num_experts_per_tok=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    args.update(kw)
    return build_tiny_model(arch, **args)


def sample(model, *, dtype=torch.bfloat16, max_new_tokens=16, seed=0):
    sampler = Sampler(model, dtype=dtype)
    sampler.record_routing = True
    prompts = [TOK.encode(p) for p in PROMPTS]
    rollout = sampler.generate(
        prompts,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        generator=torch.Generator().manual_seed(seed),
    )
    return sampler, rollout


def experts_used(model):
    """Forward pre-hooks on the expert modules: the expert indices they are actually given."""
    used, handles = [], []
    for mod in model.modules():
        if type(mod).__name__.endswith("Experts"):
            handles.append(mod.register_forward_pre_hook(lambda m, args: used.append(args[1].detach().clone())))
    return used, handles


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_trainer_uses_the_recorded_routing_token_for_token(arch):
    """R3: the bf16 sampler's routing (prefill + decode steps) replayed in the fp32 trainer's forward."""
    model = moe(arch)
    _, rollout = sample(model)
    batch = rollout.to_batch(0)
    b, s = batch.input_ids.shape
    assert batch.routed_experts.shape == (b, s, 2, 2) and batch.routed_experts.dtype == torch.uint8
    known = batch.routed_experts[..., 0] != unknown_index(torch.uint8)  # [b, s, L]
    real = batch.attention_mask.bool()
    # every real position but the last response token (never fed forward) was recorded, padding never
    assert known[..., 0].sum() == real.sum() - b and not known[~real].any()

    with record_routing(model) as rec:  # the trainer's own routing: some flips against the bf16 sampler
        sequence_log_probs(model, batch.input_ids, batch.attention_mask, batch.response_length)
    natural = rec.take_all().reshape(b, s, 2, 2)
    flips = (natural.sort(-1).values != batch.routed_experts.sort(-1).values).any(-1)[known]
    assert flips.any(), "no routing flips between bf16 and fp32: the test model is too easy"

    used, handles = experts_used(model)
    with replay_routing(model, batch.routed_experts) as stats:
        sequence_log_probs(model, batch.input_ids, batch.attention_mask, batch.response_length)
    for h in handles:
        h.remove()
    assert len(used) == 2
    for layer, idx in enumerate(used):
        idx = idx.reshape(b, s, 2)
        ok = known[..., layer]
        assert torch.equal(idx[ok].sort(-1).values, batch.routed_experts[..., layer, :][ok].long().sort(-1).values)
        assert torch.equal(idx[~ok], natural[..., layer, :][~ok].long())  # unknown: the router's own choice
    assert stats.natural_flips == float(flips.sum()) and stats.used_flips == 0


def test_r3_removes_the_routing_part_of_the_engine_mismatch():
    """Routing flips go to 0 and the per-token |log pi_ref - log mu| shrinks under replay."""
    model = moe("qwen3_moe", init_std=0.3, num_layers=3)
    _, rollout = sample(model, max_new_tokens=24)
    batch = rollout.to_batch(0)
    mask = batch.response_mask
    plain = sequence_log_probs(model, batch.input_ids, batch.attention_mask, batch.response_length)
    with replay_routing(model, batch.routed_experts) as stats:
        replayed = sequence_log_probs(model, batch.input_ids, batch.attention_mask, batch.response_length)
    assert stats.natural_flips > 0 and stats.used_flips == 0
    before = (plain - batch.rollout_log_prob).abs()[mask]
    after = (replayed - batch.rollout_log_prob).abs()[mask]
    seq_before = ((plain - batch.rollout_log_prob) * mask).sum(-1).abs().mean()
    seq_after = ((replayed - batch.rollout_log_prob) * mask).sum(-1).abs().mean()
    assert after.mean() < before.mean() and seq_after < seq_before
    assert after.max() < before.max()  # the large per-token gaps were the flipped routings


def test_replaying_the_own_routing_changes_nothing():
    """Same weights, same precision: replay reproduces log-probs and gradients exactly."""
    model = moe("qwen3_moe")
    _, rollout = sample(model, dtype=torch.float32)
    batch = rollout.to_batch(0)

    def grads(replay):
        model.zero_grad()
        ctx = replay_routing(model, batch.routed_experts) if replay else record_routing(model)
        with ctx:
            lp = sequence_log_probs(model, batch.input_ids, batch.attention_mask, batch.response_length, grad=True)
        (lp * batch.response_mask).sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lp0, g0 = grads(False)
    lp1, g1 = grads(True)
    assert torch.allclose(lp0, lp1, atol=1e-6)
    assert g0.keys() == g1.keys() and any(".gate." in n for n in g0)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5), name


@pytest.mark.parametrize("norm", [True, False])
def test_gradients_flow_through_the_router_as_documented(norm):
    """Replayed weights w_j = softmax(l)[e_j] (/ sum over the replayed experts when renormalised):
    renormalised, only the replayed experts' logits get a gradient; otherwise all E do."""
    model = moe("qwen3_moe", num_layers=1)
    gate = find_routers(model)[0].module
    gate.norm_topk_prob = norm
    h = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    replay = torch.tensor([[0, 1], [2, 3], [3, 0], [1, 2], [0, 3]], dtype=torch.uint8)
    with replay_routing(model, replay[None, :, None, :]):  # [b=1, S=5, L=1, k=2]
        logits, weights, idx = gate(h)
    assert torch.equal(idx, replay.long())
    p = torch.softmax(logits.detach(), -1).gather(-1, replay.long())
    expected = p / p.sum(-1, keepdim=True) if norm else p
    assert torch.allclose(weights, expected, atol=1e-6)
    logits.retain_grad()
    c = torch.tensor([1.0, -2.0])
    (weights * c).sum().backward()
    grad = logits.grad
    on = torch.zeros_like(grad, dtype=torch.bool).scatter_(-1, replay.long(), True)
    assert grad[on].abs().min() > 0
    if norm:
        assert grad[~on].abs().max() <= 1e-5 * grad[on].abs().max()  # zero up to float rounding
    else:
        assert grad[~on].abs().min() > 0
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_partial_rollout_keeps_routing_aligned():
    """Interrupted and resumed generation: routing still covers prompt + response position by position."""
    model = moe("mixtral")
    sampler = Sampler(model, dtype=torch.bfloat16)
    sampler.record_routing = True
    prompts = [TOK.encode(p) for p in PROMPTS[:3]]
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 4

    kw = dict(max_new_tokens=10, eos_token_id=None, pad_token_id=0, generator=torch.Generator().manual_seed(0))
    part = sampler.generate(prompts, stop_flag=stop, **kw)
    assert all(0 < len(r) < 10 for r in part.response_ids)
    full = sampler.generate(prompts, resume=part, **kw)
    for p, r, e in zip(prompts, full.response_ids, full.routed_experts):
        assert len(r) == 10 and e.shape == (len(p) + 10, 2, 2)
        assert (e[:-1] != 255).all() and (e[-1] == 255).all()


def test_unsupported_models_and_configs_are_one_clear_error(tmp_path):
    dense = build_tiny_model("llama", vocab_size=len(TOK), hidden_size=32, num_layers=1, num_heads=2)
    with pytest.raises(RoutingReplayError, match="needs a mixture-of-experts model"):
        TrainerRouting("r3", dense)
    base = [f"run.out_dir={tmp_path}"]
    cases = {
        ("algorithm.routing_replay=r3",): "needs a mixture-of-experts policy",
        (
            "algorithm.routing_replay=r2",
            "model.arch=qwen3_moe",
            "algorithm.old_log_prob=sampler",
        ): "old_log_prob=recompute",
        ("algorithm.routing_replay=r3", "model.arch=mixtral", "sampling.engine=vllm"): "only sampling.engine=hf",
        ("algorithm.routing_replay=r4",): "routing_replay",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message) as err:
            load_config(None, [*base, *overrides])
        assert "\n" not in str(err.value)
    load_config(None, [*base, "algorithm.routing_replay=r3", "model.arch=qwen3_moe", "algorithm.old_log_prob=sampler"])


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------

RUN = [
    *TINY_RUN,
    "logging.progress=false",
    "warmup.steps=0",
    "run.threads=1",
    "model.arch=qwen3_moe",
    "model.hidden_size=64",
    "model.num_heads=4",
    "sampling.sampler_dtype=bfloat16",
    "sampling.max_new_tokens=12",
    "eval.at_start=false",
]


def rows_of(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "loss/value" in r]


@pytest.mark.parametrize("mode", ["r2", "r3"])
def test_sync_runs_replay(tmp_path, mode):
    cfg = load_config(
        None,
        [
            *RUN,
            f"run.out_dir={tmp_path / mode}",
            f"algorithm.routing_replay={mode}",
            "algorithm.staleness=2",
            "run.total_steps=4",
        ],
    )
    train(cfg)
    rows = rows_of(tmp_path / mode)
    assert len(rows) == 4
    for r in rows:
        assert r["routing/stored_bytes"] > 0 and r["routing/bytes_per_token"] == 2 * 2
        assert r["routing/replayed_flip_frac"] == 0.0
        assert 0.0 <= r["routing/flip_frac"] <= 1.0
    if mode == "r3":  # pi_old replays the sampler's routing too: its flips are the engine's
        assert all(r["routing/old_replayed_flip_frac"] == 0.0 for r in rows if "routing/old_flip_frac" in r)
        assert any("routing/old_flip_frac" in r for r in rows)
    else:  # mini-batch 0 is trained with pi_old's weights: R2 replays the trainer's own routing
        assert rows[0]["routing/flip_frac"] == 0.0


def test_async_runs_replay(tmp_path):
    """Ray workers record the sampler's routing (R3), it travels with the rollout and is replayed;
    then R2 in the same Ray session."""
    from vespo.rollout.ray_utils import start_ray

    session = start_ray(num_cpus=2)
    try:
        for mode in ("r3", "r2"):
            cfg = load_config(
                None,
                [
                    *RUN,
                    f"run.out_dir={tmp_path / mode}",
                    "run.mode=async",
                    "run.total_steps=3",
                    "async.sync_every=1",
                    f"algorithm.routing_replay={mode}",
                    "algorithm.staleness=1",
                ],
            )
            trainer = Trainer(cfg)
            trainer.train()
            rows = rows_of(tmp_path / mode)
            assert len(rows) == 3
            assert all(r["routing/replayed_flip_frac"] == 0.0 and r["routing/stored_bytes"] > 0 for r in rows)
            if mode == "r3":
                assert all("routing/old_flip_frac" in r for r in rows)
    finally:
        session.stop()
