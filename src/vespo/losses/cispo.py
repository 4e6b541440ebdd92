"""CISPO (MiniMax-M1, arXiv 2506.13585): clipped IS weight as a stop-gradient REINFORCE coefficient.

Per token: L_t = -sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) * A * log pi_theta(y_t), so no token's
gradient is dropped; only the size of its weight is bounded.
"""

from __future__ import annotations

import torch

from vespo.losses.numerics import masked_mean
from vespo.losses.registry import Param, register_policy_loss
from vespo.losses.types import KernelOutput, LossBatch


@register_policy_loss(
    "cispo",
    summary="stop-gradient clipped token ratio times A * log pi",
    reference="MiniMax-M1: no lower bound (eps_low = 1); upper bound rho <= 5 as in TRL's ScaleRL default",
    params={
        "eps_low": Param(1.0, "lower clip: rho >= 1 - eps_low (1 disables it)", low=0.0, high=1.0),
        "eps_high": Param(4.0, "upper clip: rho <= 1 + eps_high", low=0.0),
    },
)
def cispo_loss(batch: LossBatch, *, eps_low: float, eps_high: float) -> KernelOutput:
    """CISPO: -sg(clip(rho)) * A * log pi per token."""
    ratio = torch.exp(batch.log_ratio.detach())
    weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    coeff = -weight * batch.token_advantages  # loss = coeff * log pi on valid tokens
    return KernelOutput(
        loss_mat=None,
        logp_coeff=coeff,
        seq_log_w=batch.seq_log_ratio,
        seq_weight=masked_mean(weight, batch.mask, dim=-1),
        token_weight=weight,
        metrics={"loss/clip_frac": masked_mean((weight != ratio).float(), batch.mask).item()},
    )
