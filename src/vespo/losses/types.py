"""Typed inputs and outputs shared by every policy loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from vespo.losses.numerics import LOG_RATIO_CLAMP


@dataclass(frozen=True)
class LossBatch:
    """Validated loss inputs, all float32 (float64 stays float64) on one device.

    Shapes: ``B`` sequences, ``T`` response positions. Every tensor is finite everywhere: NaN or
    Inf sitting under the mask is replaced by 0 when the batch is built, so masking by
    multiplication with ``mask_f`` is exact. The per-token views (``token_advantages``,
    ``log_ratio``, ``seq_log_ratio``) are computed on first use and cached, so a loss that never
    needs a [B, T] quantity does not pay for it.

    Attributes:
        log_prob: [B, T] log pi_theta of each sampled token (carries the gradient).
        old_log_prob: [B, T] log-probs of the policy the ratio is taken against (pi_old or mu).
        advantages: [B] per-sequence or [B, T] per-token advantages as given (detached).
        seq_advantages: [B] advantage of each sequence: the value at its first valid token
            (0 for a sequence without valid tokens).
        mask: [B, T] bool, True on response tokens that count.
        mask_f: [B, T] the mask as 0/1 in the compute dtype.
        lengths: [B] float number of valid tokens per sequence.
        seq_log_ratio: [B] log W_stale = sum over valid tokens of clamp(log_prob - old_log_prob,
            -20, 20) (true product, no 1/T), detached.
        rollout_weight: [B, T] rollout IS weight (pi_old/mu) applied to each token (a per-sequence
            weight is broadcast), 1 where masked; ``None`` when no weights were given.
        rollout_seq_log_w: [B] log of the sequence's rollout IS weight: sum over valid tokens of
            clamp(log max(w_t, 1e-8), -20, 20) for token weights, or the log of a per-sequence
            weight; ``None`` when no weights were given.
    """

    log_prob: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    seq_advantages: torch.Tensor
    mask_f: torch.Tensor
    lengths: torch.Tensor
    seq_log_ratio: torch.Tensor
    rollout_weight: torch.Tensor | None
    rollout_seq_log_w: torch.Tensor | None
    #: a free [B, T] buffer of the compute dtype that the aggregation may overwrite (saves one
    #: allocation of the batch's size); ``None`` if there is none.
    scratch: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @cached_property
    def mask(self) -> torch.Tensor:
        """[B, T] bool, True on valid tokens (the input mask itself when it was bool)."""
        return self.mask_f != 0

    @cached_property
    def token_advantages(self) -> torch.Tensor:
        """[B, T] advantage per token, 0 where masked."""
        adv = self.advantages if self.advantages.dim() == 2 else self.advantages.unsqueeze(-1)
        return adv * self.mask_f

    @cached_property
    def log_ratio(self) -> torch.Tensor:
        """[B, T] clamp(log_prob - old_log_prob, -20, 20), zero where masked (has grad)."""
        diff = (self.log_prob - self.old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return diff * self.mask_f


@dataclass
class KernelOutput:
    """What a loss kernel returns before aggregation.

    A kernel gives its per-token loss in one of two forms:

    - ``loss_mat``: [B, T] per-token loss with grad (masked positions are ignored later); or
    - ``logp_coeff``: the detached coefficient c on log pi, [B] (one per sequence) or [B, T],
      meaning loss_mat = c * log_prob on valid tokens. REINFORCE-style losses (VESPO, CISPO,
      REINFORCE, seq_clip, TOPR) use it: the loss is then aggregated from per-sequence dot
      products without materialising the [B, T] matrix. :func:`vespo.losses.compute_loss_terms`
      always fills ``loss_mat``.

    Attributes:
        loss_mat: [B, T] per-token loss, or ``None`` when ``logp_coeff`` is given.
        seq_log_w: [B] the sequence log-weight the kernel looked at (detached), for diagnostics.
        seq_weight: [B] the effective weight on A * grad log pi per sequence, phi in the paper's
            REINFORCE view (detached). Token-level losses report the masked mean over tokens.
        token_weight: [B, T] the effective per-token coefficient phi_t (detached) or ``None``.
        metrics: extra loss-specific scalars (clip fractions, ...).
        uses_rollout_is: True when the kernel consumed ``rollout_is_weights`` itself (VESPO
            folds them into log W); otherwise they multiply the per-token loss afterwards.
        kernel_mode: the sequence weight's maximiser W* = c1/c2 per sequence for kernels that
            have one (VESPO), else ``None``.
        logp_coeff: see above; ``None`` for kernels that fill ``loss_mat``.
        token_factor: with a [B] ``logp_coeff``, an optional detached [B, T] per-token multiplier,
            0 on masked tokens: loss_mat = logp_coeff[b] * token_factor[b, t] * log_prob. The
            aggregation uses it in place of the mask, so it costs no extra [B, T] product.
    """

    loss_mat: torch.Tensor | None
    seq_log_w: torch.Tensor
    seq_weight: torch.Tensor
    token_weight: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    uses_rollout_is: bool = False
    kernel_mode: torch.Tensor | None = None
    logp_coeff: torch.Tensor | None = None
    token_factor: torch.Tensor | None = None


class LossOutput:
    """Result of :func:`vespo.losses.compute_policy_loss`.

    Attributes:
        loss: scalar loss with grad (aggregated with the requested mode).
        metrics: plain floats: ``loss/...``, ``is/...``, ``phi/...`` and ``mismatch/...`` keys.
        loss_mat: [B, T] per-token loss before aggregation, after rollout weights and masks
            (built on first access for losses that aggregate without it).
        mask: [B, T] the mask used in aggregation (the response mask, minus tokens or
            sequences rejected by a masking correction).
    """

    def __init__(
        self,
        loss: torch.Tensor,
        metrics: dict[str, float],
        loss_mat: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        loss_mat_fn: Callable[[], torch.Tensor] | None = None,
        mask_fn: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        if loss_mat is None and loss_mat_fn is None:
            raise ValueError("LossOutput needs loss_mat or loss_mat_fn")
        if mask is None and mask_fn is None:
            raise ValueError("LossOutput needs mask or mask_fn")
        self.loss = loss
        self.metrics = metrics
        self._mask = mask
        self._mask_fn = mask_fn
        self._loss_mat = loss_mat
        self._loss_mat_fn = loss_mat_fn

    @property
    def mask(self) -> torch.Tensor:
        if self._mask is None:
            assert self._mask_fn is not None
            self._mask = self._mask_fn()
            self._mask_fn = None
        return self._mask

    @property
    def loss_mat(self) -> torch.Tensor:
        if self._loss_mat is None:
            assert self._loss_mat_fn is not None
            self._loss_mat = self._loss_mat_fn()
            self._loss_mat_fn = None
        return self._loss_mat

    def __repr__(self) -> str:
        return f"LossOutput(loss={self.loss!r}, metrics={len(self.metrics)} keys)"
