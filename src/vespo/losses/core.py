"""The one entry point every backend calls: :func:`compute_policy_loss`.

It validates the tensors, builds a float32 :class:`LossBatch`, runs the registered kernel, applies
rollout IS weights and correction masks, aggregates, and attaches the weight diagnostics.
"""

from __future__ import annotations

from typing import Any

import torch

from vespo.losses.aggregation import aggregate_seq_sums, normalize_agg_mode
from vespo.losses.corrections import rollout_correction
from vespo.losses.diagnostics import weight_diagnostics
from vespo.losses.numerics import LOG_RATIO_CLAMP, LOG_W_FLOOR, masked_fill_zero
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


def _all_finite(*xs: torch.Tensor) -> bool:
    """True when every element of every tensor is finite, in one cheap reduction per tensor.

    The sum of finite values is finite unless it overflows, and NaN/Inf anywhere makes it
    non-finite; so a finite sum proves the tensors clean, and a non-finite one sends the caller to
    the exact (masked) check. This avoids a full ``isfinite`` pass in the common case.
    """
    total = sum(x.detach().sum() for x in xs)
    return bool(torch.isfinite(total))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bf16/fp32 inputs; float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_advantages(advantages: Any, shape: torch.Size) -> torch.Tensor:
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    b, t = shape
    if advantages.shape == shape:
        return advantages
    if advantages.shape in ((b,), (b, 1)):
        return advantages.reshape(b)
    raise ValueError(
        f"advantages must have shape [{b}, {t}] (per token) or [{b}] (per sequence), got {tuple(advantages.shape)}"
    )


def _first_valid(x: torch.Tensor, mask_f: torch.Tensor, valid_seq: torch.Tensor) -> torch.Tensor:
    """[B] value of ``x`` at each row's first valid position (0 for empty rows)."""
    first = mask_f.argmax(-1, keepdim=True)  # argmax returns the first maximal index
    return torch.where(valid_seq, x.gather(-1, first).squeeze(-1), torch.zeros((), dtype=x.dtype, device=x.device))


