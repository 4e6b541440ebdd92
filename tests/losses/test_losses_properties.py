"""Structural properties: the VESPO kernel's shape (the paper, Prop. 3.1 and C.1), padding invariance and
micro-batch invariance of every loss under every aggregation mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vespo.losses import (
    AGGREGATION_MODES,
    compute_policy_loss,
    get_loss_spec,
    kernel_max,
    kernel_mode,
    list_losses,
    variance_constant,
    vespo_phi,
)

LOSSES = sorted(list_losses())
PAIRS = [(2.0, 3.0), (3.0, 2.0)]  # (c1, c2) for A >= 0 and A < 0 (paper defaults)


def hand_phi(w, c1, c2):
    return w**c1 * np.exp(c2 * (1.0 - w))


# ---------------------------------------------------------------------------------------------
# Kernel shape
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c1, c2", PAIRS + [(1.0, 1.0), (5.0, 0.5), (1.5, 4.0)])
def test_phi_is_one_on_policy(c1, c2):
    assert float(vespo_phi(1.0, c1, c2)) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize(
    "c1, c2, w_star, phi_max",
    [(2.0, 3.0, 2 / 3, 1.21), (3.0, 2.0, 1.5, 1.24)],  # Prop. C.1: phi_max at W** = c1 / c2
)
def test_phi_maximum_location_and_value(c1, c2, w_star, phi_max):
    w = np.linspace(1e-4, 10.0, 400_001)
    phi = vespo_phi(torch.tensor(w), c1, c2).numpy()
    np.testing.assert_allclose(phi, hand_phi(w, c1, c2), rtol=1e-12, atol=1e-300)
    assert w[phi.argmax()] == pytest.approx(w_star, abs=1e-4)
    assert phi.max() == pytest.approx(phi_max, abs=5e-3)  # the paper rounds to two decimals
    assert kernel_mode(c1, c2) == pytest.approx(w_star, rel=1e-15)
    assert kernel_max(c1, c2) == pytest.approx((c1 / c2) ** c1 * math.exp(c2 - c1), rel=1e-15)
    assert kernel_max(c1, c2) == pytest.approx(phi.max(), rel=1e-9)


@pytest.mark.parametrize("c1, c2, K", [(2.0, 3.0, math.e**2 / 3), (3.0, 2.0, 1.0)])
def test_phi_over_w_is_bounded_by_closed_form_K(c1, c2, K):
    # Prop. 3.1 / Eq. 19: K = sup phi(w)/w = ((c1-1)/c2)^(c1-1) exp(c2-c1+1), attained at (c1-1)/c2
    assert variance_constant(c1, c2) == pytest.approx(K, rel=1e-15)
    w = np.geomspace(1e-8, 1e3, 2_000_001)
    ratio = vespo_phi(torch.tensor(w), c1, c2).numpy() / w
    assert ratio.max() <= K * (1 + 1e-12)
    assert ratio.max() == pytest.approx(K, rel=1e-8)  # the bound is tight
    assert w[ratio.argmax()] == pytest.approx((c1 - 1) / c2, rel=1e-4)


def test_variance_constant_edge_cases():
    # c1 = 1: K = e^c2, approached (not attained) as w -> 0+; c1 < 1: no finite bound.
    # The grid starts at 1e-8: below it the released code floors W inside log W (a numerical clamp
    # where phi < 1e-7), so phi(w)/w is not the analytic one there.
    w = np.geomspace(1e-8, 10, 10_001)
    ratio = vespo_phi(torch.tensor(w), 1.0, 2.0).numpy() / w
    assert variance_constant(1.0, 2.0) == pytest.approx(math.e**2)
    assert ratio.max() < math.e**2 and ratio.max() == pytest.approx(math.e**2, rel=1e-7)
    assert variance_constant(0.5, 2.0) == math.inf


# phi(W) at sample ratios, computed by hand from the closed form (3 decimals; 2e-4 is one significant digit)
TABLE_W = [0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5]
TABLE_POS = [0.149, 0.593, 1.120, 1.191, 1, 0.738, 0.502, 0.199, 0.022, 2e-4]
TABLE_NEG = [0.006, 0.070, 0.340, 0.696, 1, 1.185, 1.242, 1.083, 0.495, 0.042]


def test_phi_table_values_by_hand():
    w = torch.tensor(TABLE_W, dtype=torch.float64)
    np.testing.assert_allclose(vespo_phi(w, 2.0, 3.0).numpy(), TABLE_POS, atol=6e-4)
    np.testing.assert_allclose(vespo_phi(w, 3.0, 2.0).numpy(), TABLE_NEG, atol=6e-4)
    assert float(vespo_phi(0.5, 2.0, 3.0)) == pytest.approx(1.120, abs=5e-4)
    assert float(vespo_phi(2.0, 3.0, 2.0)) == pytest.approx(1.083, abs=5e-4)


def test_phi_applied_by_the_loss_matches_the_table():
    # one-token sequences with log W = log w; under token-sum the gradient is exactly -phi * A
    n = len(TABLE_W)
    lp = torch.zeros(2 * n, 1, dtype=torch.float64, requires_grad=True)
    old = -torch.log(torch.tensor(TABLE_W * 2, dtype=torch.float64)).unsqueeze(-1)
    adv = torch.tensor([1.0] * n + [-1.0] * n, dtype=torch.float64)
    out = compute_policy_loss(
        "vespo",
        log_prob=lp,
        old_log_prob=old,
        advantages=adv,
        response_mask=torch.ones(2 * n, 1, dtype=torch.bool),
        loss_agg_mode="token-sum",
    )
    out.loss.backward()
    phi = (-lp.grad[:, 0] / adv).numpy()
    np.testing.assert_allclose(phi[:n], TABLE_POS, atol=6e-4)
    np.testing.assert_allclose(phi[n:], TABLE_NEG, atol=6e-4)
    w = np.array(TABLE_W)
    np.testing.assert_allclose(phi[:n], hand_phi(w, 2, 3), rtol=1e-12)
    np.testing.assert_allclose(phi[n:], hand_phi(w, 3, 2), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Padding invariance
# ---------------------------------------------------------------------------------------------


def base_batch(seed=0, B=4, T=5):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5], dtype=torch.float64)[:B]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    return lp, old, adv, mask


GARBAGE = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30]


def pad(x, extra, fill_values, dim=-1):
    """Append ``extra`` columns (or rows) filled with a cycle of garbage values."""
    shape = list(x.shape)
    shape[dim] = extra
    n = int(np.prod(shape))
    vals = torch.tensor([fill_values[i % len(fill_values)] for i in range(n)], dtype=x.dtype).reshape(shape)
    return torch.cat([x, vals], dim=dim)


def loss_and_grad(name, lp, old, adv, mask, agg="token-mean", **kw):
    lp = lp.detach().clone().requires_grad_()
    out = compute_policy_loss(
        name, log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask, loss_agg_mode=agg, **kw
    )
    out.loss.backward()
    return out.loss.detach(), lp.grad


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("agg", AGGREGATION_MODES)
def test_padding_with_garbage_changes_nothing(name, agg):
    lp, old, adv, mask = base_batch()
    kw = {"norm_length": 5} if agg == "token-sum-norm" else {}
    ref_loss, ref_grad = loss_and_grad(name, lp, old, adv, mask, agg, **kw)
    assert torch.isfinite(ref_loss) and ref_loss != 0

    # inside the existing padding: garbage under the mask
    lp2, old2 = lp.clone(), old.clone()
    lp2[~mask] = torch.tensor(GARBAGE * 10, dtype=lp.dtype)[: int((~mask).sum())]
    old2[~mask] = torch.tensor(GARBAGE[::-1] * 10, dtype=lp.dtype)[: int((~mask).sum())]
    # extra padded columns and one extra fully-masked row, all garbage
    lp3, old3 = pad(lp2, 3, GARBAGE), pad(old2, 3, GARBAGE[1:])
    mask3 = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], -1)
    lp3, old3 = pad(lp3, 1, GARBAGE, dim=0), pad(old3, 1, GARBAGE, dim=0)
    mask3 = torch.cat([mask3, torch.zeros(1, 8, dtype=torch.bool)], 0)
    # per-token advantages with garbage under the mask
    adv3 = adv.unsqueeze(-1).expand(4, 8).clone()
    adv3 = torch.cat([adv3, torch.full((1, 8), float("nan"), dtype=adv.dtype)], 0)
    adv3[~mask3] = float("nan")
    for a, m in ((adv3, mask3),):
        loss, grad = loss_and_grad(name, lp3, old3, a, m, agg, **kw)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12, abs=1e-15)
        torch.testing.assert_close(grad[:4, :5], ref_grad, rtol=1e-12, atol=1e-15)
        assert torch.all(grad[~m] == 0), "padding must get an exact zero gradient"


@pytest.mark.parametrize("name", LOSSES)
def test_rollout_weight_garbage_under_mask_changes_nothing(name):
    lp, old, adv, mask = base_batch()
    g = torch.Generator().manual_seed(1)
    w = torch.rand(4, 5, generator=g, dtype=torch.float64) + 0.5
    ref_loss, ref_grad = loss_and_grad(name, lp, old, adv, mask, rollout_is_weights=w)
    w2 = w.clone()
    w2[~mask] = float("nan")
    loss, grad = loss_and_grad(name, lp, old, adv, mask, rollout_is_weights=w2)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Micro-batch invariance
# ---------------------------------------------------------------------------------------------


def big_batch(B=7, T=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    old = lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4, 0, 5, 1, 3])  # one empty row: counts neither as token nor sequence
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(-1)
    return lp, old, adv, mask


SPLITS = [(0, 2), (2, 5), (5, 7)]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("agg", AGGREGATION_MODES)
def test_micro_batches_add_up_to_the_full_batch(name, agg):
    lp, old, adv, mask = big_batch()
    n_tok = int(mask.sum())
    n_seq = int(mask.any(-1).sum())
    full_lp = lp.clone().requires_grad_()
    full = compute_policy_loss(
        name, log_prob=full_lp, old_log_prob=old, advantages=adv, response_mask=mask, loss_agg_mode=agg
    )
    full.loss.backward()

    micro_lp = lp.clone().requires_grad_()
    total = 0.0
    # a loss whose weights depend on the whole batch gets its statistics, summed over the parts
    shared = {}
    if "batch_stats" in get_loss_spec(name).params:
        from vespo.losses import merge_adaptive_stats, vespo_adaptive_batch_stats, vespo_adaptive_seq_inputs

        parts = [
            vespo_adaptive_batch_stats(
                *vespo_adaptive_seq_inputs(
                    log_prob=lp[lo:hi], old_log_prob=old[lo:hi], advantages=adv[lo:hi], response_mask=mask[lo:hi]
                )
            )
            for lo, hi in SPLITS
        ]
        shared["batch_stats"] = merge_adaptive_stats(parts)
    for lo, hi in SPLITS:
        out = compute_policy_loss(
            name,
            log_prob=micro_lp[lo:hi],
            old_log_prob=old[lo:hi],
            advantages=adv[lo:hi],
            response_mask=mask[lo:hi],
            loss_agg_mode=agg,
            global_num_tokens=n_tok,
            global_num_seqs=n_seq,
            **shared,
        )
        out.loss.backward()
        total = total + out.loss.detach()
    assert total.item() == pytest.approx(full.loss.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(micro_lp.grad, full_lp.grad, rtol=1e-12, atol=1e-15)
    assert full_lp.grad.abs().sum() > 0


def test_micro_batches_without_global_counts_do_not_add_up():
    # the global counts are what makes the split exact: without them token-mean micro losses differ
    lp, old, adv, mask = big_batch()
    full = compute_policy_loss("vespo", log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask)
    total = sum(
        compute_policy_loss(
            "vespo", log_prob=lp[lo:hi], old_log_prob=old[lo:hi], advantages=adv[lo:hi], response_mask=mask[lo:hi]
        ).loss.item()
        for lo, hi in SPLITS
    )
    assert total != pytest.approx(full.loss.item(), rel=1e-3)


# ---------------------------------------------------------------------------------------------
# The integration path (compute_loss_terms + aggregate_loss) agrees with compute_policy_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_loss_terms_path_matches_compute_policy_loss(name, per_token_adv):
    from vespo.losses import aggregate_loss, build_loss_batch, compute_loss_terms

    lp, old, adv, mask = big_batch()
    if per_token_adv:
        adv = adv.unsqueeze(-1).expand_as(lp).clone()
        adv[~mask] = float("nan")
    w = torch.rand(lp.shape, generator=torch.Generator().manual_seed(5), dtype=lp.dtype) + 0.5
    for agg in AGGREGATION_MODES:
        lp1 = lp.clone().requires_grad_()
        out = compute_policy_loss(
            name,
            log_prob=lp1,
            old_log_prob=old,
            advantages=adv,
            response_mask=mask,
            loss_agg_mode=agg,
            rollout_is_weights=w,
        )
        out.loss.backward()
        lp2 = lp.clone().requires_grad_()
        batch = build_loss_batch(
            log_prob=lp2, old_log_prob=old, advantages=adv, response_mask=mask, rollout_is_weights=w
        )
        terms = compute_loss_terms(name, batch)
        assert torch.all(terms.loss_mat[~mask] == 0)
        loss = aggregate_loss(terms.loss_mat, mask, agg)
        loss.backward()
        assert out.loss.item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-15)
        torch.testing.assert_close(lp1.grad, lp2.grad, rtol=1e-12, atol=1e-15)
        # the lazily built per-token loss of LossOutput is the same matrix
        torch.testing.assert_close(out.loss_mat, terms.loss_mat.detach(), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Mask dtypes and the fast finiteness check
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
def test_any_mask_dtype_means_nonzero_is_valid(name):
    lp, old, adv, mask = base_batch()
    ref_loss, ref_grad = loss_and_grad(name, lp, old, adv, mask)
    weird = mask.to(torch.float32) * torch.tensor([2.0, 0.5, -1.0, 1.0, 3.0])  # nonzero = valid
    for m in (mask.long(), mask.to(torch.float16), mask.double(), weird):
        lp1 = lp.clone().requires_grad_()
        out = compute_policy_loss(name, log_prob=lp1, old_log_prob=old, advantages=adv, response_mask=m)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
        torch.testing.assert_close(lp1.grad, ref_grad, rtol=1e-12, atol=0)
        assert out.mask.dtype == torch.bool and torch.equal(out.mask, mask)


def test_huge_finite_values_are_not_mistaken_for_nan():
    # the cheap check sums the log-ratios; an overflowing sum of finite values must fall back to
    # the exact check (no error) and give the same finite result as the clamped computation
    lp = torch.tensor([[-3e38, -1.0], [-1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[3e38, -1.0], [-1.0, -1.0]])
    out = compute_policy_loss(
        "vespo",
        log_prob=lp,
        old_log_prob=old,
        advantages=torch.tensor([1.0, 1.0]),
        response_mask=torch.ones(2, 2, dtype=torch.bool),
    )
    out.loss.backward()
    assert out.metrics["is/log_w_min"] == -20.0  # row 0: clamped token log-ratio -20
    assert torch.isfinite(lp.grad).all()
    torch.testing.assert_close(lp.grad[1], torch.full((2,), -1.0 / 4))  # W = 1 -> phi = 1
