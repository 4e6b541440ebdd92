"""Diagnostics of the importance weight a loss actually uses, computed without grad.

All keys are plain floats, named as in the design doc:

- ``is/log_w_{mean,std,min,max}``, ``is/abs_log_w_mean``: log W over valid sequences;
- ``is/log_w_{pos,neg}_p{10,50,90}``: its quantiles split by sign(A) (only for signs present);
- ``is/ess``: normalised ESS of W, (sum W)^2 / (n sum W^2), from log W;
- ``phi/{mean,min,max}``, ``phi/ess``: the effective per-sequence weight phi on A * grad log pi;
- ``phi/frac_below_0.01``: share of sequences whose weight is below 0.01 (effectively dropped);
- ``phi/top10_share``: share of total phi mass held by the top 10% of sequences;
- ``is/frac_beyond_mode``: share of sequences with W beyond the kernel's mode c1/c2 (VESPO);
- ``is/log_w_{stale,mismatch}_{mean,abs_mean}``: log W split into log(pi_theta/pi_old) and
  log(pi_old/mu) when rollout IS weights were given;
- ``is/token_kl``: mean over tokens of log(pi_old/pi_theta) (k1 estimate of the drift).
"""

from __future__ import annotations

import math

import torch

from vespo.losses.numerics import masked_mean, normalized_ess, normalized_ess_from_log

_QUANTILES = (0.1, 0.5, 0.9)


@torch.no_grad()
def weight_diagnostics(
    *,
    seq_log_w: torch.Tensor,
    seq_weight: torch.Tensor,
    seq_advantages: torch.Tensor,
    valid_seq: torch.Tensor,
    token_log_ratio: torch.Tensor | None,
    mask: torch.Tensor,
    kernel_mode: torch.Tensor | None = None,
    stale_log_w: torch.Tensor | None = None,
    mismatch_log_w: torch.Tensor | None = None,
    token_kl: torch.Tensor | float | None = None,
) -> dict[str, float]:
    """Diagnostics for one batch; see the module docstring for the keys.

    ``is/token_kl`` is the masked mean of ``-token_log_ratio``; a caller that already has the
    per-sequence sums of the log-ratio passes the value as ``token_kl`` (and may give
    ``token_log_ratio=None``) to skip that [B, T] pass.
    """
    log_w = seq_log_w[valid_seq].double()
    phi = seq_weight[valid_seq].double()
    adv = seq_advantages[valid_seq]
    n = log_w.numel()
    stats: dict[str, torch.Tensor] = {
        "is/log_w_mean": log_w.mean(),
        "is/log_w_std": log_w.std(unbiased=False),
        "is/log_w_min": log_w.min(),
        "is/log_w_max": log_w.max(),
        "is/abs_log_w_mean": log_w.abs().mean(),
        "is/ess": normalized_ess_from_log(log_w),
        "is/token_kl": (
            masked_mean(-token_log_ratio.double(), mask) if token_kl is None else torch.as_tensor(token_kl)
        ),
        "phi/mean": phi.mean(),
        "phi/min": phi.min(),
        "phi/max": phi.max(),
        "phi/ess": normalized_ess(phi),
        "phi/frac_below_0.01": (phi < 0.01).double().mean(),
    }
    top = max(1, math.ceil(0.1 * n))
    total = phi.sum()
    stats["phi/top10_share"] = phi.topk(top).values.sum() / total if total > 0 else torch.tensor(0.0)
    for sign, selector in (("pos", adv >= 0), ("neg", adv < 0)):
        if selector.any():
            q = torch.quantile(log_w[selector], torch.tensor(_QUANTILES, dtype=log_w.dtype, device=log_w.device))
            for level, value in zip(_QUANTILES, q):
                stats[f"is/log_w_{sign}_p{int(level * 100)}"] = value
    if kernel_mode is not None:
        stats["is/frac_beyond_mode"] = (log_w > torch.log(kernel_mode[valid_seq].double())).double().mean()
    for name, part in (("stale", stale_log_w), ("mismatch", mismatch_log_w)):
        if part is not None:
            part = part[valid_seq].double()
            stats[f"is/log_w_{name}_mean"] = part.mean()
            stats[f"is/log_w_{name}_abs_mean"] = part.abs().mean()
    keys = list(stats)
    # some fallbacks above are CPU scalars: put everything on one device before the single sync
    values = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64, device=log_w.device) for k in keys]).tolist()
    return {k: float(v) for k, v in zip(keys, values)}
