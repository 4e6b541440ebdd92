"""Skip the training forward of sequences whose advantage is zero (``algorithm.skip_zero_advantage``).

A group whose G responses all get the same reward has advantage A = 0 for every response
(A = (r - mean) / std with r = mean). Every loss of the library multiplies its gradient by A
(Eq. 20 for vespo: grad = phi(W) * A * grad log pi), so such a sequence adds nothing to the gradient;
it only counts in the loss's normaliser (the mini-batch's token or sequence count, which the trainer
passes as ``global_num_tokens`` / ``global_num_seqs``). With sparse rewards most groups are like this:
on SmolLM2 at ~8 % reward, 50-75 % of the sequences of a step (``reward/informative_group_frac``).

With the option on, the trainer runs forward and backward only on the rows returned by
:func:`rows_with_gradient` and keeps the whole mini-batch's counts as the normaliser, so the
gradient, and therefore the update, is the same as without it (tested). What changes is what the
per-step diagnostics describe: ``policy/entropy`` and the ``is/``, ``phi/``, ``stale/`` and
``mismatch/`` metrics are then computed on the sequences that carry gradient only
(``perf/skipped_seq_frac`` says how many were left out).

A loss whose gradient does not vanish at A = 0 (a custom loss with a KL or entropy term, say) would
be changed by skipping; :func:`check_zero_advantage_skip` runs a small exactness check of the
configured loss and refuses the option for it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["check_zero_advantage_skip", "rows_with_gradient"]


def rows_with_gradient(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """[k] indices of the sequences with a nonzero advantage on some response token.

    ``advantages`` is [B] (one per sequence) or [B, T] (per token; only response tokens count).
    Non-finite advantages count as nonzero, so the loss's own checks still see them.
    """
    adv = advantages.detach()
    if adv.dim() == 1:
        nonzero = adv != 0
    else:
        nonzero = ((adv != 0) & response_mask.bool()).any(-1)
    has_tokens = response_mask.bool().any(-1)
    return torch.nonzero(nonzero & has_tokens, as_tuple=False).flatten()


def check_zero_advantage_skip(loss: str, loss_params: dict[str, Any], loss_agg_mode: str) -> None:
    """Raise ValueError unless dropping A = 0 rows leaves the loss's gradient unchanged.

    On a small float64 batch (6 sequences of varied length, two with A = 0) the gradient of the kept
    rows from the whole batch and from the kept rows alone, with the whole batch's counts as the
    normaliser, must agree to 1e-9, and the A = 0 rows' gradient must be exactly zero. Statistics a
    loss takes over the whole batch (``vespo_adaptive``'s alpha) are passed in from the whole batch,
    as the trainer's pre-pass does.
    """
    from vespo.losses import compute_policy_loss

    gen = torch.Generator().manual_seed(0)
    b, t = 6, 9
    lengths = torch.tensor([9, 4, 7, 2, 9, 5])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    old = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 2.0
    log_prob = old + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    adv[[1, 4]] = 0.0
    n_tokens, n_seqs = float(mask.sum()), float(b)
    keep = rows_with_gradient(adv, mask)

    extra: dict[str, Any] = {}
    if loss == "vespo_adaptive":
        from vespo.losses import vespo_adaptive_batch_stats, vespo_adaptive_seq_inputs

        seq = vespo_adaptive_seq_inputs(log_prob=log_prob, old_log_prob=old, advantages=adv, response_mask=mask)
        extra["batch_stats"] = vespo_adaptive_batch_stats(*seq, **loss_params)

    def grad(rows: Tensor) -> Tensor:
        lp = log_prob[rows].clone().requires_grad_(True)
        out = compute_policy_loss(
            loss,
            log_prob=lp,
            old_log_prob=old[rows],
            advantages=adv[rows],
            response_mask=mask[rows],
            loss_agg_mode=loss_agg_mode,
            global_num_tokens=n_tokens,
            global_num_seqs=n_seqs,
            norm_length=t,
            **loss_params,
            **extra,
        )
        out.loss.backward()
        assert lp.grad is not None
        return lp.grad

    full = grad(torch.arange(b))
    kept = grad(keep)
    dropped = torch.ones(b, dtype=torch.bool)
    dropped[keep] = False
    exact = bool((full[dropped] == 0).all()) and torch.allclose(kept, full[keep], rtol=1e-9, atol=1e-12)
    if not exact:
        raise ValueError(
            f"algorithm.skip_zero_advantage: loss '{loss}' (loss_agg_mode={loss_agg_mode}) gives gradient to "
            "sequences with zero advantage, so skipping them would change the update; set it to false"
        )
