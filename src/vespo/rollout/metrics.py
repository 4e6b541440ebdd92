"""Metrics of a rollout batch: rewards, staleness, engine mismatch and the split of log W.

The same functions serve the sync and the Ray source, so every metric means one thing in both
modes. Token lag = the optimizer step that trains a token minus the policy version that drew it.
"""

from __future__ import annotations

import torch

from vespo.losses.numerics import k3_kl
from vespo.rollout.batch import RolloutBatch

__all__ = ["LAG_BUCKETS", "batch_metrics", "engine_mismatch_metrics", "log_w_split_metrics", "staleness_metrics"]

#: Lag histogram buckets logged per step (``stale/lag_frac_0`` ... ``stale/lag_frac_7``, then ``_ge8``).
LAG_BUCKETS = 8


def batch_metrics(batch: RolloutBatch, group_size: int) -> dict[str, float]:
    """``reward/*`` and ``response/*`` statistics of one (scored) batch."""
    lengths = batch.response_mask.sum(-1).float()
    rewards = batch.rewards
    grouped = rewards.reshape(-1, group_size)
    out = {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "reward/group_solved_frac": (grouped.max(-1).values > 0).float().mean().item(),
        "reward/informative_group_frac": (grouped.std(-1) > 0).float().mean().item(),
        "response/length_mean": lengths.mean().item(),
        "response/length_max": lengths.max().item(),
        "response/truncated_frac": 1.0 - batch.finished.float().mean().item(),
    }
    return out


def staleness_metrics(batch: RolloutBatch, policy_version: int, bound: int | None = None) -> dict[str, float]:
    """Token lag of a batch trained at ``policy_version``: its maximum (``stale/index``), the
    token-weighted mean, the distribution, the per-response oldest lag and partial-rollout spans."""
    mask = batch.response_mask
    lag = batch.token_lag(policy_version)
    tokens = lag[mask].float()
    out: dict[str, float] = {"stale/index": float(batch.stale_index(policy_version))}
    if bound is not None:
        out["stale/bound"] = float(bound)
    if tokens.numel() == 0:
        return out
    out["stale/versions_behind_mean"] = tokens.mean().item()
    out["stale/versions_behind_max"] = tokens.max().item()
    for k in range(LAG_BUCKETS):
        out[f"stale/lag_frac_{k}"] = (tokens == k).float().mean().item()
    out[f"stale/lag_frac_ge{LAG_BUCKETS}"] = (tokens >= LAG_BUCKETS).float().mean().item()
    out["stale/lag_p50"] = tokens.quantile(0.5).item()
    out["stale/lag_p90"] = tokens.quantile(0.9).item()
    has = mask.any(-1)
    vmax = batch.token_version.masked_fill(~mask, -1).max(-1).values
    vmin = batch.token_version.masked_fill(~mask, torch.iinfo(torch.long).max).min(-1).values
    span = (vmax - vmin)[has]
    out["stale/seq_oldest_lag_mean"] = (policy_version - vmin[has]).float().mean().item()
    out["stale/partial_frac"] = (span > 0).float().mean().item()
    out["stale/partial_span_max"] = float(span.max().item())
    return out


def engine_mismatch_metrics(batch: RolloutBatch) -> dict[str, float]:
    """The engine (mu) against the trainer's precision under the *same* weights: pure engine
    mismatch, per token and per sequence. Empty when no reference was measured."""
    if batch.reference_log_prob is None or not batch.response_mask.any():
        return {}
    mask = batch.response_mask
    diff = batch.reference_log_prob - batch.rollout_log_prob
    per_seq = (diff * mask).sum(-1)[mask.any(-1)]
    token = diff[mask]
    return {
        "mismatch/engine_log_prob_diff_mean": token.mean().item(),
        "mismatch/engine_log_prob_diff_abs_mean": token.abs().mean().item(),
        "mismatch/engine_log_prob_diff_abs_max": token.abs().max().item(),
        "mismatch/engine_k3_kl": k3_kl(token).mean().item(),
        "mismatch/engine_seq_log_w_mean": per_seq.mean().item(),
        "mismatch/engine_seq_log_w_abs_mean": per_seq.abs().mean().item(),
    }


def log_w_split_metrics(batch: RolloutBatch, log_prob: torch.Tensor) -> dict[str, float]:
    """pi_theta at training time (``log_prob [b, T]``) against mu, and the sequence log W split.

    ``log W = sum_t (log pi_theta - log mu)`` = staleness part ``sum_t (log pi_theta - log pi_ref)``
    + mismatch part ``sum_t (log pi_ref - log mu)``, where pi_ref is the trainer-precision policy of
    the weights that drew each token (``batch.reference_log_prob``; the split needs it).
    """
    mask = batch.response_mask
    if not mask.any():
        return {}
    logp = log_prob.detach().float()
    fm = mask.float()
    token = (logp - batch.rollout_log_prob)[mask]
    has = mask.any(-1)
    total = ((logp - batch.rollout_log_prob) * fm).sum(-1)[has]
    out = {
        "mismatch/pi_mu_log_prob_diff_mean": token.mean().item(),
        "mismatch/pi_mu_log_prob_diff_abs_mean": token.abs().mean().item(),
        "mismatch/pi_mu_k3_kl": k3_kl(token).mean().item(),
        "is/log_w_pi_mu_mean": total.mean().item(),
        "is/log_w_pi_mu_abs_mean": total.abs().mean().item(),
    }
    if batch.reference_log_prob is not None:
        stale = ((logp - batch.reference_log_prob) * fm).sum(-1)[has]
        engine = ((batch.reference_log_prob - batch.rollout_log_prob) * fm).sum(-1)[has]
        out["stale/log_w_mean"] = stale.mean().item()
        out["stale/log_w_abs_mean"] = stale.abs().mean().item()
        out["mismatch/log_w_mean"] = engine.mean().item()
        out["mismatch/log_w_abs_mean"] = engine.abs().mean().item()
    return out
