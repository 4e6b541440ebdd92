"""Reduce a per-token loss matrix to a scalar.

Each mode accepts the global count it divides by (tokens or sequences of the whole optimizer
batch), so that summing the losses of micro-batches gives exactly the loss of the full batch,
however the batch is split. Without a global count the local count of this call is used.

Modes (``L`` = loss_mat, ``m`` = mask, ``b`` = sequence):

- ``token-mean``:           sum_{b,t} L m / N_tokens                          (verl default, DAPO)
- ``token-sum``:            sum_{b,t} L m
- ``seq-mean-token-mean``:  sum_b [sum_t L m / n_b] / N_seqs                  (GRPO paper, GSPO, SAPO)
- ``seq-mean-token-sum``:   sum_b [sum_t L m] / N_seqs
- ``token-sum-norm``:       sum_{b,t} L m / (N_seqs * norm_length)            (Dr.GRPO; constant
  normaliser, ``norm_length`` defaults to the padded length T). verl calls it
  ``seq-mean-token-sum-norm``; both names are accepted.

Sequences with no valid token count neither as tokens nor as sequences.
"""

from __future__ import annotations

import torch

AGGREGATION_MODES: tuple[str, ...] = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "token-sum-norm",
)
_ALIASES = {"seq-mean-token-sum-norm": "token-sum-norm"}


def normalize_agg_mode(mode: str) -> str:
    """Canonical name of an aggregation mode; ValueError for an unknown one."""
    mode = _ALIASES.get(mode, mode)
    if mode not in AGGREGATION_MODES:
        raise ValueError(
            f"unknown loss_agg_mode '{mode}'; use one of {', '.join(AGGREGATION_MODES)}"
            " (or verl's alias seq-mean-token-sum-norm)"
        )
    return mode


def _positive(name: str, value: float | int | torch.Tensor | None) -> None:
    if value is None:
        return
    v = float(value)
    if not v > 0:
        raise ValueError(f"{name} must be positive, got {v:g}")


def aggregate_seq_sums(
    seq_sums: torch.Tensor,
    lengths: torch.Tensor,
    mode: str = "token-mean",
    *,
    response_length: int,
    global_num_tokens: float | int | torch.Tensor | None = None,
    global_num_seqs: float | int | torch.Tensor | None = None,
    norm_length: float | int | None = None,
) -> torch.Tensor:
    """Scalar loss from per-sequence sums of the masked per-token loss.

    Every mode is linear in ``seq_sums[b] = sum_t L[b, t] m[b, t]`` once the valid-token counts
    ``lengths`` [B] are known, so losses whose per-token loss factors as c * log pi can be reduced
    without a [B, T] matrix. ``response_length`` is the padded T (the default ``norm_length``).
    """
    mode = normalize_agg_mode(mode)
    _positive("global_num_tokens", global_num_tokens)
    _positive("global_num_seqs", global_num_seqs)
    _positive("norm_length", norm_length)
    dtype = seq_sums.dtype
    counts = lengths.to(dtype)

    def as_tensor(value: float | int | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(value, dtype=dtype, device=seq_sums.device)

    if mode in ("token-mean", "token-sum", "token-sum-norm"):
        total = seq_sums.sum()
        if mode == "token-sum":
            return total
        if mode == "token-mean":
            denom = counts.sum() if global_num_tokens is None else as_tensor(global_num_tokens)
            return total / denom.clamp_min(1.0)
        n_seqs = (counts > 0).sum().to(dtype) if global_num_seqs is None else as_tensor(global_num_seqs)
        length = response_length if norm_length is None else norm_length
        return total / (n_seqs.clamp_min(1.0) * float(length))

    if mode == "seq-mean-token-mean":
        per_seq = seq_sums / counts.clamp_min(1.0)
    else:  # seq-mean-token-sum
        per_seq = seq_sums
    n_seqs = (counts > 0).sum().to(dtype) if global_num_seqs is None else as_tensor(global_num_seqs)
    return per_seq.sum() / n_seqs.clamp_min(1.0)


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    global_num_tokens: float | int | torch.Tensor | None = None,
    global_num_seqs: float | int | torch.Tensor | None = None,
    norm_length: float | int | None = None,
) -> torch.Tensor:
    """Scalar loss from ``loss_mat`` [B, T] and ``mask`` [B, T] (bool or 0/1).

    Masked positions never contribute, even when they hold NaN or Inf.
    """
    mode = normalize_agg_mode(mode)
    valid = mask.bool()
    masked = torch.where(valid, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    return aggregate_seq_sums(
        masked.sum(-1),
        valid.sum(-1),
        mode,
        response_length=loss_mat.shape[-1],
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
        norm_length=norm_length,
    )
