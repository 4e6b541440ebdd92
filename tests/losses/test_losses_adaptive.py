"""vespo_adaptive: reduction to vespo, the adaptation against a float64 loop reference, exact
micro-batch statistics, the bound, and finiteness for any input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vespo.losses import (
    AdaptiveStats,
    build_loss_batch,
    compute_loss_terms,
    compute_policy_loss,
    get_loss_spec,
    kernel_max,
    list_losses,
    merge_adaptive_stats,
    variance_constant,
    vespo_adaptive_batch_stats,
    vespo_adaptive_seq_inputs,
)
from vespo.losses.diagnostics import length_bucket_quantiles
from vespo.losses.vespo_adaptive import alpha_grid


def make_batch(B=12, T=10, drift=0.0, seed=0, dtype=torch.float64, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    old = lp + drift * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    if lengths is None:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(-1)
    return lp.to(dtype), old.to(dtype), adv.to(dtype), mask


def loss_and_grad(name, lp, old, adv, mask, **kw):
    x = lp.clone().requires_grad_()
    out = compute_policy_loss(name, log_prob=x, old_log_prob=old, advantages=adv, response_mask=mask, **kw)
    out.loss.backward()
    return out, x.grad


# ---------------------------------------------------------------------------------------------
# Reduces to vespo
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "token-sum-norm"])
def test_on_policy_equals_vespo_bit_for_bit(dtype, agg):
    lp, _, adv, mask = make_batch(dtype=dtype)
    ref, ref_grad = loss_and_grad("vespo", lp, lp, adv, mask, loss_agg_mode=agg)
    out, grad = loss_and_grad("vespo_adaptive", lp, lp, adv, mask, loss_agg_mode=agg)
    assert torch.equal(out.loss, ref.loss)
    assert torch.equal(grad, ref_grad)
    assert out.metrics["vespo_adaptive/alpha_pos"] == 1.0 and out.metrics["vespo_adaptive/alpha_neg"] == 1.0


@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("with_rollout", [False, True])
def test_healthy_batch_equals_vespo_bit_for_bit(per_token_adv, with_rollout):
    lp, old, adv, mask = make_batch(B=32, drift=0.03, seed=1)
    kw = {}
    if with_rollout:
        g = torch.Generator().manual_seed(5)
        kw["rollout_is_weights"] = torch.exp(0.02 * torch.randn(lp.shape, generator=g, dtype=torch.float64))
    if per_token_adv:
        adv = adv.unsqueeze(-1).expand_as(lp).clone()
    ref, ref_grad = loss_and_grad("vespo", lp, old, adv, mask, **kw)
    out, grad = loss_and_grad("vespo_adaptive", lp, old, adv, mask, **kw)
    # the batch is healthy: both ESS already above tau, so nothing is adapted
    assert out.metrics["phi/ess"] >= 0.95
    assert out.metrics["vespo_adaptive/alpha_pos"] == 1.0 and out.metrics["vespo_adaptive/alpha_neg"] == 1.0
    assert torch.equal(out.loss, ref.loss)
    assert torch.equal(grad, ref_grad)
    for key in ("phi/mean", "phi/ess", "is/log_w_mean", "is/frac_beyond_mode"):
        assert out.metrics[key] == ref.metrics[key]


def test_drifted_batch_differs_from_vespo():
    lp, old, adv, mask = make_batch(B=32, T=40, drift=0.5, seed=2, lengths=torch.full((32,), 40))
    ref, _ = loss_and_grad("vespo", lp, old, adv, mask)
    out, _ = loss_and_grad("vespo_adaptive", lp, old, adv, mask)
    assert out.metrics["vespo_adaptive/alpha_neg"] < 1.0 or out.metrics["vespo_adaptive/alpha_pos"] < 1.0
    assert out.metrics["phi/frac_below_0.01"] < ref.metrics["phi/frac_below_0.01"]
    assert out.loss.item() != pytest.approx(ref.loss.item())


# ---------------------------------------------------------------------------------------------
# The adaptation against an independent float64 loop
# ---------------------------------------------------------------------------------------------


def ref_phi(log_w: float, a: float, alpha: float) -> float:
    c1, c2 = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
    v = math.exp(alpha * log_w)
    return v**c1 * math.exp(c2 * (1.0 - v))


def ref_ess(log_ws, advs, alpha):
    phis = [ref_phi(lw, a, alpha) for lw, a in zip(log_ws, advs)]
    s1, s2 = sum(phis), sum(p * p for p in phis)
    return s1 * s1 / (len(phis) * s2) if s2 > 0 else 0.0


def ref_alpha(log_ws, advs, tau, alpha_min=0.02):
    """Continuous bisection for ESS(alpha) = tau (ESS decreases in alpha on these batches)."""
    if not log_ws or ref_ess(log_ws, advs, 1.0) >= tau:
        return 1.0
    if ref_ess(log_ws, advs, alpha_min) < tau:
        return alpha_min
    lo, hi = alpha_min, 1.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ref_ess(log_ws, advs, mid) >= tau else (lo, mid)
    return lo


def ref_remainder(log_rho: float, alpha: float, remainder: str, cap: float = 2.0) -> float:
    """The per-token factor min(rho_t^(1 - alpha), cap) ('token'), or 1 ('none')."""
    return min(math.exp((1.0 - alpha) * log_rho), cap) if remainder == "token" else 1.0


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.8, 0.9])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("per_sign", [True, False])
@pytest.mark.parametrize("remainder", ["token", "none"])
def test_alpha_solves_the_ess_target_and_loss_matches_loop(tau, seed, per_sign, remainder):
    B, T = 40, 30
    lp, old, adv, mask = make_batch(B=B, T=T, drift=0.4, seed=seed)
    out, grad = loss_and_grad("vespo_adaptive", lp, old, adv, mask, tau=tau, per_sign=per_sign, remainder=remainder)
    log_w = ((lp - old) * mask).sum(-1).tolist()
    a = adv.tolist()
    alphas = {}
    groups = (("pos", [x >= 0 for x in a]), ("neg", [x < 0 for x in a]))
    if not per_sign:  # one alpha for the whole batch: the ESS of phi over every sequence
        groups = (("pos", [True] * B), ("neg", [True] * B))
    for sign, sel in groups:
        lws = [lw for lw, s in zip(log_w, sel) if s]
        advs = [x for x, s in zip(a, sel) if s]
        want = ref_alpha(lws, advs, tau)
        got = out.metrics[f"vespo_adaptive/alpha_{sign}"]
        assert got == pytest.approx(want, rel=0.03), sign  # grid + linear interpolation
        if want < 1.0:
            assert ref_ess(lws, advs, got) == pytest.approx(tau, abs=0.02)
        alphas[sign] = got
    # loss and gradient against the loop, with the kernel's alpha (token-mean)
    n_tok = int(mask.sum())
    ref_loss = 0.0
    ref_grad = np.zeros((B, T))
    for b in range(B):
        alpha = alphas["pos" if a[b] >= 0 else "neg"]
        phi = ref_phi(log_w[b], a[b], alpha)
        for t in range(T):
            if mask[b, t]:
                w = phi * ref_remainder(float(lp[b, t] - old[b, t]), alpha, remainder)
                ref_loss += -w * a[b] * float(lp[b, t]) / n_tok
                ref_grad[b, t] = -w * a[b] / n_tok
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("per_sign", [True, False])
def test_log_w_beyond_twenty_nats_is_tempered_not_tied(per_sign):
    """|log W| of 20-80 nats (long responses, large N): the tempering sees the true log W. A clamp
    of log W at +-20 before tempering would tie every such sequence at one weight per sign."""
    B, T = 32, 64
    g = torch.Generator().manual_seed(21)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) - 0.05
    target = -(20.0 + 60.0 * torch.rand(B, generator=g, dtype=torch.float64))  # log W in [-80, -20]
    old = lp - (target / T)[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    out, grad = loss_and_grad("vespo_adaptive", lp, old, adv, mask, per_sign=per_sign)
    log_w, a = target.tolist(), adv.tolist()
    groups = (("pos", [x >= 0 for x in a]), ("neg", [x < 0 for x in a]))
    if not per_sign:
        groups = (("pos", [True] * B), ("neg", [True] * B))
    alphas = {}
    for sign, sel in groups:
        lws = [lw for lw, s in zip(log_w, sel) if s]
        advs = [x for x, s in zip(a, sel) if s]
        alphas[sign] = out.metrics[f"vespo_adaptive/alpha_{sign}"]
        assert alphas[sign] == pytest.approx(ref_alpha(lws, advs, 0.95), rel=0.03), sign
    n_tok = B * T
    sign_alpha = [alphas["pos" if x >= 0 else "neg"] for x in a]
    phis = [ref_phi(lw, x, al) for lw, x, al in zip(log_w, a, sign_alpha)]
    factor = [ref_remainder(float(lp[b, 0] - old[b, 0]), sign_alpha[b], "token") for b in range(B)]
    want = [-phis[b] * factor[b] * a[b] / n_tok for b in range(B)]
    np.testing.assert_allclose(grad[:, 0].numpy(), want, rtol=1e-6, atol=1e-15)
    # within each sign the sequence weights keep the order of log W (all are below the kernel's mode)
    phi = out_weights = [w / f for w, f in zip((grad[:, 0] / (-adv / n_tok)).tolist(), factor)]
    assert out_weights == pytest.approx(phis, rel=1e-6)
    for positive in (True, False):
        pairs = sorted((lw, w) for lw, w, x in zip(log_w, phi, a) if (x >= 0) == positive)
        assert all(w1 < w2 for (_, w1), (_, w2) in zip(pairs, pairs[1:]))
    assert out.metrics["is/log_w_min"] == pytest.approx(min(log_w), rel=1e-9)


def test_phi_of_an_on_policy_sequence_is_one_under_any_alpha():
    lp, old, adv, mask = make_batch(B=20, T=30, drift=0.6, seed=4, lengths=torch.full((20,), 30))
    old[0] = lp[0]  # this sequence has log W = 0
    adv[0] = 1.0
    batch = build_loss_batch(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask)
    out = compute_loss_terms("vespo_adaptive", batch)
    assert out.metrics["vespo_adaptive/alpha_pos"] < 1.0
    assert out.seq_weight[0].item() == 1.0
    # every token of it keeps unit weight: the per-token remainder is rho_t^(1 - alpha) = 1
    _, grad = loss_and_grad("vespo_adaptive", lp, old, adv, mask)
    torch.testing.assert_close(grad[0], torch.full((30,), -1.0 / mask.sum().item(), dtype=grad.dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_token_remainder_is_capped_and_masked(dtype):
    lp, old, adv, mask = make_batch(B=16, T=12, drift=2.0, seed=11, dtype=dtype)
    batch = build_loss_batch(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask)
    out = compute_loss_terms("vespo_adaptive", batch, remainder_cap=1.5)
    alpha = out.metrics["vespo_adaptive/alpha_pos"]
    assert alpha < 1.0
    x = lp.clone().requires_grad_()
    res = compute_policy_loss(
        "vespo_adaptive", log_prob=x, old_log_prob=old, advantages=adv, response_mask=mask, remainder_cap=1.5
    )
    res.loss.backward()
    assert torch.isfinite(x.grad.float()).all() and (x.grad[~mask] == 0).all()
    # per token: grad = -phi * min(rho^(1 - alpha), 1.5) * A / n, so the factor is grad / (-phi A / n)
    n = mask.sum().item()
    factor = x.grad.double() / (-(out.seq_weight.double() * adv.double()) / n)[:, None]
    want = torch.exp((1 - alpha) * (lp.double() - old.double())).clamp(max=1.5)
    tol = 1e-6 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(factor[mask], want[mask].to(factor.dtype), rtol=tol, atol=tol)
    assert res.metrics["vespo_adaptive/remainder_mean"] == pytest.approx(want[mask].mean().item(), rel=tol)


def test_mass_target_and_pooled_signs():
    lp, old, adv, mask = make_batch(B=40, T=40, drift=0.3, seed=6, lengths=torch.full((40,), 40))
    base, _ = loss_and_grad("vespo_adaptive", lp, old, adv, mask)
    massy, _ = loss_and_grad("vespo_adaptive", lp, old, adv, mask, mass_target=0.8)
    assert massy.metrics["phi/mean"] >= 0.8 - 0.02  # pooled mass target
    assert massy.metrics["vespo_adaptive/alpha_neg"] <= base.metrics["vespo_adaptive/alpha_neg"]
    assert base.metrics["vespo_adaptive/alpha_pos"] == pytest.approx(
        base.metrics["vespo_adaptive/alpha_neg"], rel=1e-12
    )
    split, _ = loss_and_grad("vespo_adaptive", lp, old, adv, mask, per_sign=True)
    assert split.metrics["vespo_adaptive/alpha_pos"] != split.metrics["vespo_adaptive/alpha_neg"]


@pytest.mark.parametrize("shift", [-10.0, -3.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_uniform_shift_of_one_sign_is_not_dropped(shift, dtype):
    """Every sequence at log W ~ shift with a tiny spread and one advantage sign: the weights are
    well spread (ESS ~ 1) but all small, the whole-batch down-weighting of NeMo-RL #2269. The mass
    floor tempers until the mean weight is 0.1; without it (mass_target=0) the loss is vespo's below
    the kernel's mode, and above it (W = e^2) the ESS alone tempers too little."""
    g = torch.Generator().manual_seed(11)
    B, T = 48, 64
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    lp = old + shift / T + 0.05 / math.sqrt(T) * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.rand(B, generator=g, dtype=torch.float64) + 0.1  # A > 0 everywhere
    mask = torch.ones(B, T, dtype=torch.bool)
    lp, old, adv = lp.to(dtype), old.to(dtype), adv.to(dtype)
    ref, ref_grad = loss_and_grad("vespo", lp, old, adv, mask)
    assert ref.metrics["phi/mean"] < 0.06  # vespo down-weights the whole batch
    off, off_grad = loss_and_grad("vespo_adaptive", lp, old, adv, mask, mass_target=0.0)
    assert off.metrics["phi/mean"] < 0.06  # without the floor the batch stays down-weighted:
    if shift < 0:  # below the mode the weights are healthy by the ESS alone, so nothing is adapted
        assert off.metrics["phi/ess"] >= 0.95 and torch.equal(off_grad, ref_grad)
    out, grad = loss_and_grad("vespo_adaptive", lp, old, adv, mask)
    assert out.metrics["vespo_adaptive/alpha_pos"] < 1.0
    assert out.metrics["phi/mean"] >= 0.1 - 0.01  # the floor, to the grid's interpolation
    assert out.metrics["phi/mean"] <= 0.2  # the largest alpha meeting it: tempered no further
    assert torch.isfinite(grad).all() and grad.abs().sum() > 1.5 * ref_grad.abs().sum()


