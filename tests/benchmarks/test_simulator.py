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

ROOT = Path(__file__).resolve().parents[2]


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
    assert torch.allclose(expected_reward(task.init_logits, task), torch.tensor([0.3], dtype=torch.float64), atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    pid = torch.arange(spec.prompts).repeat_interleave(20_000)
    batch = sample_batch(task.init_logits, task, gen, prompt_ids=pid)
    emp = batch.rewards[0].reshape(spec.prompts, -1).double().mean(-1)
    assert torch.allclose(emp, exact, atol=4 * math.sqrt(0.25 / 20_000))


@pytest.mark.parametrize("kind", ["table", "mlp"])
def test_exact_gradient_matches_large_sample_reinforce(kind):
    """On-policy REINFORCE with leave-one-out advantages is unbiased for the exact grad J."""
    spec = TaskSpec(length=8, keys=4, prompts=2, group_size=8, init_success=0.3)
    res = gradient_study(
        {"reinforce": ("reinforce", {})},
        spec,
        policy=PolicySpec(kind, embed=8, hidden=8),
        n_batches=1500,
        chunk=500,
        seed=1,
    )
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


# ---------------------------------------------------------------------------------------------
# Variable response lengths and vespo_adaptive in the simulator
# ---------------------------------------------------------------------------------------------


def test_variable_lengths_mask_and_exact_reward():
    spec = TaskSpec(length=24, keys=4, prompts=3, group_size=4, min_length=8, stop_rate=4.0, init_success=0.3)
    task = make_task(spec, [0], dtype=torch.float64)
    assert int(task.key_pos.max()) < spec.min_length  # the keys come before any EOS
    # the stop hazard at every position >= min_length is stop_rate / (T - min_length), in every context
    p_eos = torch.softmax(task.init_logits[0, :, spec.min_length :], -1)[..., 0]
    torch.testing.assert_close(p_eos, torch.full_like(p_eos, 4.0 / 16))
    gen = torch.Generator().manual_seed(0)
    pid = torch.arange(spec.prompts).repeat_interleave(20_000)
    batch = sample_batch(task.init_logits, task, gen, prompt_ids=pid)
    mask = batch.mask[0]
    lengths = mask.sum(-1)
    assert int(lengths.min()) >= spec.min_length + 1 and int(lengths.max()) == spec.length
    # the mask ends at the first EOS at a position >= min_length, EOS included
    tok = batch.tokens[0]
    for b in range(200):
        eos = [t for t in range(spec.min_length, spec.length) if tok[b, t] == 0]
        assert int(lengths[b]) == (eos[0] + 1 if eos else spec.length)
    # length T means no EOS before the last position: P = (1 - h)^(T - min_length - 1)
    full = float((lengths == spec.length).double().mean())
    assert full == pytest.approx((1 - 0.25) ** (spec.length - spec.min_length - 1), abs=0.002)
    # EOS does not change the reward: the exact J still matches sampling
    emp = batch.rewards[0].reshape(spec.prompts, -1).double().mean(-1)
    assert torch.allclose(emp, success_prob(task.init_logits, task)[0], atol=4 * math.sqrt(0.25 / 20_000))


def test_fixed_length_tasks_are_unchanged_by_the_variable_option():
    spec = TaskSpec(length=16, keys=4, prompts=2, group_size=4)
    a = make_task(spec, [0, 1])
    b = make_task(TaskSpec(length=16, keys=4, prompts=2, group_size=4, min_length=None, stop_rate=5.0), [0, 1])
    assert torch.equal(a.init_logits, b.init_logits) and torch.equal(a.key_pos, b.key_pos)
    batch = sample_batch(a.init_logits, a, torch.Generator().manual_seed(0))
    assert batch.mask is None


def test_variable_length_loss_is_the_mean_of_per_seed_losses():
    spec = TaskSpec(length=16, keys=4, prompts=4, group_size=4, min_length=6)
    task = make_task(spec, [0, 1, 2])
    pol = Policy(PolicySpec("mlp", embed=8, hidden=8), task)
    batch = sample_batch(pol.logits().detach(), task, torch.Generator().manual_seed(1))
    adv = compute_advantages(batch.rewards, spec.group_size)
    lp = token_log_probs(pol.logits(), batch.prompt_ids, batch.tokens).detach()
    old = lp + 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(2))
    from dataclasses import replace as dc_replace

    batch = dc_replace(batch, old_log_prob=old)
    out = loss_on_batch("vespo", lp, batch, adv)
    from vespo.losses import compute_policy_loss

    per_seed = [
        compute_policy_loss(
            "vespo", log_prob=lp[i], old_log_prob=old[i], advantages=adv[i].float(), response_mask=batch.mask[i]
        ).loss
        for i in range(3)
    ]
    torch.testing.assert_close(out.loss, sum(per_seed) / 3)


