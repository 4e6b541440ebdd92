"""Training-inference mismatch corrections computed from pi_old and the sampler's mu.

The token ratio r_t = pi_old(y_t) / mu(y_t) and the sequence ratio R = prod_t r_t are taken in log
space (clamped to +-20). Each mode returns a weight that multiplies the per-token loss and a mask of
tokens or sequences it rejects:

- ``token_tis``: w_t = min(r_t, high)                         (truncated IS, Liu et al. / verl)
- ``seq_tis``:   w   = min(R, high) for every token           (sequence TIS)
- ``token_mis``: w_t = r_t, token rejected if r_t > high (or < low)   (masked IS)
- ``seq_mis``:   w   = R, sequence rejected if R > high (or < low)    (verl's Seq-MIS)
- ``icepop``:    w_t = r_t inside [low, high], 0 outside; mask untouched (IcePop two-sided mask)
- ``none``:      no weight; only the mismatch diagnostics
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vespo.losses.numerics import (
    LOG_RATIO_CLAMP,
    clamped_log_ratio,
    k3_kl,
    masked_mean,
    normalized_ess_from_log,
)

CORRECTION_MODES: tuple[str, ...] = ("none", "token_tis", "seq_tis", "token_mis", "seq_mis", "icepop")
_DEFAULT_BOUNDS = {"icepop": (0.5, 5.0)}


@dataclass
class RolloutCorrection:
    """Output of :func:`rollout_correction`.

    Attributes:
        weights: [B, T] token weights or [B] sequence weights (detached), ``None`` for ``none``.
        mask: [B, T] bool: the response mask minus rejected tokens or sequences.
        metrics: ``mismatch/...`` scalars.
    """

    weights: torch.Tensor | None
    mask: torch.Tensor
    metrics: dict[str, float]


def _bounds(mode: str, low: float | None, high: float | None) -> tuple[float, float]:
    default_low, default_high = _DEFAULT_BOUNDS.get(mode, (0.0, 2.0))
    low = default_low if low is None else float(low)
    high = default_high if high is None else float(high)
    if not (math.isfinite(high) and high > 0):
        raise ValueError(f"correction_high must be a positive number, got {high}")
    if not (math.isfinite(low) and 0 <= low < high):
        raise ValueError(f"correction_low must satisfy 0 <= low < high={high:g}, got {low}")
    return low, high


@torch.no_grad()
def rollout_correction(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str = "token_tis",
    *,
    high: float | None = None,
    low: float | None = None,
) -> RolloutCorrection:
    """Weights and mask that correct for the sampler mu differing from the trainer's pi_old."""
    if mode not in CORRECTION_MODES:
        raise ValueError(f"unknown correction '{mode}'; use one of {', '.join(CORRECTION_MODES)}")
    lo, hi = _bounds(mode, low, high)
    mask = response_mask.bool()
    dtype = torch.float64 if old_log_prob.dtype == torch.float64 else torch.float32  # float64 stays exact
    log_r = clamped_log_ratio(old_log_prob.to(dtype), rollout_log_prob.to(dtype), mask)  # [B, T]
    seq_log_r = log_r.sum(-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B]
    valid_seq = mask.any(-1)
    r = torch.exp(log_r)
    log_hi = math.log(hi)
    log_lo = math.log(lo) if lo > 0 else -math.inf

    metrics: dict[str, float] = {
        "mismatch/log_prob_diff_mean": masked_mean(-log_r, mask).item(),
        "mismatch/log_prob_diff_abs_mean": masked_mean(log_r.abs(), mask).item(),
        "mismatch/log_prob_diff_abs_max": (log_r.abs() * mask).max().item() if mask.any() else 0.0,
        "mismatch/k3_kl": masked_mean(k3_kl(log_r), mask).item(),
        "mismatch/seq_log_w_mean": seq_log_r[valid_seq].mean().item() if valid_seq.any() else 0.0,
        "mismatch/seq_ess": normalized_ess_from_log(seq_log_r[valid_seq]).item(),
    }
    new_mask = mask.clone()
    weights: torch.Tensor | None
    if mode == "none":
        weights = None
    elif mode == "token_tis":
        weights = torch.exp(log_r.clamp(log_lo, log_hi))
        metrics["mismatch/frac_truncated"] = masked_mean((log_r > log_hi).float(), mask).item()
    elif mode == "seq_tis":
        weights = torch.exp(seq_log_r.clamp(log_lo, log_hi))
        metrics["mismatch/frac_truncated"] = (seq_log_r[valid_seq] > log_hi).float().mean().item()
    elif mode == "token_mis":
        keep = (log_r <= log_hi) & (log_r >= log_lo)
        weights = torch.where(keep, r, torch.zeros_like(r))
        new_mask &= keep
        metrics["mismatch/frac_masked"] = masked_mean((~keep).float(), mask).item()
    elif mode == "seq_mis":
        keep = (seq_log_r <= log_hi) & (seq_log_r >= log_lo)
        weights = torch.where(keep, torch.exp(seq_log_r), torch.zeros_like(seq_log_r))
        new_mask &= keep.unsqueeze(-1)
        metrics["mismatch/frac_masked"] = (~keep[valid_seq]).float().mean().item() if valid_seq.any() else 0.0
    else:  # icepop
        keep = (log_r <= log_hi) & (log_r >= log_lo)
        weights = torch.where(keep, r, torch.zeros_like(r))
        metrics["mismatch/frac_masked"] = masked_mean((~keep).float(), mask).item()
    if weights is not None:
        metrics["mismatch/is_weight_mean"] = (
            masked_mean(weights, mask).item() if weights.dim() == 2 else weights[valid_seq].mean().item()
        )
    return RolloutCorrection(weights=weights, mask=new_mask, metrics=metrics)