def _rollout_terms(
    weights: torch.Tensor, mask: torch.Tensor, mask_f: torch.Tensor, shape: torch.Size, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token multiplier [B, T] (1 where masked) and sequence log-weight [B] from IS weights."""
    b, t = shape
    w = weights.detach().to(dtype)
    if w.shape == (b, 1):
        w = w.reshape(b)
    if w.shape == shape:
        if _all_finite(w):
            bad = bool((w.detach() * mask_f < 0).any())
        else:
            valid_w = masked_fill_zero(w, mask)
            bad = not torch.isfinite(valid_w).all() or bool((valid_w < 0).any())
        if bad:
            raise ValueError("rollout_is_weights must be finite and non-negative on valid tokens")
        one = torch.ones((), dtype=dtype, device=w.device)
        token = torch.where(mask, w, one)
        log_w = torch.log(token.clamp_min(1e-8)).clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return token, (log_w * mask_f).sum(-1)
    if w.shape == (b,):
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("rollout_is_weights must be finite and non-negative")
        seq_log = torch.log(w.clamp_min(1e-8)).clamp(LOG_W_FLOOR, LOG_RATIO_CLAMP)
        return w.unsqueeze(-1).expand(b, t), seq_log
    raise ValueError(
        f"rollout_is_weights must have shape [{b}, {t}] (per token) or [{b}] (per sequence), got {tuple(weights.shape)}"
    )


def _float_mask(response_mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(0/1 mask in ``dtype``, the bool mask if it came for free). Nonzero means valid.

    Both conversions are written to run at memory speed: bool goes through a uint8 view (a plain
    bool-to-float cast is several times slower on CPU), other dtypes through ``ne(0)`` written
    straight into a float buffer (no intermediate bool tensor).
    """
    if response_mask.dtype == torch.bool:
        return response_mask.view(torch.uint8).to(dtype), response_mask
    out = torch.empty(response_mask.shape, dtype=dtype, device=response_mask.device)
    return torch.ne(response_mask, 0, out=out), None


def build_loss_batch(
    *,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is_weights: torch.Tensor | None = None,
) -> LossBatch:
    """Validate inputs and convert them into a float32 (or float64) :class:`LossBatch`.

    NaN/Inf on valid tokens is an error; under the mask it is allowed and replaced by 0.
    """
    log_prob = _check_2d("log_prob", log_prob, None)
    old_log_prob = _check_2d("old_log_prob", old_log_prob, log_prob.shape)
    response_mask = _check_2d("response_mask", response_mask, log_prob.shape)
    adv = _check_advantages(advantages, log_prob.shape)
    dtype = _compute_dtype(log_prob)
    mask_f, mask = _float_mask(response_mask, dtype)
    lengths = mask_f.sum(-1)  # [B]
    if not bool(lengths.sum() > 0):
        raise ValueError("response_mask has no valid token in the whole batch")
    valid_seq = lengths > 0

    lp = log_prob.to(dtype)
    olp = old_log_prob.detach().to(dtype)
    adv = adv.detach().to(dtype)
    # the raw log-ratio doubles as the finiteness check of both inputs (NaN/Inf in either makes
    # its sum non-finite) and, clamped, gives log W_stale
    with torch.no_grad():
        diff = lp.detach() - olp
    if not _all_finite(diff):  # rare: garbage on padding (or an error on a valid token)
        if mask is None:
            mask = mask_f != 0
        _check_finite("log_prob", lp, mask)
        _check_finite("old_log_prob", olp, mask)
        zero = torch.zeros((), dtype=dtype, device=lp.device)
        lp = torch.where(mask, lp, zero)  # the gradient under the mask stays exactly 0
        olp = torch.where(mask, olp, zero)
        with torch.no_grad():
            diff = lp.detach() - olp
    seq_log_ratio = diff.clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).mul_(mask_f).sum(-1)
    if adv.dim() == 2:
        if not _all_finite(adv):
            if mask is None:
                mask = mask_f != 0
            _check_finite("advantages", adv, mask)
            adv = masked_fill_zero(adv, mask)
        seq_adv = _first_valid(adv, mask_f, valid_seq)
    else:
        if not _all_finite(adv):
            if not torch.isfinite(adv[valid_seq]).all():
                raise ValueError("advantages has NaN or Inf on valid (unmasked) tokens")
        adv = torch.where(valid_seq, adv, torch.zeros((), dtype=dtype, device=adv.device))
        seq_adv = adv

    rollout_weight = rollout_seq_log_w = None
    if rollout_is_weights is not None:
        if not isinstance(rollout_is_weights, torch.Tensor):
            raise ValueError("rollout_is_weights must be a torch.Tensor")
        if mask is None:
            mask = mask_f != 0
        rollout_weight, rollout_seq_log_w = _rollout_terms(rollout_is_weights, mask, mask_f, log_prob.shape, dtype)
    batch = LossBatch(
        log_prob=lp,
        old_log_prob=olp,
        advantages=adv,
        seq_advantages=seq_adv,
        mask_f=mask_f,
        lengths=lengths,
        seq_log_ratio=seq_log_ratio,
        rollout_weight=rollout_weight,
        rollout_seq_log_w=rollout_seq_log_w,
        scratch=diff,  # no longer needed: reused by the aggregation
    )
    if mask is not None:
        batch.__dict__["mask"] = mask  # prefill the cached bool mask
    return batch


def _run_kernel(name: str, batch: LossBatch, params: dict[str, Any]) -> KernelOutput:
    """Run the kernel and fold in rollout weights it did not consume (no materialisation)."""
    spec = get_loss_spec(name)
    values = spec.resolve(params)
    out = spec.kernel(batch, **values)
    if batch.rollout_weight is not None and not out.uses_rollout_is:
        if out.loss_mat is not None:
            out.loss_mat = out.loss_mat * batch.rollout_weight
        elif out.token_factor is not None:
            out.token_factor = out.token_factor * batch.rollout_weight
        else:
            coeff = out.logp_coeff if out.logp_coeff.dim() == 2 else out.logp_coeff.unsqueeze(-1)
            out.logp_coeff = coeff * batch.rollout_weight
    return out


def _masked_loss_mat(out: KernelOutput, batch: LossBatch) -> torch.Tensor:
    """[B, T] per-token loss, 0 where masked (inputs are finite, so masking is a product)."""
    if out.loss_mat is not None:
        return out.loss_mat * batch.mask_f
    coeff = out.logp_coeff if out.logp_coeff.dim() == 2 else out.logp_coeff.unsqueeze(-1)
    return coeff * (batch.log_prob * _row_weights(out, batch))


