"""Rollout corrections (TIS / MIS / IcePop), VESPO's two ways of using them, and the diagnostics.

All reference values are computed by hand in numpy from the ratios written below.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vespo.losses import compute_policy_loss, rollout_correction

# ---------------------------------------------------------------------------------------------
# Mismatch batch: r_t = pi_old / mu per token, staleness ratio rho_t = pi_theta / pi_old per token
# ---------------------------------------------------------------------------------------------

MASK = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)
R = np.array([[1.5, 3.0, 0.4], [0.2, 1.0, 50.0]])  # the 50 sits on padding and must be ignored
RHO = np.array([[1.1, 0.9, 1.2], [0.8, 1.05, 7.0]])
LOG_PROB = np.array([[-0.3, -1.0, -2.0], [-0.5, -0.25, -9.0]])
OLD = LOG_PROB - np.log(RHO)
MU = OLD - np.log(R)
ADV = np.array([1.0, -2.0])
N_TOK = MASK.sum()


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float64, **kw)


def run(name, **kw):
    lp = t(LOG_PROB, requires_grad=True)
    out = compute_policy_loss(
        name, log_prob=lp, old_log_prob=t(OLD), advantages=t(ADV), response_mask=torch.tensor(MASK), **kw
    )
    out.loss.backward()
    return out, lp.grad.numpy()


def seq_sum(x, mask=MASK):
    return np.where(mask, x, 0.0).sum(1)


@pytest.mark.parametrize(
    "mode, kw, weights, new_mask",
    [
        ("token_tis", {}, np.minimum(R, 2.0), MASK),
        ("seq_tis", {}, np.minimum([1.5 * 3.0 * 0.4, 0.2 * 1.0], 2.0)[:, None] * np.ones((1, 3)), MASK),
        ("seq_tis", {"high": 1.0}, np.array([[1.0] * 3, [0.2] * 3]), MASK),
        ("token_mis", {}, np.where(R <= 2.0, R, 0.0), MASK & (R <= 2.0)),
        ("token_mis", {"low": 0.3}, np.where((R <= 2.0) & (R >= 0.3), R, 0.0), MASK & (R <= 2.0) & (R >= 0.3)),
        ("seq_mis", {"high": 1.5}, np.array([[0.0] * 3, [0.2] * 3]), MASK & np.array([[False], [True]])),
        ("icepop", {}, np.where((R >= 0.5) & (R <= 5.0), R, 0.0), MASK),
    ],
)
def test_rollout_correction_weights_and_masks_by_hand(mode, kw, weights, new_mask):
    corr = rollout_correction(t(OLD), t(MU), torch.tensor(MASK), mode, **kw)
    w = corr.weights.numpy()
    if w.ndim == 1:
        w = w[:, None] * np.ones((1, 3))
    np.testing.assert_allclose(w[MASK], weights[MASK], rtol=1e-6)
    assert np.array_equal(corr.mask.numpy(), new_mask)

    # through the loss: REINFORCE's per-token loss is multiplied by the weight, over the new mask
    out, grad = run(
        "reinforce",
        correction=mode,
        rollout_log_prob=t(MU),
        correction_high=kw.get("high"),
        correction_low=kw.get("low"),
    )
    n = new_mask.sum()
    hand_loss = (np.where(new_mask, -weights * ADV[:, None] * LOG_PROB, 0.0)).sum() / n
    assert out.loss.item() == pytest.approx(hand_loss, rel=1e-6)
    np.testing.assert_allclose(grad, np.where(new_mask, -weights * ADV[:, None] / n, 0.0), rtol=1e-6, atol=1e-12)


def test_rollout_correction_metrics_by_hand():
    corr = rollout_correction(t(OLD), t(MU), torch.tensor(MASK), "token_tis")
    r = R[MASK]
    assert corr.metrics["mismatch/k3_kl"] == pytest.approx(np.mean(r - 1 - np.log(r)), rel=1e-6)
    assert corr.metrics["mismatch/log_prob_diff_abs_max"] == pytest.approx(np.log(5.0), rel=1e-6)  # r = 0.2
    assert corr.metrics["mismatch/frac_truncated"] == pytest.approx(1 / 5)
    seq_r = np.array([1.5 * 3.0 * 0.4, 0.2])
    assert corr.metrics["mismatch/seq_ess"] == pytest.approx(seq_r.sum() ** 2 / (2 * (seq_r**2).sum()), rel=1e-6)
    assert corr.metrics["mismatch/is_weight_mean"] == pytest.approx(np.minimum(r, 2.0).mean(), rel=1e-6)
    icepop = rollout_correction(t(OLD), t(MU), torch.tensor(MASK), "icepop")
    assert icepop.metrics["mismatch/frac_masked"] == pytest.approx(2 / 5)  # r = 0.4 and r = 0.2
    seq_mis = rollout_correction(t(OLD), t(MU), torch.tensor(MASK), "seq_mis", high=1.5)
    assert seq_mis.metrics["mismatch/frac_masked"] == pytest.approx(1 / 2)


def phi(w, a):
    c1, c2 = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
    return w**c1 * math.exp(c2 * (1 - w))


def test_vespo_joint_folds_rollout_weight_into_log_w():
    # token weights as a sampler/trainer pipeline would pass them (e.g. truncated at 2)
    w_tok = np.minimum(R, 2.0)
    stale = seq_sum(np.log(RHO))
    mismatch = seq_sum(np.log(w_tok))
    p = np.array([phi(math.exp(stale[b] + mismatch[b]), ADV[b]) for b in range(2)])
    out, grad = run("vespo", rollout_is_weights=t(w_tok))
    hand_loss = np.where(MASK, -p[:, None] * ADV[:, None] * LOG_PROB, 0).sum() / N_TOK
    assert out.loss.item() == pytest.approx(hand_loss, rel=1e-10)
    np.testing.assert_allclose(grad, np.where(MASK, -p[:, None] * ADV[:, None] / N_TOK, 0), rtol=1e-10)
    assert out.metrics["phi/mean"] == pytest.approx(p.mean(), rel=1e-10)
    # the loss's log W is the joint one; the split into staleness and mismatch is reported too
    assert out.metrics["is/log_w_mean"] == pytest.approx((stale + mismatch).mean(), rel=1e-10)
    assert out.metrics["is/log_w_stale_mean"] == pytest.approx(stale.mean(), rel=1e-10)
    assert out.metrics["is/log_w_mismatch_mean"] == pytest.approx(mismatch.mean(), rel=1e-10)
    assert out.metrics["is/log_w_stale_abs_mean"] == pytest.approx(np.abs(stale).mean(), rel=1e-10)
    assert out.metrics["is/log_w_mismatch_abs_mean"] == pytest.approx(np.abs(mismatch).mean(), rel=1e-10)
    # same thing when the correction is computed inside from the sampler's log-probs
    out2, grad2 = run("vespo", correction="token_tis", rollout_log_prob=t(MU))
    assert out2.loss.item() == pytest.approx(hand_loss, rel=1e-10)
    np.testing.assert_allclose(grad2, grad, rtol=1e-10)


def test_vespo_joint_with_sequence_weights():
    w_seq = np.array([0.5, 3.0])
    stale = seq_sum(np.log(RHO))
    p = np.array([phi(math.exp(stale[b]) * w_seq[b], ADV[b]) for b in range(2)])
    out, grad = run("vespo", rollout_is_weights=t(w_seq))
    np.testing.assert_allclose(grad, np.where(MASK, -p[:, None] * ADV[:, None] / N_TOK, 0), rtol=1e-10)


def test_vespo_factorised_keeps_phi_on_staleness_and_multiplies_truncated_weight():
    w_tok = R.copy()  # untruncated pi_old/mu; is_clip truncates it at 2 (default)
    stale = seq_sum(np.log(RHO))
    p = np.array([phi(math.exp(stale[b]), ADV[b]) for b in range(2)])
    coef = p[:, None] * ADV[:, None] * np.minimum(w_tok, 2.0)
    out, grad = run("vespo", rollout_is_weights=t(w_tok), is_mode="factorised")
    assert out.loss.item() == pytest.approx(np.where(MASK, -coef * LOG_PROB, 0).sum() / N_TOK, rel=1e-10)
    np.testing.assert_allclose(grad, np.where(MASK, -coef / N_TOK, 0), rtol=1e-10)
    assert out.metrics["phi/mean"] == pytest.approx(p.mean(), rel=1e-10)
    assert out.metrics["is/log_w_mismatch_mean"] == pytest.approx(seq_sum(np.log(w_tok)).mean(), rel=1e-10)
    # a different truncation changes the loss: the weight really is applied outside phi
    out3, grad3 = run("vespo", rollout_is_weights=t(w_tok), is_mode="factorised", is_clip=1.2)
    np.testing.assert_allclose(
        grad3, np.where(MASK, -p[:, None] * ADV[:, None] * np.minimum(w_tok, 1.2) / N_TOK, 0), rtol=1e-10
    )


def test_other_losses_multiply_rollout_weight_and_report_joint_log_w():
    w_tok = np.minimum(R, 2.0)
    out, grad = run("cispo", rollout_is_weights=t(w_tok))
    coef = np.minimum(RHO, 5.0) * ADV[:, None] * w_tok
    np.testing.assert_allclose(grad, np.where(MASK, -coef / N_TOK, 0), rtol=1e-10)
    stale, mismatch = seq_sum(np.log(RHO)), seq_sum(np.log(w_tok))
    assert out.metrics["is/log_w_mean"] == pytest.approx((stale + mismatch).mean(), rel=1e-10)
    assert out.metrics["is/log_w_stale_mean"] == pytest.approx(stale.mean(), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# Diagnostics by hand
# ---------------------------------------------------------------------------------------------


def diag_batch():
    # 7 rows, the last one fully masked (excluded from every statistic); log W on the first token
    log_w = np.array([0.3, -0.2, 1.1, -4.0, 0.05, 0.9, 0.0])
    adv = np.array([1.0, 0.5, -1.0, 2.0, -0.3, -0.7, 1.0])
    T = 3
    mask = np.ones((7, T), dtype=bool)
    mask[6] = False
    mask[1, 2] = False
    lp = np.full((7, T), -1.0)
    old = lp.copy()
    old[:, 0] -= log_w
    return log_w[:6], adv[:6], lp, old, adv, mask


def test_diagnostics_by_hand():
    log_w, a, lp, old, adv, mask = diag_batch()
    out = compute_policy_loss(
        "vespo",
        log_prob=t(lp, requires_grad=True),
        old_log_prob=t(old),
        advantages=t(adv),
        response_mask=torch.tensor(mask),
    )
    m = out.metrics
    w = np.exp(log_w)
    p = np.array([phi(w[i], a[i]) for i in range(6)])
    n = 6
    assert m["is/ess"] == pytest.approx(w.sum() ** 2 / (n * (w**2).sum()), rel=1e-9)
    assert m["phi/ess"] == pytest.approx(p.sum() ** 2 / (n * (p**2).sum()), rel=1e-9)
    assert m["is/log_w_mean"] == pytest.approx(log_w.mean(), rel=1e-9)
    assert m["is/log_w_std"] == pytest.approx(log_w.std(), rel=1e-9)
    assert m["is/log_w_min"] == pytest.approx(-4.0)
    assert m["is/log_w_max"] == pytest.approx(1.1)
    assert m["is/abs_log_w_mean"] == pytest.approx(np.abs(log_w).mean(), rel=1e-9)
    assert m["phi/mean"] == pytest.approx(p.mean(), rel=1e-9)
    assert m["phi/min"] == pytest.approx(p.min(), rel=1e-9)
    assert m["phi/max"] == pytest.approx(p.max(), rel=1e-9)
    # phi(e^-4) = e^-8 e^{3(1 - e^-4)} ~ 0.0064 is the only one below 0.01
    assert m["phi/frac_below_0.01"] == pytest.approx(np.mean(p < 0.01)) == pytest.approx(1 / 6)
    assert m["phi/top10_share"] == pytest.approx(p.max() / p.sum(), rel=1e-9)  # ceil(0.6) = 1 sequence
    # beyond the mode: W > 2/3 for A >= 0, W > 1.5 for A < 0
    mode = np.where(a >= 0, 2 / 3, 1.5)
    assert m["is/frac_beyond_mode"] == pytest.approx(np.mean(w > mode))
    assert m["is/frac_beyond_mode"] == pytest.approx(4 / 6)  # 0.3, -0.2 (A > 0); 1.1, 0.9 (A < 0)
    # quantiles of log W split by the sign of A (linear interpolation, numpy's default)
    for sign, sel in (("pos", a >= 0), ("neg", a < 0)):
        q = np.quantile(log_w[sel], [0.1, 0.5, 0.9])
        for level, value in zip((10, 50, 90), q):
            assert m[f"is/log_w_{sign}_p{level}"] == pytest.approx(value, rel=1e-9, abs=1e-12)
    # mean over valid tokens of log(pi_old / pi_theta)
    tok = np.where(mask, old - lp, 0.0)
    assert m["is/token_kl"] == pytest.approx(tok.sum() / mask.sum(), rel=1e-9)


def test_diagnostics_with_tiny_phi_and_one_sign():
    # W = e^-6 under A > 0: phi = e^-12 e^{3(1 - e^-6)} ~ 1.2e-4 < 0.01
    lp = t([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    old = t([[5.0, -1.0], [-1.0, -1.0]])
    out = compute_policy_loss(
        "vespo",
        log_prob=lp,
        old_log_prob=old,
        advantages=t([1.0, 1.0]),
        response_mask=torch.ones(2, 2, dtype=torch.bool),
    )
    assert out.metrics["phi/frac_below_0.01"] == pytest.approx(0.5)
    assert "is/log_w_neg_p50" not in out.metrics  # no negative advantage in the batch
    w = np.array([math.exp(-6), 1.0])
    assert out.metrics["is/ess"] == pytest.approx(w.sum() ** 2 / (2 * (w**2).sum()), rel=1e-9)


def test_ess_is_exact_for_weights_that_overflow_in_linear_space():
    # log W = +-15 (W ~ 3e6 and 3e-7); (sum W)^2 / (n sum W^2) ~ 1/2
    lp = t([[0.0], [0.0]], requires_grad=True)
    old = t([[-15.0], [15.0]])
    out = compute_policy_loss(
        "reinforce",
        log_prob=lp,
        old_log_prob=old,
        advantages=t([1.0, -1.0]),
        response_mask=torch.ones(2, 1, dtype=torch.bool),
    )
    w = np.exp([15.0, -15.0])
    assert out.metrics["is/ess"] == pytest.approx(w.sum() ** 2 / (2 * (w**2).sum()), rel=1e-9)


@pytest.mark.parametrize("mode", ["token_tis", "icepop", None])
def test_an_all_padding_batch_with_a_correction_names_the_real_problem(mode):
    """A batch of padding only is refused for what it is (no valid token), not as a correction that
    'rejected every token' (which used to name correction 'none' when none was asked for)."""
    with pytest.raises(ValueError, match="no valid token") as err:
        compute_policy_loss(
            "vespo",
            log_prob=torch.zeros(2, 3),
            old_log_prob=torch.zeros(2, 3),
            advantages=torch.ones(2),
            response_mask=torch.zeros(2, 3),
            rollout_log_prob=torch.zeros(2, 3),
            correction=mode,
        )
    assert "rejected" not in str(err.value)


def test_a_correction_that_rejects_every_token_names_itself():
    old = torch.zeros(1, 2)
    far = torch.full((1, 2), -10.0)  # pi_old / mu = e^10 > high: token MIS rejects both tokens
    with pytest.raises(ValueError, match="correction 'token_mis' rejected every token"):
        compute_policy_loss(
            "vespo",
            log_prob=torch.zeros(1, 2),
            old_log_prob=old,
            advantages=torch.ones(1),
            response_mask=torch.ones(1, 2),
            rollout_log_prob=far,
            correction="token_mis",
        )
