"""Typed inputs and outputs shared by every policy loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LossBatch:
    """Validated loss inputs, all float32 on one device.

    Shapes: ``B`` sequences, ``T`` response positions.

    Attributes:
        log_prob: [B, T] log pi_theta of each sampled token (carries the gradient).
        old_log_prob: [B, T] log-probs of the policy the ratio is taken against (pi_old or mu).
        token_advantages: [B, T] advantage per token (a per-sequence input is broadcast).
        seq_advantages: [B] advantage of each sequence: the value at its first valid token.
        mask: [B, T] bool, True on response tokens that count.
        lengths: [B] float number of valid tokens per sequence.
        log_ratio: [B, T] clamp(log_prob - old_log_prob, -20, 20), zero where masked (has grad).
        rollout_weight: [B, T] rollout IS weight (pi_old/mu) applied to each token (a per-sequence
            weight is broadcast), 1 where masked; ``None`` when no weights were given.
        rollout_seq_log_w: [B] log of the sequence's rollout IS weight: sum over valid tokens of
            clamp(log max(w_t, 1e-8), -20, 20) for token weights, or the log of a per-sequence
            weight; ``None`` when no weights were given.
    """

    log_prob: torch.Tensor
    old_log_prob: torch.Tensor
    token_advantages: torch.Tensor
    seq_advantages: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    log_ratio: torch.Tensor
    rollout_weight: torch.Tensor | None
    rollout_seq_log_w: torch.Tensor | None

    @property
    def mask_f(self) -> torch.Tensor:
        return self.mask.to(self.log_prob.dtype)

    @property
    def seq_log_ratio(self) -> torch.Tensor:
        """[B] log W_stale = sum_t log(pi_theta/pi_old) over valid tokens (true product, no 1/T)."""
        return self.log_ratio.detach().sum(-1)


@dataclass
class KernelOutput:
    """What a loss kernel returns before aggregation.

    Attributes:
        loss_mat: [B, T] per-token loss (with grad); masked positions are ignored later.
        seq_log_w: [B] the sequence log-weight the kernel looked at (detached), for diagnostics.
        seq_weight: [B] the effective weight on A * grad log pi per sequence, phi in the paper's
            REINFORCE view (detached). Token-level losses report the masked mean over tokens.
        token_weight: [B, T] the effective per-token coefficient phi_t (detached) or ``None``.
        metrics: extra loss-specific scalars (clip fractions, ...).
        uses_rollout_is: True when the kernel consumed ``rollout_is_weights`` itself (VESPO
            folds them into log W); otherwise they multiply ``loss_mat`` afterwards.
        kernel_mode: the sequence weight's maximiser W* = c1/c2 per sequence for kernels that
            have one (VESPO), else ``None``.
    """

    loss_mat: torch.Tensor
    seq_log_w: torch.Tensor
    seq_weight: torch.Tensor
    token_weight: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    uses_rollout_is: bool = False
    kernel_mode: torch.Tensor | None = None


@dataclass
class LossOutput:
    """Result of :func:`vespo.losses.compute_policy_loss`.

    Attributes:
        loss: scalar loss with grad (aggregated with the requested mode).
        metrics: plain floats: ``loss/...``, ``is/...``, ``phi/...`` and ``mismatch/...`` keys.
        loss_mat: [B, T] per-token loss before aggregation, after rollout weights and masks.
        mask: [B, T] the mask used in aggregation (the response mask, minus tokens or
            sequences rejected by a masking correction).
    """

    loss: torch.Tensor
    metrics: dict[str, float]
    loss_mat: torch.Tensor
    mask: torch.Tensor
