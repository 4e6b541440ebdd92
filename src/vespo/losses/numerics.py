"""Numerically safe building blocks: clamped log-ratios, masked sums, log-space ESS."""

from __future__ import annotations

import math

import torch

#: Bound on every per-token and per-sequence log-ratio before ``exp`` (verl and the released
#: VESPO code use the same value): exp(20) = 4.9e8, far beyond any weight that matters.
LOG_RATIO_CLAMP = 20.0
#: Floor of W inside log(W) in the VESPO kernel, as in the released code (log 1e-8 = -18.42).
LOG_W_FLOOR = math.log(1e-8)


def masked_fill_zero(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where ``mask`` else 0, safe against NaN/Inf hiding under the mask (0 * inf = nan)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def clamped_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] clamp(log_prob - old_log_prob, -20, 20), zero on masked positions."""
    diff = masked_fill_zero(log_prob, mask) - masked_fill_zero(old_log_prob, mask)
    return diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return masked_fill_zero(x, mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; 0 where the mask is empty."""
    if dim is None:
        return masked_fill_zero(x, mask).sum() / mask.sum().clamp_min(1)
    return masked_fill_zero(x, mask).sum(dim) / mask.sum(dim).clamp_min(1)


def safe_exp(log_x: torch.Tensor, bound: float = LOG_RATIO_CLAMP) -> torch.Tensor:
    """exp(clamp(log_x, -bound, bound)) with NaN mapped to 0."""
    return torch.exp(log_x.clamp(-bound, bound)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def k3_kl(log_r: torch.Tensor) -> torch.Tensor:
    """Per-sample k3 estimator of KL(q || p) from samples of q, with ``log_r = log p - log q``:
    r - 1 - log r (>= 0, unbiased; Schulman's k3), on the clamped log-ratio."""
    log_r = log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_r) - 1.0 - log_r


def normalized_ess_from_log(log_w: torch.Tensor) -> torch.Tensor:
    """Normalised effective sample size (sum w)^2 / (n sum w^2) in [1/n, 1], from log-weights.

    Computed as exp(2 logsumexp(log w) - logsumexp(2 log w)) / n, so it is exact for weights
    that would overflow or underflow in linear space.
    """
    n = log_w.numel()
    if n == 0:
        return torch.tensor(0.0)
    log_w = log_w.double()
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)) / n


def normalized_ess(w: torch.Tensor) -> torch.Tensor:
    """Normalised ESS of non-negative weights; 0 when every weight is 0."""
    w = w.double()
    n = w.numel()
    denom = n * (w * w).sum()
    if n == 0 or denom <= 0:
        return torch.tensor(0.0)
    return w.sum() ** 2 / denom
