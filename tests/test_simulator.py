"""The Tier-1 simulator: exact objective and gradient, on-policy identities, staleness bookkeeping."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.lib.simulator import (
    Mismatch,
    Policy,
    PolicySpec,
    TaskSpec,
    compute_advantages,
    expected_reward,
    gradient_study,
    loss_on_batch,
    make_task,
    sample_batch,
    sample_rollout,
    staleness_schedule,
    success_prob,
    token_log_probs,
    train,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("need", [None, 3])
def test_exact_reward_matches_sampling(need):
    """The DP / product for P(R = 1) agrees with the empirical success rate of sampled responses."""
    spec = TaskSpec(length=12, keys=5, need=need, prompts=3, group_size=4, init_success=0.3)
    task = make_task(spec, [0], dtype=torch.float64)
    exact = success_prob(task.init_logits, task)[0]  # [P]
    assert torch.allclose(expected_reward(task.init_logits, task), torch.tensor([0.3], dtype=torch.float64),
                          atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    pid = torch.arange(spec.prompts).repeat_interleave(20_000)
    batch = sample_batch(task.init_logits, task, gen, prompt_ids=pid)
    emp = batch.rewards[0].reshape(spec.prompts, -1).double().mean(-1)
    assert torch.allclose(emp, exact, atol=4 * math.sqrt(0.25 / 20_000))


@pytest.mark.parametrize("kind", ["table", "mlp"])
def test_exact_gradient_matches_large_sample_reinforce(kind):
    """On-policy REINFORCE with leave-one-out advantages is unbiased for the exact grad J."""
    spec = TaskSpec(length=8, keys=4, prompts=2, group_size=8, init_success=0.3)
    res = gradient_study({"reinforce": ("reinforce", {})}, spec, policy=PolicySpec(kind, embed=8, hidden=8),
                         n_batches=1500, chunk=500, seed=1)
    st = res.stats["reinforce"]
    assert st.cosine > 0.99
    assert st.rel_bias < 4 * st.noise_floor  # what remains is Monte-Carlo noise
    assert abs(st.scale - 1) < 4 * st.noise_floor


def _one_batch(n_stale_kind: str = "none"):
    spec = TaskSpec(length=16, keys=4, prompts=4, group_size=4)
    task = make_task(spec, [0, 1])
    pol = Policy(PolicySpec("mlp", embed=8, hidden=8), task)
    gen = torch.Generator().manual_seed(3)
    batch = sample_batch(pol.logits().detach(), task, gen, Mismatch(n_stale_kind, 0.1))
    adv = compute_advantages(batch.rewards, spec.group_size)
    return task, pol, batch, adv


def test_on_policy_vespo_is_reinforce():
    """N = 1, no mismatch: W = 1, phi = 1 exactly, and the gradient is REINFORCE's."""
    task, pol, batch, adv = _one_batch()
    grads, outs = {}, {}
    for name in ("vespo", "reinforce"):
        params = [p.clone().requires_grad_(True) for p in pol.params]
        lp = token_log_probs(pol.logits(params), batch.prompt_ids, batch.tokens)
        outs[name] = loss_on_batch(name, lp, batch, adv)
        grads[name] = torch.autograd.grad(outs[name].loss, params)
    m = outs["vespo"].metrics
    assert m["phi/min"] == 1.0 and m["phi/max"] == 1.0 and m["is/abs_log_w_mean"] == 0.0
    for a, b in zip(grads["vespo"], grads["reinforce"]):
        assert torch.equal(a, b)
    # and whole training runs coincide step for step
    kw = dict(n_stale=1, steps=6, lr=0.01, policy=PolicySpec("mlp", embed=8, hidden=8), keep_params=True)
    r1, r2 = train("vespo", task, **kw), train("reinforce", task, **kw)
    assert r1.reward == r2.reward
    assert all(torch.equal(a, b) for a, b in zip(r1.params, r2.params))


def test_mismatch_only_changes_mu():
    _, _, batch, _ = _one_batch("none")
    assert torch.equal(batch.old_log_prob, batch.sampler_log_prob)
    _, _, batch, _ = _one_batch("noise")
    diff = (batch.old_log_prob - batch.sampler_log_prob).abs().mean()
    assert 0.01 < float(diff) < 0.2


def test_staleness_bookkeeping():
    sched = list(staleness_schedule(10, 4))
    assert [k for _, k, _ in sched] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert [b for _, _, b in sched] == [0, 0, 0, 0, 4, 4, 4, 4, 8, 8]

    spec = TaskSpec(length=16, keys=4, prompts=2, group_size=4)
    task = make_task(spec, [0, 1])
    rollout = sample_rollout(task.init_logits, task, 5, torch.Generator().manual_seed(0), behaviour_step=7)
    assert [b.staleness for b in rollout] == [0, 1, 2, 3, 4]
    assert all(b.behaviour_step == 7 and b.tokens.shape == (2, 8, 16) for b in rollout)

    res = train("vespo", task, n_stale=4, steps=10, lr=0.02, policy=PolicySpec("mlp", embed=8, hidden=8))
    assert res.staleness == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert res.behaviour_step == [0, 0, 0, 0, 4, 4, 4, 4, 8, 8]
    lw = res.metrics_by_staleness["is/abs_log_w_mean"]
    assert lw[0] == 0.0  # the first mini-batch of each rollout is on-policy: W = 1
    assert all(x > 0 for x in lw[1:])  # later ones are trained by moved weights
    assert res.eval_steps[0] == 0 and res.eval_steps[-1] == 10


def _load_benchmark():
    path = ROOT / "benchmarks" / "simulator.py"
    spec = importlib.util.spec_from_file_location("bench_simulator", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def test_quick_benchmark_smoke(tmp_path):
    bench = _load_benchmark()
    cfg = bench.quick_config(losses=("vespo", "grpo"), ns=(1, 4))
    results = bench.run(cfg, parts=("tune", "main", "gradient"))
    main = [r for r in results["runs"] if r["experiment"] == "main"]
    assert {(r["loss"], r["n"]) for r in main} == {(a, b) for a in ("vespo", "grpo") for b in (1, 4)}
    # N = 1 without mismatch: the two losses are the same algorithm, seed for seed
    on = {r["loss"]: r for r in main if r["n"] == 1 and r["mismatch"] == "none"}
    assert on["vespo"]["final"] == on["grpo"]["final"]
    assert results["gradient"] and all("cosine_debiased" in row for row in results["gradient"])
    out = tmp_path / "sim.json"
    bench.save(results, out)
    assert out.stat().st_size < 200_000
