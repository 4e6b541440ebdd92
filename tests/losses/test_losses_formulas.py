"""Every registered loss against values computed by hand.

The reference numbers here come from plain numpy written out in the test (the formulas of
docs/losses.md), never from the library's own helpers. The batch is small (B = 3, T = 4) with
padding and advantages of both signs, and the token ratios are chosen so that each clipping branch
(inside the trust region, clipped above, clipped below, dual clip) is hit at least once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vespo.losses import compute_policy_loss, list_losses

# ---------------------------------------------------------------------------------------------
# The shared toy batch
# ---------------------------------------------------------------------------------------------

MASK = np.array(
    [
        [1, 1, 1, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
    ],
    dtype=bool,
)
LOG_PROB = np.array(
    [
        [-0.5, -1.2, -0.3, -7.0],
        [-2.0, -0.1, -3.0, -4.0],
        [-0.7, -0.4, -1.1, -0.9],
    ]
)
# token ratios rho = pi_theta / pi_old, chosen per branch (padding entries are irrelevant)
RHO = np.array(
    [
        [1.1, 1.5, 0.5, 9.0],  # A > 0: inside, above 1 + eps_high, below 1 - eps_low
        [0.6, 12.0, 0.1, 3.0],  # A < 0: below 1 - eps_low (clipped), above clip_c = 10 (dual clip)
        [0.9, 1.2, 1.3, 1.0],  # A > 0: inside, inside, above, inside
    ]
)
OLD_LOG_PROB = LOG_PROB - np.log(RHO)
ADV = np.array([1.5, -0.8, 0.6])
N_TOK = MASK.sum()


def tensors(dtype=torch.float64):
    lp = torch.tensor(LOG_PROB, dtype=dtype, requires_grad=True)
    old = torch.tensor(OLD_LOG_PROB, dtype=dtype)
    adv = torch.tensor(ADV, dtype=dtype)
    mask = torch.tensor(MASK)
    return lp, old, adv, mask


def run(name, agg="token-mean", dtype=torch.float64, **kw):
    lp, old, adv, mask = tensors(dtype)
    out = compute_policy_loss(
        name, log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask, loss_agg_mode=agg, **kw
    )
    out.loss.backward()
    return out, lp.grad.numpy().copy()


def seq_log_w():
    return np.array([np.log(RHO[b][MASK[b]]).sum() for b in range(3)])


def token_mean(loss_mat):
    return (loss_mat * MASK).sum() / N_TOK


def check(out, grad, hand_loss, hand_grad, tol=1e-10):
    assert out.loss.item() == pytest.approx(hand_loss, abs=tol, rel=tol)
    np.testing.assert_allclose(grad, hand_grad * MASK, atol=tol, rtol=tol)
    assert np.all(grad[~MASK] == 0.0)


def test_toy_batch_covers_every_registered_loss():
    assert set(list_losses()) == {
        "vespo",
        "vespo_adaptive",
        "grpo",
        "gspo",
        "gmpo",
        "sapo",
        "cispo",
        "reinforce",
        "seq_clip",
        "topr",
    }


# ---------------------------------------------------------------------------------------------
# VESPO
# ---------------------------------------------------------------------------------------------


def hand_phi(w, a):
    c1, c2 = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
    return w**c1 * math.exp(c2 * (1.0 - w))


def test_vespo_by_hand():
    w = np.exp(seq_log_w())
    phi = np.array([hand_phi(w[b], ADV[b]) for b in range(3)])
    loss_mat = -phi[:, None] * ADV[:, None] * LOG_PROB
    out, grad = run("vespo")
    # gradient: -phi * A / (number of valid tokens) on every valid token (Eq. 20 under token-mean)
    check(out, grad, token_mean(loss_mat), -phi[:, None] * ADV[:, None] / N_TOK)
    assert out.metrics["phi/mean"] == pytest.approx(phi.mean(), rel=1e-10)
    assert out.metrics["phi/max"] == pytest.approx(phi.max(), rel=1e-10)


def test_vespo_zero_advantage_takes_positive_branch():
    # A = 0 contributes no gradient, but its phi (reported in diagnostics) uses (c1, c2) = (2, 3)
    lp = torch.tensor([[-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.2, -1.5]], dtype=torch.float64)  # log W = 0.7
    out = compute_policy_loss(
        "vespo",
        log_prob=lp,
        old_log_prob=old,
        advantages=torch.zeros(1, dtype=torch.float64),
        response_mask=torch.ones(1, 2, dtype=torch.bool),
    )
    w = math.exp(0.7)
    assert out.metrics["phi/mean"] == pytest.approx(w**2 * math.exp(3 * (1 - w)), rel=1e-10)
    assert out.metrics["phi/mean"] != pytest.approx(w**3 * math.exp(2 * (1 - w)), rel=1e-3)


def test_vespo_custom_parameters_and_length_norm():
    lw = seq_log_w()
    lengths = MASK.sum(1)
    for length_norm, scale in (("none", np.ones(3)), ("sqrt", np.sqrt(lengths)), ("linear", lengths)):
        x = lw / scale
        w = np.exp(x)
        c1 = np.where(ADV >= 0, 1.5, 4.0)
        c2 = np.where(ADV >= 0, 0.5, 2.5)
        phi = w**c1 * np.exp(c2 * (1 - w))
        out, grad = run("vespo", k_pos=1.5, lambda_pos=0.5, k_neg=4.0, lambda_neg=2.5, length_norm=length_norm)
        check(out, grad, token_mean(-phi[:, None] * ADV[:, None] * LOG_PROB), -phi[:, None] * ADV[:, None] / N_TOK)


# ---------------------------------------------------------------------------------------------
# Token-level clipped / gated losses
# ---------------------------------------------------------------------------------------------


def test_grpo_by_hand():
    eps_low, eps_high, clip_c = 0.2, 0.28, 10.0
    loss = np.zeros_like(RHO)
    coef = np.zeros_like(RHO)  # d loss_t / d log pi_t
    for b in range(3):
        a = ADV[b]
        for t in range(4):
            r = RHO[b, t]
            clipped_r = min(max(r, 1 - eps_low), 1 + eps_high)
            value = max(-a * r, -a * clipped_r)
            grad_flows = -a * r >= -a * clipped_r  # the unclipped term is the max
            if a < 0 and value > -a * clip_c:
                value, grad_flows = -a * clip_c, False
            loss[b, t] = value
            coef[b, t] = -a * r if grad_flows else 0.0
    out, grad = run("grpo")
    check(out, grad, token_mean(loss), coef / N_TOK)
    # branch coverage of the toy batch: what is clipped is exactly what we designed
    expected_zero = np.array([[0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=bool) & MASK
    assert np.array_equal(grad == 0, expected_zero | ~MASK)
    # 3 of 9 valid tokens are PPO-clipped (the dual-clipped token is counted separately)
    assert out.metrics["loss/clip_frac"] == pytest.approx(3 / 9)
    assert out.metrics["loss/clip_frac_lower"] == pytest.approx(1 / 9)


def test_grpo_inside_trust_region_gradient_is_rho_times_advantage():
    # every ratio inside [1 - eps_low, 1 + eps_high] -> grad = -rho * A / N everywhere
    lp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    rho = np.array([0.85, 1.0, 1.25])
    old = lp.detach() - torch.tensor(np.log(rho))
    for a in (2.0, -2.0):
        lp.grad = None
        out = compute_policy_loss(
            "grpo",
            log_prob=lp,
            old_log_prob=old,
            advantages=torch.tensor([a], dtype=torch.float64),
            response_mask=torch.ones(1, 3, dtype=torch.bool),
        )
        out.loss.backward()
        np.testing.assert_allclose(lp.grad.numpy()[0], -rho * a / 3, rtol=1e-12)
        assert out.loss.item() == pytest.approx(-(a * rho).sum() / 3, rel=1e-12)


def test_sapo_by_hand():
    tau = np.where(ADV > 0, 1.0, 1.05)[:, None]
    s = 1.0 / (1.0 + np.exp(-tau * (RHO - 1.0)))
    loss = -s * 4.0 / tau * ADV[:, None]
    # d/dlog pi of -(4/tau) sigmoid(tau (rho - 1)) A = -A * 4 rho s (1 - s)
    coef = -ADV[:, None] * 4.0 * RHO * s * (1 - s)
    out, grad = run("sapo")
    check(out, grad, token_mean(loss), coef / N_TOK)


def test_sapo_weight_is_one_on_policy():
    # phi_SAPO(1) = 4 * 1 * 0.5 * 0.5 = 1 for either temperature
    lp = torch.full((2, 3), -1.0, dtype=torch.float64, requires_grad=True)
    out = compute_policy_loss(
        "sapo",
        log_prob=lp,
        old_log_prob=lp.detach(),
        advantages=torch.tensor([1.0, -1.0], dtype=torch.float64),
        response_mask=torch.ones(2, 3, dtype=torch.bool),
    )
    out.loss.backward()
    np.testing.assert_allclose(lp.grad.numpy(), np.array([[-1.0] * 3, [1.0] * 3]) / 6, rtol=1e-12)


def test_cispo_by_hand():
    w = np.clip(RHO, 0.0, 5.0)  # defaults: eps_low = 1 (no lower bound), eps_high = 4
    out, grad = run("cispo")
    check(out, grad, token_mean(-w * ADV[:, None] * LOG_PROB), -w * ADV[:, None] / N_TOK)
    # with explicit bounds the weight is clip(rho, 0.8, 1.28) and is never zeroed
    w = np.clip(RHO, 0.8, 1.28)
    out, grad = run("cispo", eps_low=0.2, eps_high=0.28)
    check(out, grad, token_mean(-w * ADV[:, None] * LOG_PROB), -w * ADV[:, None] / N_TOK)
    assert np.all(grad[MASK] != 0)


# ---------------------------------------------------------------------------------------------
# Sequence-level losses
# ---------------------------------------------------------------------------------------------


def test_gspo_by_hand():
    def hand(eps_low, eps_high):
        n = MASK.sum(1)
        s = np.exp(seq_log_w() / n)[:, None] * np.ones((1, 4))  # geometric-mean ratio per sequence
        a = ADV[:, None]
        clipped_s = np.clip(s, 1 - eps_low, 1 + eps_high)
        loss = np.maximum(-a * s, -a * clipped_s)
        coef = np.where(-a * s >= -a * clipped_s, -a * s, 0.0)  # grad of -A s_t wrt log pi_t is -A s
        return loss, coef

    loss, coef = hand(3e-4, 4e-4)
    out, grad = run("gspo")
    check(out, grad, token_mean(loss), coef / N_TOK)
    assert np.any(coef[MASK] == 0) and np.any(coef[MASK] != 0)  # both branches are exercised
    loss, coef = hand(0.9, 0.9)  # wide bounds: nothing clipped
    out, grad = run("gspo", eps_low=0.9, eps_high=0.9)
    check(out, grad, token_mean(loss), coef / N_TOK)
    assert np.all(coef[MASK] != 0)


def test_gmpo_by_hand():
    lr = np.log(RHO)
    loss_mat = np.zeros_like(lr)
    coef = np.zeros_like(lr)
    for b in range(3):
        a, valid = ADV[b], MASK[b]
        c = np.clip(lr[b], -0.4, 0.4)
        clipped_lr = np.minimum(lr[b], c) if a > 0 else np.maximum(lr[b], c)  # pessimistic side only
        active = clipped_lr == lr[b]
        ratio = math.exp(clipped_lr[valid].mean())
        loss_mat[b, :] = -a * ratio
        coef[b] = -a * ratio * active  # d/dlog pi_t of n_b * (-A ratio) / N = -A ratio / N
    out, grad = run("gmpo")
    check(out, grad, token_mean(loss_mat), coef / N_TOK)
    # GMPO's own normalisation is seq-mean-token-mean: mean over sequences of -A * ratio
    out, grad = run("gmpo", agg="seq-mean-token-mean")
    n = MASK.sum(1)[:, None]
    check(out, grad, loss_mat[:, 0].mean(), coef / n / 3)


def test_reinforce_by_hand():
    out, grad = run("reinforce")
    check(out, grad, token_mean(-ADV[:, None] * LOG_PROB), -ADV[:, None] * np.ones((1, 4)) / N_TOK)


def test_seq_clip_by_hand():
    w = np.minimum(np.exp(seq_log_w()), 2.0)[:, None]
    out, grad = run("seq_clip")
    check(out, grad, token_mean(-w * ADV[:, None] * LOG_PROB), -w * ADV[:, None] / N_TOK)
    w = np.minimum(np.exp(seq_log_w()), 0.05)[:, None]
    out, grad = run("seq_clip", clip=0.05)
    check(out, grad, token_mean(-w * ADV[:, None] * LOG_PROB), -w * ADV[:, None] / N_TOK)


def test_topr_by_hand():
    W = np.exp(seq_log_w())
    assert W[1] == pytest.approx(7.2)  # the negative sequence: 0.6 * 12
    for clip in (1.0, 10.0):  # W above the clip (weight c), then below it (weight W)
        w = np.where(ADV >= 0, 1.0, np.minimum(W, clip))[:, None]
        out, grad = run("topr", clip=clip)
        check(out, grad, token_mean(-w * ADV[:, None] * LOG_PROB), -w * ADV[:, None] / N_TOK)
    assert w[1, 0] == pytest.approx(7.2)
    assert out.metrics["loss/clip_frac"] == 0.0
    out, _ = run("topr")
    assert out.metrics["loss/clip_frac"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# Aggregation modes (on the simplest loss, so that only the reduction is under test)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "agg",
    [
        "token-mean",
        "token-sum",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "token-sum-norm",
        "seq-mean-token-sum-norm",
    ],
)
def test_aggregation_modes_by_hand(agg):
    lm = -ADV[:, None] * LOG_PROB * MASK
    n = MASK.sum(1)
    hand = {
        "token-mean": lm.sum() / N_TOK,
        "token-sum": lm.sum(),
        "seq-mean-token-mean": (lm.sum(1) / n).mean(),
        "seq-mean-token-sum": lm.sum(1).mean(),
        "token-sum-norm": lm.sum() / (3 * 4),
        "seq-mean-token-sum-norm": lm.sum() / (3 * 4),
    }[agg]
    hand_grad = {
        "token-mean": -ADV[:, None] / N_TOK * np.ones((1, 4)),
        "token-sum": -ADV[:, None] * np.ones((1, 4)),
        "seq-mean-token-mean": -ADV[:, None] / n[:, None] / 3 * np.ones((1, 4)),
        "seq-mean-token-sum": -ADV[:, None] / 3 * np.ones((1, 4)),
        "token-sum-norm": -ADV[:, None] / 12 * np.ones((1, 4)),
        "seq-mean-token-sum-norm": -ADV[:, None] / 12 * np.ones((1, 4)),
    }[agg]
    out, grad = run("reinforce", agg=agg)
    check(out, grad, hand, hand_grad)


def test_token_sum_norm_uses_given_length():
    lm = -ADV[:, None] * LOG_PROB * MASK
    out, _ = run("reinforce", agg="token-sum-norm", norm_length=100)
    assert out.loss.item() == pytest.approx(lm.sum() / (3 * 100), rel=1e-12)


def test_float32_matches_float64_hand_values():
    w = np.exp(seq_log_w())
    phi = np.array([hand_phi(w[b], ADV[b]) for b in range(3)])
    out, grad = run("vespo", dtype=torch.float32)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(token_mean(-phi[:, None] * ADV[:, None] * LOG_PROB), rel=1e-6)
    np.testing.assert_allclose(grad, -phi[:, None] * ADV[:, None] / N_TOK * MASK, rtol=1e-6, atol=1e-8)
