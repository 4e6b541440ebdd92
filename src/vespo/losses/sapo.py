"""SAPO (arXiv 2511.20347): soft, temperature-controlled gate on the token ratio.

Per token: L_t = -f(rho_t) * A with f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos if A > 0
else tau_neg. The weight on A * grad log pi is r f'(r) = 4 r s (1 - s), s = sigmoid(tau (r - 1)),
which equals 1 at r = 1 and decays smoothly on both sides.
"""

from __future__ import annotations

import torch

from vespo.losses.numerics import masked_mean
from vespo.losses.registry import Param, register_policy_loss
from vespo.losses.types import KernelOutput, LossBatch


@register_policy_loss(
    "sapo",
    summary="soft sigmoid gate on token ratios, separate temperatures by sign(A)",
    reference="VESPO paper §4.1: tau_pos 1.0, tau_neg 1.05",
    params={
        "tau_pos": Param(1.0, "gate temperature for A > 0", low=0.0, low_open=True),
        "tau_neg": Param(1.05, "gate temperature for A <= 0", low=0.0, low_open=True),
    },
)
def sapo_loss(batch: LossBatch, *, tau_pos: float, tau_neg: float) -> KernelOutput:
    """SAPO: -(4/tau) sigmoid(tau (rho - 1)) * A per token."""
    adv = batch.token_advantages
    ratio = torch.exp(batch.log_ratio)
    # full precision for float64 inputs: torch.where on two Python floats would give float32
    tau = torch.full_like(ratio, tau_neg).masked_fill_(adv > 0, tau_pos)
    gate_logit = tau * (ratio - 1.0)
    loss_mat = -torch.sigmoid(gate_logit) * (4.0 / tau) * adv
    s = torch.sigmoid(gate_logit.detach())
    token_weight = 4.0 * ratio.detach() * s * (1.0 - s)
    return KernelOutput(
        loss_mat=loss_mat,
        seq_log_w=batch.seq_log_ratio,
        seq_weight=masked_mean(token_weight, batch.mask, dim=-1),
        token_weight=token_weight,
    )