def test_mass_floor_leaves_a_healthy_batch_alone():
    """A batch whose mean weight is above the floor and whose ESS is above tau is vespo's, and the
    floor is reported by ``vespo losses`` as the default."""
    assert get_loss_spec("vespo_adaptive").params["mass_target"].default == 0.1
    lp, old, adv, mask = make_batch(B=32, drift=0.03, seed=1)
    ref, ref_grad = loss_and_grad("vespo", lp, old, adv.abs(), mask)
    out, grad = loss_and_grad("vespo_adaptive", lp, old, adv.abs(), mask)
    assert out.metrics["vespo_adaptive/alpha_pos"] == 1.0 and out.metrics["phi/mean"] >= 0.1
    assert torch.equal(grad, ref_grad)


def test_kernel_ablation_keeps_c1_at_least_one():
    lp, old, adv, mask = make_batch(B=40, T=40, drift=0.5, seed=7, lengths=torch.full((40,), 40))
    batch = build_loss_batch(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask)
    out = compute_loss_terms("vespo_adaptive", batch, adapt="kernel")
    alpha = out.metrics["vespo_adaptive/alpha_neg"]
    assert alpha < 1.0
    # mode c1'/c2' stays c1/c2 (= 3/2 for A < 0)
    neg = batch.seq_advantages < 0
    torch.testing.assert_close(out.kernel_mode[neg], torch.full_like(out.kernel_mode[neg], 1.5))
    # and the weight equals phi(W; c1', c2') with c1' = max(1, alpha c1)
    c1 = max(1.0, alpha * 3.0)
    c2 = 2.0 * c1 / 3.0
    w = torch.exp(batch.seq_log_ratio[neg])
    torch.testing.assert_close(out.seq_weight[neg], w**c1 * torch.exp(c2 * (1 - w)))