def test_vespo_adaptive_statistics_are_per_seed_in_pooled_calls():
    task, pol, batch, adv = _one_batch()
    lp = token_log_probs(pol.logits(), batch.prompt_ids, batch.tokens).detach()
    g = torch.Generator().manual_seed(4)
    # seed 0 nearly on-policy, seed 1 far off-policy: a pooled alpha would mix them
    old = lp.clone()
    old[0] = lp[0] + 0.01 * torch.randn(lp[0].shape, generator=g)
    old[1] = lp[1] + 0.5 * torch.randn(lp[1].shape, generator=g)
    from dataclasses import replace as dc_replace

    batch = dc_replace(batch, old_log_prob=old)
    pooled = loss_on_batch("vespo_adaptive", lp, batch, adv)
    from vespo.losses import compute_policy_loss

    alphas = []
    losses = []
    for i in range(2):
        out = compute_policy_loss(
            "vespo_adaptive",
            log_prob=lp[i],
            old_log_prob=old[i],
            advantages=adv[i].float(),
            response_mask=torch.ones_like(lp[i], dtype=torch.bool),
        )
        alphas.append(out.metrics["vespo_adaptive/alpha_pos"])
        losses.append(out.loss)
    assert alphas[0] == 1.0 and alphas[1] < 0.5
    # the pooled call's token-mean over equal lengths is the mean of the per-seed losses
    torch.testing.assert_close(pooled.loss, sum(losses) / 2)


def test_on_policy_vespo_adaptive_trains_exactly_like_vespo():
    spec = TaskSpec(length=16, keys=4, prompts=4, group_size=4, min_length=6)
    task = make_task(spec, [0, 1])
    kw = dict(n_stale=1, steps=5, lr=0.01, policy=PolicySpec("mlp", embed=8, hidden=8), keep_params=True)
    r1, r2 = train("vespo", task, **kw), train("vespo_adaptive", task, **kw)
    assert r1.reward == r2.reward
    assert all(torch.equal(a, b) for a, b in zip(r1.params, r2.params))


def test_adaptive_sweep_at_another_budget_writes_its_own_block(tmp_path):
    bench = _load_benchmark()
    long = bench.adaptive_long(512)
    assert long.steps == 512 and long.t_values == (128, 512) and not long.ablation_t and not long.study_t
    results = bench.adaptive_sweep(bench.adaptive_quick())  # 16 steps: not the main sweep's 256
    assert bench._suffix(results) == "_steps16"
    doc = tmp_path / "adaptive.md"
    main_block = "<!-- BEGIN GENERATED: benchmarks/simulator.py --adaptive -->\nMAIN\n<!-- END GENERATED -->"
    doc.write_text(f"# head\n\n{main_block}\n\ntail\n")
    bench.write_adaptive_doc(results, doc)
    bench.write_adaptive_doc(results, doc)  # a second write replaces the block, it does not add one
    text = doc.read_text()
    assert main_block in text and text.count("--adaptive --steps 16 -->") == 1
    block = text.split("--adaptive --steps 16 -->", 1)[1]
    assert "### Targets" in block and "sim_adaptive_final_vs_n_steps16.png" in block
    assert "simulator_adaptive_steps16.json" in block and "### Ablations" not in block
