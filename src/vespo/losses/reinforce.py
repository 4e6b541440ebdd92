"""REINFORCE-style losses with a detached per-sequence weight: -w * A * log pi.

- ``reinforce``: w = 1 (no importance ratio at all).
- ``seq_clip``:  w = min(W, c), the sequence-level hard clip analysed in the VESPO paper (Eq. 30,
  implied proposal Q proportional to min(pi, c mu)).
- ``topr``: tapered off-policy REINFORCE (arXiv 2503.14286): w = 1 for A >= 0 and
  w = clip(W, 0, c) (c = 1) for A < 0.

W = prod_t rho_t is taken in log space (true product, clamped to +-20) and detached.
"""

from __future__ import annotations

import torch

from vespo.losses.numerics import LOG_RATIO_CLAMP
from vespo.losses.registry import Param, register_policy_loss
from vespo.losses.types import KernelOutput, LossBatch


def _logp_coeff(batch: LossBatch, seq_weight: torch.Tensor) -> torch.Tensor:
    """Coefficient c on log pi with loss = c * log pi = -w * A * log pi ([B], or [B, T] for per-token A)."""
    if batch.advantages.dim() == 2:
        return -seq_weight.unsqueeze(-1) * batch.token_advantages
    return -seq_weight * batch.seq_advantages


def _seq_log_w(batch: LossBatch) -> torch.Tensor:
    return batch.seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


@register_policy_loss(
    "reinforce",
    summary="plain REINFORCE: -A * log pi, no importance ratio",
    reference="Williams 1992; GRPO-style group baseline supplies A",
)
def reinforce_loss(batch: LossBatch) -> KernelOutput:
    """REINFORCE: -A * log pi."""
    weight = torch.ones_like(batch.seq_advantages)
    return KernelOutput(
        loss_mat=None, logp_coeff=_logp_coeff(batch, weight), seq_log_w=_seq_log_w(batch), seq_weight=weight
    )


@register_policy_loss(
    "seq_clip",
    level="sequence",
    summary="sequence-level hard clip: -min(W, c) * A * log pi",
    reference="VESPO paper Eq. 30 (analysed, not run); c = 2 matches verl's TIS default",
    params={"clip": Param(2.0, "upper bound c on W", low=0.0, low_open=True)},
)
def seq_clip_loss(batch: LossBatch, *, clip: float) -> KernelOutput:
    """Sequence hard clip: -sg(min(W, c)) * A * log pi."""
    log_w = _seq_log_w(batch)
    weight = torch.exp(log_w).clamp(max=clip)
    return KernelOutput(
        loss_mat=None,
        logp_coeff=_logp_coeff(batch, weight),
        seq_log_w=log_w,
        seq_weight=weight,
        metrics={"loss/clip_frac": (log_w > torch.log(torch.tensor(clip))).float().mean().item()},
    )


@register_policy_loss(
    "topr",
    level="sequence",
    summary="tapered off-policy REINFORCE: weight 1 for A >= 0, clip(W, 0, c) for A < 0",
    reference="TOPR (arXiv 2503.14286): c = 1",
    params={"clip": Param(1.0, "upper bound on W for negative advantages", low=0.0, low_open=True)},
)
def topr_loss(batch: LossBatch, *, clip: float) -> KernelOutput:
    """TOPR: -w * A * log pi with w = 1 (A >= 0) or min(W, c) (A < 0)."""
    log_w = _seq_log_w(batch)
    negative = batch.seq_advantages < 0
    weight = torch.where(negative, torch.exp(log_w).clamp(max=clip), torch.ones_like(log_w))
    truncated = negative & (log_w > torch.log(torch.tensor(clip)))
    return KernelOutput(
        loss_mat=None,
        logp_coeff=_logp_coeff(batch, weight),
        seq_log_w=log_w,
        seq_weight=weight,
        metrics={"loss/clip_frac": truncated.float().mean().item()},
    )
