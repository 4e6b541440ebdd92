"""GRPO / PPO clipped surrogate with asymmetric bounds and dual clip (token level).

Per token, with rho_t = pi_theta / pi_old (Eq. 7 of the VESPO paper; PPO, DAPO, dual-clip PPO):

    L_t = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high))
    L_t = min(L_t, -A * clip_c)            if A < 0   (dual clip, arXiv 1912.09729)

so the gradient weight on A * grad log pi is rho_t inside the trust region and 0 where clipped.
"""

from __future__ import annotations

import torch

from vespo.losses.numerics import masked_mean
from vespo.losses.registry import Param, register_policy_loss
from vespo.losses.types import KernelOutput, LossBatch


@register_policy_loss(
    "grpo",
    summary="PPO clip on token ratios, asymmetric bounds and dual clip",
    reference="VESPO paper §4.1 (DAPO clip-higher 0.2/0.28); dual clip c = 10 from the baseline scripts",
    params={
        "eps_low": Param(0.2, "lower clip: rho >= 1 - eps_low", low=0.0, high=1.0),
        "eps_high": Param(0.28, "upper clip: rho <= 1 + eps_high", low=0.0),
        "clip_c": Param(10.0, "dual-clip bound for A < 0 (> 1)", low=1.0, low_open=True),
    },
)
def grpo_loss(batch: LossBatch, *, eps_low: float, eps_high: float, clip_c: float) -> KernelOutput:
    """GRPO/PPO: -min(rho A, clip(rho) A) per token, with dual clip for A < 0."""
    adv = batch.token_advantages
    ratio = torch.exp(batch.log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = torch.minimum(loss_ppo, -adv * clip_c)
    negative = adv < 0
    loss_mat = torch.where(negative, loss_dual, loss_ppo)

    clipped = loss_clipped > loss_unclipped
    dual_clipped = negative & (loss_ppo > -adv * clip_c)
    active = ~(clipped | dual_clipped)
    token_weight = (ratio.detach() * active).to(ratio.dtype)
    return KernelOutput(
        loss_mat=loss_mat,
        seq_log_w=batch.seq_log_ratio,
        seq_weight=masked_mean(token_weight, batch.mask, dim=-1),
        token_weight=token_weight,
        metrics={
            "loss/clip_frac": masked_mean(clipped.float(), batch.mask).item(),
            "loss/clip_frac_lower": masked_mean(dual_clipped.float(), batch.mask).item(),
        },
    )
