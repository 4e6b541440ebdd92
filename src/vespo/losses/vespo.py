"""VESPO: variational sequence-level soft policy optimisation (arXiv 2602.10693).

The gradient (Eq. 20) weights every sequence's score function by a smooth kernel of the
unnormalised sequence importance ratio W = pi_theta(y) / mu(y) = prod_t rho_t (Eq. 5):

    grad J = E_mu[ phi(W) * A * grad log pi_theta(y) ],   phi(W) = W^c1 * exp(c2 * (1 - W))

with (c1, c2) = (k_pos, lambda_pos) = (2, 3) when A >= 0 and (k_neg, lambda_neg) = (3, 2) when A < 0
(§3.4). phi is evaluated in log space, log phi = c2 + c1 log W - c2 W, and detached; the loss is
-phi * A * log pi per token, aggregated like any other loss.
"""

from __future__ import annotations

import math

import torch

from vespo.losses.numerics import LOG_RATIO_CLAMP, LOG_W_FLOOR
from vespo.losses.registry import Param, register_policy_loss
from vespo.losses.types import KernelOutput, LossBatch

_C1_NOTE = "the variance bound of Prop. 3.1 needs c1 >= 1"


def vespo_log_phi(log_w: torch.Tensor, c1: torch.Tensor | float, c2: torch.Tensor | float) -> torch.Tensor:
    """log phi(W) = c2 + c1 * log W - c2 * W  (shifted Eq. 17, phi(1) = 1), from log W.

    ``log_w`` is clamped to [-20, 20] first; inside the power term it is floored at log 1e-8
    as in the released code. The result is finite for every finite input.
    """
    log_w = log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    w = torch.exp(log_w)
    return c2 + c1 * log_w.clamp_min(LOG_W_FLOOR) - c2 * w


def vespo_phi(w: torch.Tensor | float, c1: float = 2.0, c2: float = 3.0) -> torch.Tensor:
    """phi(W) = W^c1 * exp(c2 (1 - W)) for W > 0 (computed in log space)."""
    w = torch.as_tensor(w, dtype=torch.float64)
    log_w = torch.log(w.clamp_min(1e-300))
    return torch.exp(vespo_log_phi(log_w, c1, c2)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def kernel_mode(c1: float, c2: float) -> float:
    """W** = c1 / c2, where phi attains its maximum (Prop. C.1)."""
    return c1 / c2


def kernel_max(c1: float, c2: float) -> float:
    """sup_W phi(W) = (c1/c2)^c1 * exp(c2 - c1) (Prop. C.1)."""
    return (c1 / c2) ** c1 * math.exp(c2 - c1)


def variance_constant(c1: float, c2: float) -> float:
    """K = sup_{w>0} phi(w)/w (Eq. 19): ((c1-1)/c2)^(c1-1) exp(c2-c1+1) for c1 > 1, e^c2 at c1 = 1."""
    if c1 < 1:
        return math.inf
    if c1 == 1:
        return math.exp(c2)
    return ((c1 - 1) / c2) ** (c1 - 1) * math.exp(c2 - c1 + 1)


@register_policy_loss(
    "vespo",
    level="sequence",
    summary="smooth sequence-level kernel phi(W) = W^c1 exp(c2 (1 - W)) on A * grad log pi",
    reference="VESPO (arXiv 2602.10693) Eq. 17/20; defaults from the released recipe",
    params={
        "k_pos": Param(2.0, "c1 for A >= 0", low=1.0, note=_C1_NOTE),
        "lambda_pos": Param(3.0, "c2 for A >= 0", low=0.0, low_open=True),
        "k_neg": Param(3.0, "c1 for A < 0", low=1.0, note=_C1_NOTE),
        "lambda_neg": Param(2.0, "c2 for A < 0", low=0.0, low_open=True),
        "is_mode": Param(
            "joint",
            "rollout IS weights: 'joint' folds log(pi_old/mu) into log W before phi (released "
            "code); 'factorised' keeps them outside phi as a separate truncated weight",
            choices=("joint", "factorised"),
        ),
        "is_clip": Param(2.0, "upper truncation of the rollout IS weight in 'factorised' mode", low=0.0, low_open=True),
        "length_norm": Param(
            "none",
            "divide log W by 1, sqrt(T) or T before phi (the paper's Fig. 6 ablation)",
            choices=("none", "sqrt", "linear"),
        ),
    },
)
def vespo_loss(
    batch: LossBatch,
    *,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
    is_mode: str,
    is_clip: float,
    length_norm: str,
) -> KernelOutput:
    """VESPO: -phi(W) * A * log pi with phi on the true-product sequence ratio."""
    seq_log_w = batch.seq_log_ratio  # [B] sum_t log(pi_theta/pi_old), detached (Eq. 5 in log space)
    rollout = batch.rollout_seq_log_w
    if rollout is not None and is_mode == "joint":
        seq_log_w = seq_log_w + rollout  # log W = log(pi_theta/pi_old) + log(pi_old/mu)
    if length_norm == "sqrt":
        seq_log_w = seq_log_w / batch.lengths.clamp_min(1.0).sqrt()
    elif length_norm == "linear":
        seq_log_w = seq_log_w / batch.lengths.clamp_min(1.0)
    seq_log_w = seq_log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)

    positive = batch.seq_advantages >= 0  # A = 0 takes the positive branch
    # full_like keeps float64 inputs exact (torch.where on Python floats would give float32)
    c1 = torch.full_like(seq_log_w, k_neg).masked_fill_(positive, k_pos)
    c2 = torch.full_like(seq_log_w, lambda_neg).masked_fill_(positive, lambda_pos)
    log_phi = vespo_log_phi(seq_log_w, c1, c2)  # Eq. 17 shifted so that phi(1) = 1
    phi = torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).detach()

    # Eq. 20: loss = -phi * A * log pi, so grad = phi * A * grad log pi. The coefficient on log pi
    # is per sequence unless the advantages are per token or a factorised rollout weight applies.
    if batch.rollout_weight is not None and is_mode == "factorised":
        coeff = -(phi.unsqueeze(-1) * batch.token_advantages) * batch.rollout_weight.clamp(max=is_clip)
    elif batch.advantages.dim() == 2:
        coeff = -(phi.unsqueeze(-1) * batch.token_advantages)
    else:
        coeff = -(phi * batch.seq_advantages)
    return KernelOutput(
        loss_mat=None,
        logp_coeff=coeff,
        seq_log_w=seq_log_w.detach(),
        seq_weight=phi,
        uses_rollout_is=rollout is not None,
        kernel_mode=c1 / c2,
    )
