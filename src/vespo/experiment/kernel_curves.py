"""Effective weight phi(W) of every registered loss, measured through autograd.

In the REINFORCE view of the paper (Eq. 4, Eq. 7) every loss is a weight phi on A * grad log pi.
For a one-token sequence with ratio W, that weight is -d loss / d log pi / A; computing it with
autograd through :func:`vespo.losses.compute_policy_loss` shows what each loss really does,
not what its docstring says.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vespo.losses import compute_policy_loss, list_losses

DEFAULT_TABLE_POINTS: tuple[float, ...] = (0.25, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0)


def effective_weights(name: str, ratios: Sequence[float] | torch.Tensor, advantage: float, **params) -> torch.Tensor:
    """phi(W) of loss ``name`` at each ratio W for a one-token sequence with advantage ``advantage``."""
    w = torch.as_tensor(ratios, dtype=torch.float64).reshape(-1, 1)
    if (w <= 0).any():
        raise ValueError("ratios must be positive")
    if advantage == 0:
        raise ValueError("advantage must be non-zero to read off phi")
    log_prob = torch.log(w).clone().requires_grad_(True)
    old = torch.zeros_like(w)
    adv = torch.full((w.shape[0],), float(advantage), dtype=torch.float64)
    mask = torch.ones_like(w, dtype=torch.bool)
    # token-sum makes d loss / d log pi_b = -phi_b * A exactly, with no batch normaliser.
    out = compute_policy_loss(
        name,
        log_prob=log_prob,
        old_log_prob=old,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode="token-sum",
        **params,
    )
    (grad,) = torch.autograd.grad(out.loss, log_prob)
    return (-grad / advantage).reshape(-1).detach() + 0.0  # + 0.0 turns -0.0 into 0.0


def kernel_table(points: Sequence[float] = DEFAULT_TABLE_POINTS) -> dict[str, dict[str, list[float]]]:
    """{loss: {"A>0": [phi...], "A<0": [phi...]}} at ``points`` for every registered loss."""
    table: dict[str, dict[str, list[float]]] = {}
    for name in list_losses():
        table[name] = {
            "A>0": effective_weights(name, points, 1.0).tolist(),
            "A<0": effective_weights(name, points, -1.0).tolist(),
        }
    return table
