"""Cross-check of our ``vespo`` loss against TRL's VESPO (``loss_type="vespo"``).

TRL computes phi with the static method ``GRPOTrainer.get_gamma_weights`` and then, in
``_compute_loss``, ``per_token_loss = -phi_seq * advantages * per_token_logps`` aggregated as
``(per_token_loss * mask).sum() / num_items_in_batch``. With one process and no gradient
accumulation, ``num_items_in_batch`` is the number of valid completion tokens, i.e. our token-mean.
TRL passes the vLLM importance ratio as ``importance_sampling_ratio`` (1 on padding, since it is
exp((old - sampling) * mask)); we receive the same tensor as ``rollout_is_weights``.
"""

from __future__ import annotations

import pytest
import torch

from vespo.losses import compute_policy_loss

try:  # trl is a test dependency (pyproject [test]); skip only if it is genuinely not installed
    import trl  # noqa: F401
except ImportError:  # pragma: no cover
    trl = pytest.importorskip("trl")

from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402


def random_batch(seed, B=8, T=48, dtype=torch.float32, drift=0.05):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    old = lp + drift * torch.randn(B, T, generator=g, dtype=dtype)
    old[0] = lp[0] - 0.5  # a clearly stale row: log W = +0.5 * n
    sampling = old + 0.1 * torch.randn(B, T, generator=g, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = T
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(-1)).to(dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    adv[2] = 0.0  # A = 0 takes the positive branch in both implementations
    adv[3] = -abs(adv[3])
    # finite garbage on padding: TRL multiplies by the mask, so only finite values are fair to it
    lp = torch.where(mask.bool(), lp, torch.full_like(lp, -30.0))
    old = torch.where(mask.bool(), old, torch.full_like(old, 7.0))
    return lp, old, sampling, mask, adv


def is_ratio(old, sampling, mask, mode):
    """TRL's ``importance_sampling_ratio`` for its four vLLM IS modes (clip 0.5 .. 2)."""
    diff = (old - sampling) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio.clamp(max=2.0)
    return ratio.masked_fill((ratio < 0.5) | (ratio > 2.0), 0.0)


def trl_vespo(lp, old, mask, adv, is_ratio=None, **params):
    lp = lp.detach().clone().requires_grad_()
    adv2 = adv.unsqueeze(-1)  # TRL's advantages are (B, 1)
    phi_seq = GRPOTrainer.get_gamma_weights(
        advantages=adv2, log_ratio_per_token=lp - old, mask=mask, importance_sampling_ratio=is_ratio, **params
    )
    per_token_loss = -phi_seq * adv2 * lp
    loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    loss.backward()
    return loss.detach(), lp.grad, phi_seq.squeeze(-1)


def our_vespo(lp, old, mask, adv, is_ratio=None, **params):
    lp = lp.detach().clone().requires_grad_()
    out = compute_policy_loss(
        "vespo",
        log_prob=lp,
        old_log_prob=old,
        advantages=adv,
        response_mask=mask,
        rollout_is_weights=is_ratio,
        loss_agg_mode="token-mean",
        **params,
    )
    out.loss.backward()
    return out.loss.detach(), lp.grad, out.metrics


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", [None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_vespo_matches_trl(seed, mode):
    lp, old, sampling, mask, adv = random_batch(seed)
    w = None if mode is None else is_ratio(old, sampling, mask, mode)
    ref_loss, ref_grad, ref_phi = trl_vespo(lp, old, mask, adv, w)
    loss, grad, metrics = our_vespo(lp, old, mask, adv, w)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    assert metrics["phi/mean"] == pytest.approx(ref_phi.mean().item(), rel=1e-5, abs=1e-7)
    # the comparison is not vacuous: phi is spread out and the gradient is far from zero
    assert ref_phi.max() - ref_phi.min() > 0.1
    assert ref_grad.abs().max() > 1e-3


def test_vespo_matches_trl_with_custom_parameters_float64():
    lp, old, sampling, mask, adv = random_batch(7, dtype=torch.float64, drift=0.1)
    params = {"k_pos": 1.5, "lambda_pos": 0.7, "k_neg": 4.0, "lambda_neg": 2.5}
    w = is_ratio(old, sampling, mask, "token_truncate")
    ref_loss, ref_grad, _ = trl_vespo(lp, old, mask, adv, w, **params)
    loss, grad, _ = our_vespo(lp, old, mask, adv, w, **params)
    # TRL builds (k, lambda) with torch.where on Python floats, i.e. in float32 (0.7 is not exact),
    # so in float64 the two agree to float32 rounding of the parameters, not to 1e-15
    torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-9)


def test_vespo_matches_trl_under_extreme_staleness():
    # log-ratios large enough that every clamp (token +-20, sequence [log 1e-8, 20]) is reached
    lp, old, sampling, mask, adv = random_batch(11, drift=3.0)
    w = is_ratio(old, sampling, mask, "token_mask")
    for weights in (None, w):
        ref_loss, ref_grad, _ = trl_vespo(lp, old, mask, adv, weights)
        loss, grad, _ = our_vespo(lp, old, mask, adv, weights)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
        assert torch.isfinite(grad).all()
