"""The one entry point every backend calls: :func:`compute_policy_loss`.

It validates the tensors, builds a float32 :class:`LossBatch`, runs the registered kernel, applies
rollout IS weights and correction masks, aggregates, and attaches the weight diagnostics.
"""

from __future__ import annotations

from typing import Any

import torch

from vespo.losses.aggregation import aggregate_loss, normalize_agg_mode
from vespo.losses.corrections import rollout_correction
from vespo.losses.diagnostics import weight_diagnostics
from vespo.losses.numerics import LOG_RATIO_CLAMP, LOG_W_FLOOR, clamped_log_ratio, masked_fill_zero
from vespo.losses.registry import get_loss_spec
from vespo.losses.types import KernelOutput, LossBatch, LossOutput


def _check_2d(name: str, x: Any, shape: torch.Size | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [batch, response_length], got {tuple(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but log_prob has shape {tuple(shape)}")
    return x


def _check_finite(name: str, x: torch.Tensor, mask: torch.Tensor) -> None:
    if not torch.isfinite(masked_fill_zero(x.detach(), mask)).all():
        raise ValueError(f"{name} has NaN or Inf on valid (unmasked) tokens")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bf16/fp32 inputs; float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _token_advantages(advantages: Any, shape: torch.Size) -> torch.Tensor:
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    b, t = shape
    if advantages.shape == shape:
        return advantages
    if advantages.shape in ((b,), (b, 1)):
        return advantages.reshape(b, 1).expand(b, t)
    raise ValueError(
        f"advantages must have shape [{b}, {t}] (per token) or [{b}] (per sequence), "
        f"got {tuple(advantages.shape)}"
    )


def _first_valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] value of ``x`` at each row's first valid position (0 for empty rows)."""
    first = mask.to(torch.int8).argmax(-1, keepdim=True)
    return torch.where(mask.any(-1), x.gather(-1, first).squeeze(-1), torch.zeros((), dtype=x.dtype))


def _rollout_terms(
    weights: torch.Tensor, mask: torch.Tensor, shape: torch.Size, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token multiplier [B, T] (1 where masked) and sequence log-weight [B] from IS weights."""
    b, t = shape
    w = weights.detach().to(dtype)
    if w.shape == (b, 1):
        w = w.reshape(b)
    if w.shape == shape:
        valid_w = masked_fill_zero(w, mask)
        if not torch.isfinite(valid_w).all() or (valid_w < 0).any():
            raise ValueError("rollout_is_weights must be finite and non-negative on valid tokens")
        token = torch.where(mask, w, torch.ones((), dtype=dtype))
        log_w = torch.log(token.clamp_min(1e-8)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return token, masked_fill_zero(log_w, mask).sum(-1)
    if w.shape == (b,):
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("rollout_is_weights must be finite and non-negative")
        seq_log = torch.log(w.clamp_min(1e-8)).clamp(LOG_W_FLOOR, LOG_RATIO_CLAMP)
        return w.unsqueeze(-1).expand(b, t), seq_log
    raise ValueError(
        f"rollout_is_weights must have shape [{b}, {t}] (per token) or [{b}] (per sequence), "
        f"got {tuple(weights.shape)}"
    )


def build_loss_batch(
    *,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is_weights: torch.Tensor | None = None,
) -> LossBatch:
    """Validate inputs and convert them into a float32 (or float64) :class:`LossBatch`."""
    log_prob = _check_2d("log_prob", log_prob, None)
    old_log_prob = _check_2d("old_log_prob", old_log_prob, log_prob.shape)
    response_mask = _check_2d("response_mask", response_mask, log_prob.shape)
    mask = response_mask.bool()
    if not mask.any():
        raise ValueError("response_mask has no valid token in the whole batch")
    dtype = _compute_dtype(log_prob)
    adv = _token_advantages(advantages, log_prob.shape).detach().to(dtype)
    _check_finite("log_prob", log_prob, mask)
    _check_finite("old_log_prob", old_log_prob, mask)
    _check_finite("advantages", adv, mask)

    lp = log_prob.to(dtype)
    olp = old_log_prob.detach().to(dtype)
    rollout_weight = rollout_seq_log_w = None
    if rollout_is_weights is not None:
        if not isinstance(rollout_is_weights, torch.Tensor):
            raise ValueError("rollout_is_weights must be a torch.Tensor")
        rollout_weight, rollout_seq_log_w = _rollout_terms(rollout_is_weights, mask, log_prob.shape, dtype)
    return LossBatch(
        log_prob=lp,
        old_log_prob=olp,
        token_advantages=masked_fill_zero(adv, mask),
        seq_advantages=_first_valid(adv, mask),
        mask=mask,
        lengths=mask.sum(-1).to(dtype),
        log_ratio=clamped_log_ratio(lp, olp, mask),
        rollout_weight=rollout_weight,
        rollout_seq_log_w=rollout_seq_log_w,
    )


def compute_loss_terms(
    name: str,
    batch: LossBatch,
    **params: Any,
) -> KernelOutput:
    """Run loss ``name`` on a prepared batch and apply rollout weights it did not consume.

    Returns the kernel output with ``loss_mat`` ready for aggregation. Integrations that have their
    own aggregation (verl's ``agg_loss``) call this instead of :func:`compute_policy_loss`.
    """
    spec = get_loss_spec(name)
    values = spec.resolve(params)
    out = spec.kernel(batch, **values)
    if batch.rollout_weight is not None and not out.uses_rollout_is:
        out.loss_mat = out.loss_mat * batch.rollout_weight
    out.loss_mat = masked_fill_zero(out.loss_mat, batch.mask)
    return out


def compute_policy_loss(
    name: str,
    *,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    rollout_is_weights: torch.Tensor | None = None,
    rollout_log_prob: torch.Tensor | None = None,
    correction: str | None = None,
    correction_high: float | None = None,
    correction_low: float | None = None,
    global_num_tokens: float | int | torch.Tensor | None = None,
    global_num_seqs: float | int | torch.Tensor | None = None,
    norm_length: float | int | None = None,
    **params: Any,
) -> LossOutput:
    """Policy loss ``name`` on one (micro-)batch, with diagnostics.

    Args:
        name: a registered loss (see :func:`vespo.losses.list_losses`).
        log_prob: [B, T] log pi_theta of the sampled tokens, with grad (any float dtype).
        old_log_prob: [B, T] log-probs the ratio is taken against (pi_old, or mu when the sampler's
            log-probs are used directly).
        advantages: [B, T] per token or [B] per sequence.
        response_mask: [B, T] 1/True on tokens that count.
        loss_agg_mode: token-mean | token-sum | seq-mean-token-mean | seq-mean-token-sum |
            token-sum-norm (alias seq-mean-token-sum-norm).
        rollout_is_weights: precomputed pi_old/mu weights, [B, T] or [B] (verl's convention):
            folded into log W by ``vespo``, multiplied into the per-token loss by other losses.
        rollout_log_prob: [B, T] the sampler's log-probs mu; with ``correction`` the weights
            are computed here (see :mod:`vespo.losses.corrections`).
        correction: none | token_tis | seq_tis | token_mis | seq_mis | icepop.
        correction_high, correction_low: the correction's bounds (defaults: 2 and 0; IcePop 5, 0.5).
        global_num_tokens, global_num_seqs: counts over the whole optimizer batch so that
            micro-batch losses add up to the full-batch loss.
        norm_length: the constant length of ``token-sum-norm`` (default: the padded length T).
        **params: the loss's own parameters (unknown names raise ValueError).
    """
    spec = get_loss_spec(name)
    spec.resolve(params)  # fail on bad parameters before touching tensors
    loss_agg_mode = normalize_agg_mode(loss_agg_mode)

    extra_metrics: dict[str, float] = {}
    mask_tensor = response_mask
    if rollout_log_prob is not None or correction is not None:
        if rollout_log_prob is None:
            raise ValueError(f"correction='{correction}' needs rollout_log_prob (the sampler's log-probs)")
        if rollout_is_weights is not None:
            raise ValueError("give either rollout_is_weights or rollout_log_prob, not both")
        _check_2d("rollout_log_prob", rollout_log_prob, _check_2d("log_prob", log_prob, None).shape)
        _check_2d("old_log_prob", old_log_prob, log_prob.shape)
        _check_2d("response_mask", response_mask, log_prob.shape)
        if response_mask.bool().any():
            _check_finite("rollout_log_prob", rollout_log_prob, response_mask.bool())
        corr = rollout_correction(
            old_log_prob.detach(),
            rollout_log_prob.detach(),
            response_mask,
            correction or "none",
            high=correction_high,
            low=correction_low,
        )
        rollout_is_weights = corr.weights
        mask_tensor = corr.mask
        extra_metrics.update(corr.metrics)
        if not mask_tensor.any():
            raise ValueError(f"correction '{correction}' rejected every token of the batch")
    elif correction_high is not None or correction_low is not None:
        raise ValueError("correction_high/correction_low need correction= and rollout_log_prob=")

    batch = build_loss_batch(
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        response_mask=mask_tensor,
        rollout_is_weights=rollout_is_weights,
    )
    out = compute_loss_terms(name, batch, **params)
    loss = aggregate_loss(
        out.loss_mat,
        batch.mask,
        loss_agg_mode,
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
        norm_length=norm_length,
    )
    loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)

    valid_seq = batch.mask.any(-1)
    total_log_w = out.seq_log_w
    stale = mismatch = None
    if batch.rollout_seq_log_w is not None:
        stale, mismatch = batch.seq_log_ratio, batch.rollout_seq_log_w
        if not out.uses_rollout_is:
            total_log_w = (total_log_w + mismatch).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    metrics = {"loss/value": float(loss.detach())}
    metrics.update(out.metrics)
    metrics.update(
        weight_diagnostics(
            seq_log_w=total_log_w,
            seq_weight=out.seq_weight,
            seq_advantages=batch.seq_advantages,
            valid_seq=valid_seq,
            token_log_ratio=batch.log_ratio.detach(),
            mask=batch.mask,
            kernel_mode=out.kernel_mode,
            stale_log_w=stale,
            mismatch_log_w=mismatch,
        )
    )
    metrics.update(extra_metrics)
    return LossOutput(loss=loss.to(log_prob.dtype) if log_prob.dtype == torch.float64 else loss,
                      metrics=metrics, loss_mat=out.loss_mat, mask=batch.mask)