class _MaskedRowSum(torch.autograd.Function):
    """[B] sum_t x[b, t] * m[b, t], differentiable in ``x`` only; the product goes to ``scratch``.

    Same value as ``(x * m).sum(-1)`` without allocating a [B, T] temporary: the forward writes
    into a buffer the caller no longer needs, and the backward is grad[b] * m[b, t].
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(m)
        return torch.mul(x, m, out=scratch).sum(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (m,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * m, None, None


def _row_weights(out: KernelOutput, batch: LossBatch) -> torch.Tensor:
    """[B, T] weights of the masked row sum: the mask, or the kernel's token factor (0 where masked)."""
    if out.token_factor is not None and out.logp_coeff is not None and out.logp_coeff.dim() == 1:
        return out.token_factor
    return batch.mask_f


def _seq_sums(out: KernelOutput, batch: LossBatch) -> torch.Tensor:
    """[B] sum over valid tokens of the per-token loss (with grad)."""
    if out.loss_mat is not None:
        return (out.loss_mat * batch.mask_f).sum(-1)
    if out.logp_coeff.dim() == 1:  # c_b * sum_t log pi_bt m_bt: one masked row sum
        m = _row_weights(out, batch)
        scratch = batch.scratch
        if scratch is not None and scratch.shape == batch.log_prob.shape and scratch.dtype == batch.log_prob.dtype:
            return out.logp_coeff * _MaskedRowSum.apply(batch.log_prob, m, scratch)
        return out.logp_coeff * (batch.log_prob * m).sum(-1)
    return (batch.log_prob * (out.logp_coeff * batch.mask_f)).sum(-1)


def compute_loss_terms(
    name: str,
    batch: LossBatch,
    **params: Any,
) -> KernelOutput:
    """Run loss ``name`` on a prepared batch and apply rollout weights it did not consume.

    Returns the kernel output with ``loss_mat`` ready for aggregation (0 where masked).
    Integrations that have their own aggregation (verl's ``agg_loss``) call this instead of
    :func:`compute_policy_loss`.
    """
    out = _run_kernel(name, batch, params)
    out.loss_mat = _masked_loss_mat(out, batch)
    out.logp_coeff = None
    return out


def loss_diagnostics(batch: LossBatch, out: KernelOutput) -> dict[str, float]:
    """The loss's own metrics plus the ``is/...`` and ``phi/...`` diagnostics of one call.

    log W for the diagnostics is the total pi_theta/mu weight: the kernel's log W, plus the rollout
    (pi_old/mu) part when the kernel did not already fold it in. Backends that aggregate with their
    own function (verl, TRL) call this after :func:`compute_loss_terms`.
    """
    total_log_w = out.seq_log_w
    stale = mismatch = None
    if batch.rollout_seq_log_w is not None:
        stale, mismatch = batch.seq_log_ratio, batch.rollout_seq_log_w
        if not out.uses_rollout_is:
            total_log_w = (total_log_w + mismatch).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    metrics = {key: float(value) for key, value in out.metrics.items()}
    metrics.update(
        weight_diagnostics(
            seq_log_w=total_log_w,
            seq_weight=out.seq_weight,
            seq_advantages=batch.seq_advantages,
            valid_seq=batch.lengths > 0,
            token_log_ratio=None,
            mask=None,
            kernel_mode=out.kernel_mode,
            stale_log_w=stale,
            mismatch_log_w=mismatch,
            token_kl=-batch.seq_log_ratio.sum() / batch.lengths.sum(),
        )
    )
    return metrics


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
        if not mask_tensor.any() and response_mask.bool().any():  # an all-padding batch is no rejection
            raise ValueError(f"correction '{correction or 'none'}' rejected every token of the batch")
    elif correction_high is not None or correction_low is not None:
        raise ValueError("correction_high/correction_low need correction= and rollout_log_prob=")

    batch = build_loss_batch(
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        response_mask=mask_tensor,
        rollout_is_weights=rollout_is_weights,
    )
    out = _run_kernel(name, batch, params)
    loss = aggregate_seq_sums(
        _seq_sums(out, batch),
        batch.lengths,
        loss_agg_mode,
        response_length=batch.mask_f.shape[-1],
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
        norm_length=norm_length,
    )
    loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
    object.__setattr__(batch, "scratch", None)  # the buffer is done with; do not keep it alive

    metrics = {"loss/value": float(loss.detach())}
    metrics.update(loss_diagnostics(batch, out))
    metrics.update(extra_metrics)
    return LossOutput(
        loss=loss.to(log_prob.dtype) if log_prob.dtype == torch.float64 else loss,
        metrics=metrics,
        mask_fn=lambda: batch.mask,
        loss_mat_fn=lambda: _masked_loss_mat(out, batch),
    )
