"""Numerical robustness: very long sequences with extreme log-ratios, bf16 inputs, and randomized
property tests (hypothesis) over shapes, masks and values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vespo.losses import (
    AGGREGATION_MODES,
    build_loss_batch,
    compute_loss_terms,
    compute_policy_loss,
    kernel_max,
    list_losses,
)

LOSSES = sorted(list_losses())

# ---------------------------------------------------------------------------------------------
# T = 32,768 with per-token log-ratios up to +-1e4
# ---------------------------------------------------------------------------------------------

T_LONG = 32_768


def long_batch():
    g = torch.Generator().manual_seed(0)
    B = 5
    lp = -torch.rand(B, T_LONG, generator=g) * 5.0
    log_ratio = torch.empty(B, T_LONG)
    log_ratio[0] = 1e4  # W = e^(3e8): far beyond any float
    log_ratio[1] = -1e4  # W = e^(-3e8)
    log_ratio[2] = (torch.rand(T_LONG, generator=g) * 2 - 1) * 1e4
    log_ratio[3] = 1e-3  # small drift over a long sequence: W = e^32.8
    log_ratio[4] = torch.tensor([1e4, -1e4]).repeat(T_LONG // 2)  # cancels exactly after the +-20 clamp
    old = lp - log_ratio
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0])
    mask = torch.ones(B, T_LONG, dtype=torch.bool)
    mask[2, T_LONG // 2 :] = False
    return lp, old, adv, mask


@pytest.mark.parametrize("name", LOSSES)
def test_long_sequences_with_extreme_log_ratios_stay_finite(name):
    lp, old, adv, mask = long_batch()
    lp = lp.requires_grad_()
    extreme_w = torch.exp(torch.randn(5, T_LONG, generator=torch.Generator().manual_seed(1)) * 30).clamp(max=1e30)
    for kw in ({}, {"rollout_is_weights": extreme_w}):
        lp.grad = None
        out = compute_policy_loss(name, log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask, **kw)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert torch.isfinite(lp.grad).all()
        assert torch.all(lp.grad[~mask] == 0)
        assert all(math.isfinite(v) for v in out.metrics.values()), out.metrics
        if name == "vespo" and not kw:
            # row 4: the clamped log-ratios cancel, W = 1, phi = 1 -> grad = -A / N exactly
            n = mask.sum()
            torch.testing.assert_close(lp.grad[4], torch.full((T_LONG,), -2.0) / n, rtol=1e-6, atol=0)


def test_vespo_on_long_sequences_drops_far_off_policy_rows():
    lp, old, adv, mask = long_batch()
    lp = lp.requires_grad_()
    out = compute_policy_loss("vespo", log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask)
    out.loss.backward()
    # rows 0-3 have |log W| >= 20 (clamped): phi underflows to 0 (or 1e-16-ish) and the rows are dropped
    assert lp.grad[:4].abs().max() < 1e-12
    assert out.metrics["is/log_w_max"] == 20.0 and out.metrics["is/log_w_min"] == -20.0


# ---------------------------------------------------------------------------------------------
# bf16 inputs
# ---------------------------------------------------------------------------------------------

#: Stated tolerance for bf16 inputs against the unrounded fp32 inputs: the loss may move by at most
#: BF16_TOL * token-mean(|A| |log pi|). bf16 keeps 8 mantissa bits, so each log-prob is off by up to
#: 2^-9 relative; VESPO and seq_clip sum those errors over the sequence into log W. Worst case seen
#: over 50 random batches (B = 8, T = 16, log pi in [-2, 0], drift 0.05): 1.3e-2.
BF16_TOL = 3e-2


def small_random_batch(seed, B=8, T=16):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 2
    old = lp + 0.05 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    return lp, old, adv, mask


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_inputs_are_computed_in_fp32(name):
    # bf16 inputs are upcast once: the result equals fp32 on the same (bf16-representable) values,
    # and the gradient handed back to the bf16 tensor is that fp32 gradient rounded to bf16.
    lp, old, adv, mask = small_random_batch(0)
    lp16 = lp.bfloat16().requires_grad_()
    lp32 = lp.bfloat16().float().requires_grad_()
    o16 = compute_policy_loss(
        name, log_prob=lp16, old_log_prob=old.bfloat16(), advantages=adv.bfloat16(), response_mask=mask
    )
    o32 = compute_policy_loss(
        name, log_prob=lp32, old_log_prob=old.bfloat16().float(), advantages=adv.bfloat16().float(), response_mask=mask
    )
    o16.loss.backward()
    o32.loss.backward()
    assert o16.loss.dtype == torch.float32
    torch.testing.assert_close(o16.loss, o32.loss.detach(), rtol=1e-6, atol=1e-7)
    assert lp16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lp16.grad, lp32.grad.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("seed", range(4))
def test_bf16_inputs_match_fp32_within_stated_tolerance(name, seed):
    lp, old, adv, mask = small_random_batch(seed)
    ref = compute_policy_loss(name, log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask).loss
    got = compute_policy_loss(
        name, log_prob=lp.bfloat16(), old_log_prob=old.bfloat16(), advantages=adv.bfloat16(), response_mask=mask
    ).loss
    scale = (adv.abs().unsqueeze(-1) * lp.abs() * mask).sum() / mask.sum()
    assert abs(got.item() - ref.item()) <= BF16_TOL * scale.item()


# ---------------------------------------------------------------------------------------------
# Randomized properties
# ---------------------------------------------------------------------------------------------

finite = dict(allow_nan=False, allow_infinity=False)
log_ratio_values = st.one_of(
    st.floats(-1.0, 1.0, **finite),  # near-policy
    st.floats(-1e4, 1e4, **finite),  # anything
    st.sampled_from([0.0, 20.0, -20.0, 1e4, -1e4]),
)


@st.composite
def batches(draw):
    B = draw(st.integers(1, 5))
    T = draw(st.integers(1, 12))
    n = B * T
    mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mask[draw(st.integers(0, n - 1))] = True  # at least one valid token
    lp = draw(st.lists(st.floats(-60.0, 0.0, **finite), min_size=n, max_size=n))
    lr = draw(st.lists(log_ratio_values, min_size=n, max_size=n))
    adv = draw(st.lists(st.floats(-10.0, 10.0, **finite), min_size=B, max_size=B))
    per_token_adv = draw(st.booleans())
    lp_t = torch.tensor(lp, dtype=torch.float32).reshape(B, T)
    old = lp_t - torch.tensor(lr, dtype=torch.float32).reshape(B, T)
    adv_t = torch.tensor(adv, dtype=torch.float32)
    if per_token_adv:
        adv_t = adv_t.unsqueeze(-1).expand(B, T).contiguous()
    return lp_t, old, adv_t, torch.tensor(mask).reshape(B, T)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), name=st.sampled_from(LOSSES), agg=st.sampled_from(AGGREGATION_MODES))
def test_random_batches_give_finite_loss_and_gradient(batch, name, agg):
    lp, old, adv, mask = batch
    lp = lp.clone().requires_grad_()
    out = compute_policy_loss(
        name, log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask, loss_agg_mode=agg
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(lp.grad).all()
    assert torch.all(lp.grad[~mask] == 0)
    assert all(math.isfinite(v) for v in out.metrics.values())
    assert 0.0 <= out.metrics["is/ess"] <= 1.0 + 1e-9


@settings(max_examples=60, deadline=None, database=None)
@given(batch=batches())
def test_random_batches_vespo_phi_in_zero_to_phi_max(batch):
    lp, old, adv, mask = batch
    out = compute_loss_terms(
        "vespo", build_loss_batch(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask)
    )
    seq_adv = adv if adv.dim() == 1 else adv[torch.arange(len(adv)), mask.int().argmax(-1)]
    phi_max = torch.where(seq_adv >= 0, kernel_max(2.0, 3.0), kernel_max(3.0, 2.0))
    phi = out.seq_weight
    assert torch.all(phi >= 0)
    assert torch.all(phi <= phi_max * (1 + 1e-6))
    # the gradient coefficient is phi * A / N: never larger than phi_max * |A| / N
    lp = lp.clone().requires_grad_()
    res = compute_policy_loss("vespo", log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask)
    res.loss.backward()
    a = adv if adv.dim() == 2 else adv.unsqueeze(-1).expand_as(lp)
    bound = (phi_max.unsqueeze(-1) * a.abs() / mask.sum()) * (1 + 1e-5) + 1e-30
    assert torch.all(lp.grad.abs() <= bound)


@settings(max_examples=30, deadline=None, database=None)
@given(batch=batches(), name=st.sampled_from(LOSSES))
def test_random_batches_float32_matches_float64(batch, name):
    lp, old, adv, mask = batch
    # keep to moderate log-ratios so that clip boundaries are not decided by rounding
    old = lp - (lp - old).clamp(-0.5, 0.5)
    o32 = compute_policy_loss(name, log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask)
    o64 = compute_policy_loss(
        name, log_prob=lp.double(), old_log_prob=old.double(), advantages=adv.double(), response_mask=mask
    )
    scale = (
        (adv.double().abs().reshape(len(adv), -1) * lp.double().abs().clamp_min(1) * mask).sum() / mask.sum()
    ).item()
    assert abs(o32.loss.item() - o64.loss.item()) <= 1e-4 * scale + 1e-6
    assert np.isfinite(o64.loss.item())