def test_saturate_scale_shrinks_only_saturated_batches():
    lp, old, adv, mask = make_batch(B=40, T=40, drift=3.0, seed=8, lengths=torch.full((40,), 40))
    plain, _ = loss_and_grad("vespo_adaptive", lp, old, adv, mask, alpha_min=0.5)
    scaled, _ = loss_and_grad("vespo_adaptive", lp, old, adv, mask, alpha_min=0.5, saturate_scale=True)
    assert plain.metrics["vespo_adaptive/saturated"] > 0
    assert abs(scaled.loss.item()) < abs(plain.loss.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_saturate_scale_stays_finite_when_every_weight_is_tiny(dtype):
    # every A < 0 weight is ~e^-53 (phi^2 underflows in float32): the ESS used for the scale is
    # computed in float64, so neither the loss nor the gradient turns NaN (they did in float32)
    lp, old, adv, mask = make_batch(B=16, T=8, seed=3, lengths=torch.full((16,), 8))
    old = lp - 3.0  # log W = 24 per sequence, clamped to 20
    adv = -adv.abs()
    out, grad = loss_and_grad(
        "vespo_adaptive", lp.to(dtype), old.to(dtype), adv.to(dtype), mask, alpha_min=0.5, saturate_scale=True
    )
    assert torch.isfinite(out.loss) and torch.isfinite(grad.float()).all()
    assert out.metrics["vespo_adaptive/saturated"] == 1.0


def test_ess_diagnostics_are_scale_free_for_tiny_weights():
    # equal weights give ESS 1 however small they are: phi(e^-20) for A < 0 is ~e^-53
    lp, old, adv, mask = make_batch(B=10, T=4, seed=4, dtype=torch.float32, lengths=torch.full((10,), 4))
    out, _ = loss_and_grad("vespo_adaptive", lp, lp + 6.0, -adv.abs(), mask)
    assert out.metrics["phi/ess_neg_before"] == pytest.approx(1.0)
    assert out.metrics["phi/ess_neg_after"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Exact statistics under micro-batching
# ---------------------------------------------------------------------------------------------

SPLITS = [(0, 5), (5, 6), (6, 17), (17, 24)]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_with_merged_stats_equal_the_full_batch(agg):
    lp, old, adv, mask = make_batch(B=24, T=16, drift=0.5, seed=9)
    mask[3] = False  # an empty row
    full, full_grad = loss_and_grad("vespo_adaptive", lp, old, adv, mask, loss_agg_mode=agg)
    assert full.metrics["vespo_adaptive/alpha_neg"] < 1.0  # the adaptation is active
    n_tok, n_seq = int(mask.sum()), int(mask.any(-1).sum())
    parts = [
        vespo_adaptive_batch_stats(
            *vespo_adaptive_seq_inputs(
                log_prob=lp[lo:hi], old_log_prob=old[lo:hi], advantages=adv[lo:hi], response_mask=mask[lo:hi]
            )
        )
        for lo, hi in SPLITS
    ]
    stats = merge_adaptive_stats(parts)
    x = lp.clone().requires_grad_()
    total = 0.0
    naive_total = 0.0
    for lo, hi in SPLITS:
        kw = dict(
            log_prob=x[lo:hi],
            old_log_prob=old[lo:hi],
            advantages=adv[lo:hi],
            response_mask=mask[lo:hi],
            loss_agg_mode=agg,
            global_num_tokens=n_tok,
            global_num_seqs=n_seq,
        )
        out = compute_policy_loss("vespo_adaptive", batch_stats=stats, **kw)
        out.loss.backward()
        total += out.loss.item()
        kw["log_prob"] = lp[lo:hi]
        naive_total += compute_policy_loss("vespo_adaptive", **kw).loss.item()
    assert total == pytest.approx(full.loss.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(x.grad, full_grad, rtol=1e-12, atol=1e-15)
    # without the shared statistics each micro-batch adapts to itself and the sum differs
    assert naive_total != pytest.approx(full.loss.item(), rel=1e-6)


def test_groups_equal_separate_calls():
    lp, old, adv, mask = make_batch(B=30, T=20, drift=0.4, seed=10)
    seq = vespo_adaptive_seq_inputs(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask)
    groups = torch.arange(3).repeat_interleave(10)
    stats = vespo_adaptive_batch_stats(*seq, groups=groups, n_groups=3)
    batch = build_loss_batch(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask)
    pooled = compute_loss_terms("vespo_adaptive", batch, batch_stats=stats).seq_weight
    for i in range(3):
        sl = slice(10 * i, 10 * i + 10)
        part = build_loss_batch(log_prob=lp[sl], old_log_prob=old[sl], advantages=adv[sl], response_mask=mask[sl])
        torch.testing.assert_close(compute_loss_terms("vespo_adaptive", part).seq_weight, pooled[sl])


def test_stats_from_other_parameters_are_rejected():
    lp, old, adv, mask = make_batch()
    stats = vespo_adaptive_batch_stats(
        *vespo_adaptive_seq_inputs(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask), k_pos=3.0
    )
    with pytest.raises(ValueError, match="other vespo_adaptive parameters"):
        compute_policy_loss(
            "vespo_adaptive", log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask, batch_stats=stats
        )
    with pytest.raises(ValueError, match="AdaptiveStats"):
        compute_policy_loss(
            "vespo_adaptive",
            log_prob=lp,
            old_log_prob=old,
            advantages=adv,
            response_mask=mask,
            batch_stats=torch.zeros(3),
        )
    with pytest.raises(ValueError, match="different parameters"):
        merge_adaptive_stats([stats, vespo_adaptive_batch_stats(torch.zeros(2), torch.ones(2))])


def test_empty_statistics_mean_no_adaptation():
    stats = vespo_adaptive_batch_stats(torch.zeros(0), torch.zeros(0))
    assert isinstance(stats, AdaptiveStats) and float(stats.sums.abs().sum()) == 0.0
    lp, old, adv, mask = make_batch(B=8, T=10, drift=2.0, seed=11)
    ref, _ = loss_and_grad("vespo", lp, old, adv, mask)
    out, _ = loss_and_grad("vespo_adaptive", lp, old, adv, mask, batch_stats=stats)
    assert torch.equal(out.loss, ref.loss)  # no sequence in the statistics: alpha = 1


# ---------------------------------------------------------------------------------------------
# Theory: phi(1) = 1, the K constant and the uniform bound hold for the tempered kernel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c1, c2", [(2.0, 3.0), (3.0, 2.0), (1.0, 1.0), (1.5, 4.0)])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1, 0.02])
def test_tempered_kernel_bounds(c1, c2, alpha):
    log_w = torch.linspace(-60, 8, 200_001, dtype=torch.float64)
    v = torch.exp(alpha * log_w)
    phi = v**c1 * torch.exp(c2 * (1 - v))
    # phi(W^alpha) <= K W^alpha (Prop. 3.1's pointwise step on V = W^alpha) and sup phi unchanged
    assert torch.all(phi <= variance_constant(c1, c2) * v * (1 + 1e-12))
    assert phi.max().item() <= kernel_max(c1, c2) * (1 + 1e-12)
    assert ref_phi(0.0, 1.0 if (c1, c2) == (2.0, 3.0) else -1.0, alpha) == 1.0 or (c1, c2) not in ((2, 3), (3, 2))


def test_second_moment_bound_on_a_sample():
    # E_mu[phi_alpha^2] <= Z K E_Q[W]^alpha with Q = mu phi / Z (Jensen), checked on a lognormal W
    g = torch.Generator().manual_seed(0)
    sigma = 2.0
    log_w = sigma * torch.randn(400_000, generator=g, dtype=torch.float64) - sigma**2 / 2  # E_mu W = 1
    for alpha in (1.0, 0.5, 0.2):
        v = torch.exp(alpha * log_w)
        phi = v**2 * torch.exp(3 * (1 - v))
        z = phi.mean()
        eq_w = (phi * torch.exp(log_w)).mean() / z
        assert (phi**2).mean() <= z * variance_constant(2.0, 3.0) * eq_w**alpha


# ---------------------------------------------------------------------------------------------
# Registry, numerics, diagnostics
# ---------------------------------------------------------------------------------------------


def test_registry_lists_parameters_and_rejects_c1_below_one():
    spec = get_loss_spec("vespo_adaptive")
    defaults = list_losses()["vespo_adaptive"]
    assert (
        defaults["k_pos"] == 2.0
        and defaults["lambda_neg"] == 2.0
        and defaults["tau"] == 0.95
        and defaults["per_sign"] is False
    )
    assert defaults["batch_stats"] is None
    assert spec.level == "sequence"
    with pytest.raises(ValueError, match="Prop. 3.1"):
        spec.resolve({"k_neg": 0.9})
    with pytest.raises(ValueError):
        spec.resolve({"tau": 1.0})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_extreme_inputs_stay_finite(dtype):
    B, T = 6, 4096
    lp = -torch.rand(B, T) * 3
    log_ratio = torch.zeros(B, T)
    log_ratio[0] = 1e4
    log_ratio[1] = -1e4
    log_ratio[2] = torch.tensor([1e4, -1e4]).repeat(T // 2)
    log_ratio[3] = 1e-3
    log_ratio[4] = (torch.rand(T) * 2 - 1) * 1e4
    old = lp - log_ratio
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0])
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[5] = False  # an all-masked row
    lp_bad = lp.clone()
    lp_bad[0, :10][~mask[0, :10]] = float("nan")
    for kw in ({}, {"rollout_is_weights": torch.exp(torch.randn(B, T) * 30).clamp(max=1e30)}):
        x = lp.to(dtype).requires_grad_()
        out = compute_policy_loss(
            "vespo_adaptive", log_prob=x, old_log_prob=old.to(dtype), advantages=adv.to(dtype), response_mask=mask, **kw
        )
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert torch.isfinite(x.grad.float()).all()
        assert torch.all(x.grad[~mask] == 0)
        assert all(math.isfinite(v) for v in out.metrics.values())


def test_nan_under_the_mask_changes_nothing():
    lp, old, adv, mask = make_batch(B=10, T=12, drift=0.5, seed=12)
    clean, clean_grad = loss_and_grad("vespo_adaptive", lp, old, adv, mask)
    lp2, old2 = lp.clone(), old.clone()
    lp2[~mask] = float("nan")
    old2[~mask] = float("inf")
    dirty, dirty_grad = loss_and_grad("vespo_adaptive", lp2, old2, adv, mask)
    assert dirty.loss.item() == pytest.approx(clean.loss.item(), rel=1e-12)
    torch.testing.assert_close(dirty_grad.nan_to_num(0.0), clean_grad)


def test_length_bucket_quantiles_match_numpy():
    g = torch.Generator().manual_seed(0)
    log_w = torch.randn(23, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 50, (23,), generator=g).double()
    valid = torch.ones(23, dtype=torch.bool)
    valid[4] = False
    out = length_bucket_quantiles(log_w, lengths, valid)
    lw, ln = log_w[valid].numpy(), lengths[valid].numpy()
    order = np.argsort(ln, kind="stable")
    for j, idx in enumerate(np.array_split(order, 4), start=1):
        assert out[f"is/log_w_len{j}_p50"] == pytest.approx(np.quantile(lw[idx], 0.5))
        assert out[f"is/log_w_len{j}_p90"] == pytest.approx(np.quantile(lw[idx], 0.9))
        assert out[f"is/len{j}_mean"] == pytest.approx(ln[idx].mean())
    few = length_bucket_quantiles(log_w[:2], lengths[:2], valid[:2])
    assert len(few) == len(out) and all(math.isfinite(v) for v in few.values())
    assert all(v == 0.0 for v in length_bucket_quantiles(log_w[:0], lengths[:0], valid[:0]).values())


def test_grid_starts_at_one_and_ends_at_alpha_min():
    a = alpha_grid(0.02, 64)
    assert a[0].item() == 1.0 and a[-1].item() == pytest.approx(0.02)
    assert torch.all(a[1:] < a[:-1])
