"""Length-normalised (geometric-mean) sequence ratios: GSPO and GMPO.

GSPO (arXiv 2507.18071, Eq. 8 of the VESPO paper): s = (prod_t rho_t)^(1/T), used through its
token form log s_t = sg(log s) + log pi_t - sg(log pi_t), then PPO-clipped with (3e-4, 4e-4).

GMPO (arXiv 2507.20673): per-token log-ratios clipped sign-aware, ratio = exp(mean_t clipped
log rho_t), loss = -A_seq * ratio. The sequence objective is placed on every token of the
sequence, so ``seq-mean-token-mean`` aggregation reproduces the paper (and verl's ``geo_mean``).
"""

from __future__ import annotations

import torch

from vespo.losses.numerics import masked_mean
from vespo.losses.registry import Param, register_policy_loss
from vespo.losses.types import KernelOutput, LossBatch

#: verl clamps the GSPO token log-ratio at 10 before exp.
_GSPO_LOG_MAX = 10.0


@register_policy_loss(
    "gspo",
    level="sequence",
    summary="PPO clip on the geometric-mean sequence ratio (token form)",
    reference="VESPO paper §4.1: clip bounds (3e-4, 4e-4)",
    params={
        "eps_low": Param(3e-4, "lower clip: s >= 1 - eps_low", low=0.0, high=1.0),
        "eps_high": Param(4e-4, "upper clip: s <= 1 + eps_high", low=0.0),
    },
)
def gspo_loss(batch: LossBatch, *, eps_low: float, eps_high: float) -> KernelOutput:
    """GSPO: max(-A s_t, -A clip(s_t)) with s_t = sg(s) pi_t / sg(pi_t)."""
    adv = batch.token_advantages
    log_s = batch.log_ratio.detach().sum(-1) / batch.lengths.clamp_min(1.0)  # [B] (1/T) log W
    log_s_tok = batch.log_prob - batch.log_prob.detach() + log_s.unsqueeze(-1)
    s_tok = torch.exp(log_s_tok.clamp(max=_GSPO_LOG_MAX))
    loss_unclipped = -adv * s_tok
    loss_clipped = -adv * s_tok.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss_mat = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    token_weight = s_tok.detach() * (~clipped)
    return KernelOutput(
        loss_mat=loss_mat,
        seq_log_w=batch.seq_log_ratio,
        seq_weight=masked_mean(token_weight, batch.mask, dim=-1),
        token_weight=token_weight,
        metrics={"loss/clip_frac": masked_mean(clipped.float(), batch.mask).item()},
    )


@register_policy_loss(
    "gmpo",
    level="sequence",
    summary="geometric mean of sign-aware clipped token ratios times the sequence advantage",
    reference="GMPO paper: token clip range (e^-0.4, e^0.4); use seq-mean-token-mean",
    params={
        "clip_low": Param(0.4, "lower clip of the token log-ratio: log rho >= -clip_low", low=0.0),
        "clip_high": Param(0.4, "upper clip of the token log-ratio: log rho <= clip_high", low=0.0),
    },
)
def gmpo_loss(batch: LossBatch, *, clip_low: float, clip_high: float) -> KernelOutput:
    """GMPO: -A_seq * exp(mean_t sign-aware-clipped log rho_t)."""
    adv = batch.token_advantages
    log_ratio = batch.log_ratio
    sign = torch.sign(adv)
    clamped = log_ratio.clamp(-clip_low, clip_high)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clamped)  # sign-aware clip
    n = batch.lengths.clamp_min(1.0)
    mean_log = (pessimistic * batch.mask_f).sum(-1) / n  # [B]
    seq_ratio = torch.exp(mean_log)
    seq_adv = (adv * batch.mask_f).sum(-1) / n
    seq_loss = -seq_adv * seq_ratio  # [B]
    loss_mat = seq_loss.unsqueeze(-1).expand_as(log_ratio)
    clipped = log_ratio.detach() != clamped.detach()
    active = sign * log_ratio.detach() <= sign * clamped.detach()
    token_weight = seq_ratio.detach().unsqueeze(-1) * active
    return KernelOutput(
        loss_mat=loss_mat,
        seq_log_w=batch.seq_log_ratio,
        seq_weight=seq_ratio.detach(),
        token_weight=token_weight,
        metrics={
            "loss/clip_frac": masked_mean((clipped & (adv > 0)).float(), batch.mask).item(),
            "loss/clip_frac_lower": masked_mean((clipped & (adv < 0)).float(), batch.mask).item(),
        },
    )
