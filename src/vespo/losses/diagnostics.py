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

from vespo.losses.numerics import masked_mean

_QUANTILES = (0.1, 0.5, 0.9)


def _quantile(sorted_values: list[float], level: float) -> float:
    """Quantile with linear interpolation between order statistics (torch/numpy's default)."""
    pos = level * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


@torch.no_grad()
def weight_diagnostics(
    *,
    seq_log_w: torch.Tensor,
    seq_weight: torch.Tensor,
    seq_advantages: torch.Tensor,
    valid_seq: torch.Tensor,
    token_log_ratio: torch.Tensor | None,
    mask: torch.Tensor | None,
    kernel_mode: torch.Tensor | None = None,
    stale_log_w: torch.Tensor | None = None,
    mismatch_log_w: torch.Tensor | None = None,
    token_kl: torch.Tensor | float | None = None,
) -> dict[str, float]:
    """Diagnostics for one batch; see the module docstring for the keys.

    ``is/token_kl`` is the masked mean of ``-token_log_ratio``; a caller that already has the
    per-sequence sums of the log-ratio passes the value as ``token_kl`` (and may give
    ``token_log_ratio=None``) to skip that [B, T] pass.

    The per-sequence inputs are stacked into one float64 [k, B] tensor and every statistic is
    gathered into one vector, so the whole call costs a few dozen small ops and a single
    device-to-host transfer.
    """
    device = seq_log_w.device
    f64 = torch.float64
    rows = [seq_log_w, seq_weight, seq_advantages]
    if kernel_mode is not None:
        rows.append(kernel_mode)
    parts = [(name, part) for name, part in (("stale", stale_log_w), ("mismatch", mismatch_log_w)) if part is not None]
    rows.extend(part for _, part in parts)
    x = torch.stack([r.detach().to(device=device, dtype=f64) for r in rows])  # [k, B]
    if not bool(valid_seq.all()):
        x = x[:, valid_seq.to(device)]
    log_w, phi, adv = x[0], x[1], x[2]
    n = x.shape[1]

    if token_kl is None:
        kl = masked_mean(-token_log_ratio.double(), mask).to(device)
    else:
        kl = torch.as_tensor(token_kl).to(device=device, dtype=f64)
    std, mean = torch.std_mean(log_w, correction=0)
    log_w_min, log_w_max = torch.aminmax(log_w)
    phi_min, phi_max = torch.aminmax(phi)
    w_rel = torch.exp(log_w - log_w_max)  # W / max W: ESS is scale-free, and this cannot overflow
    top = phi.topk(max(1, math.ceil(0.1 * n))).values.sum()
    positive = adv >= 0
    nan = torch.full((), math.nan, dtype=f64, device=device)
    # log W of each sign, sorted, NaN (sorted last) standing for the other sign's entries
    by_sign = torch.stack([torch.where(positive, log_w, nan), torch.where(positive, nan, log_w)]).sort(dim=1).values

    scalars = {
        "is/log_w_mean": mean,
        "is/log_w_std": std,
        "is/log_w_min": log_w_min,
        "is/log_w_max": log_w_max,
        "is/abs_log_w_mean": log_w.abs().mean(),
        "_w_sum": w_rel.sum(),
        "_w_sq_sum": (w_rel * w_rel).sum(),
        "is/token_kl": kl,
        "phi/mean": phi.mean(),
        "phi/min": phi_min,
        "phi/max": phi_max,
        "phi/frac_below_0.01": (phi < 0.01).to(f64).mean(),
        "_phi_sum": phi.sum(),
        "_phi_sq_sum": (phi * phi).sum(),
        "_phi_top": top,
        "_n_pos": positive.to(f64).sum(),
    }
    if kernel_mode is not None:
        scalars["is/frac_beyond_mode"] = (log_w > torch.log(x[3])).to(f64).mean()
    if parts:
        split = x[len(rows) - len(parts) :]
        means, abs_means = split.mean(1), split.abs().mean(1)
        for i, (name, _) in enumerate(parts):
            scalars[f"is/log_w_{name}_mean"] = means[i]
            scalars[f"is/log_w_{name}_abs_mean"] = abs_means[i]
    keys = list(scalars)
    values = torch.cat([torch.stack([scalars[k] for k in keys]), by_sign.reshape(-1)]).tolist()
    out = dict(zip(keys, values[: len(keys)]))
    sorted_by_sign = values[len(keys) :]

    w_sum, w_sq_sum = out.pop("_w_sum"), out.pop("_w_sq_sum")
    out["is/ess"] = w_sum**2 / (n * w_sq_sum)  # w_rel's maximum is 1, so w_sq_sum >= 1
    phi_sum, phi_sq_sum, phi_top, n_pos = (out.pop(k) for k in ("_phi_sum", "_phi_sq_sum", "_phi_top", "_n_pos"))
    out["phi/ess"] = phi_sum**2 / (n * phi_sq_sum) if phi_sq_sum > 0 else 0.0
    out["phi/top10_share"] = phi_top / phi_sum if phi_sum > 0 else 0.0
    for j, (sign, count) in enumerate((("pos", int(n_pos)), ("neg", n - int(n_pos)))):
        if count:
            for level in _QUANTILES:
                out[f"is/log_w_{sign}_p{int(level * 100)}"] = _quantile(sorted_by_sign[j * n : j * n + count], level)
    return {k: float(v) for k, v in out.items()}


_LENGTH_BUCKETS = 4


@torch.no_grad()
def length_bucket_quantiles(
    seq_log_w: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor, buckets: int = _LENGTH_BUCKETS
) -> dict[str, float]:
    """log W quantiles by response-length bucket: ``is/log_w_len{j}_p{10,50,90}`` and
    ``is/len{j}_mean`` for j = 1..``buckets`` (equal-count buckets of the valid sequences sorted by
    length; bucket 1 is the shortest). Every key is always present: a bucket with no sequence (fewer
    valid sequences than buckets) repeats the nearest shorter one; an empty batch gives 0."""
    log_w, lens, ok = torch.stack([seq_log_w.detach().double(), lengths.detach().double(), valid.double()]).tolist()
    return host_length_bucket_quantiles(
        [x for x, v in zip(log_w, ok) if v], [x for x, v in zip(lens, ok) if v], buckets
    )


def host_length_bucket_quantiles(
    log_w: list[float], lengths: list[float], buckets: int = _LENGTH_BUCKETS
) -> dict[str, float]:
    """:func:`length_bucket_quantiles` of the valid sequences' values as Python lists (a few hundred
    numbers: sorting them on the host costs less than the tiny device kernels would)."""
    out: dict[str, float] = {}
    n = len(log_w)
    if n == 0:
        for j in range(1, buckets + 1):
            out.update({f"is/log_w_len{j}_p{int(q * 100)}": 0.0 for q in _QUANTILES})
            out[f"is/len{j}_mean"] = 0.0
        return out
    order = sorted(range(n), key=lengths.__getitem__)  # stable: ties keep the batch order
    # equal-count buckets of the length order (torch.tensor_split's sizes); an empty bucket repeats
    # the nearest shorter non-empty one
    sizes = [n // buckets + (1 if j < n % buckets else 0) for j in range(buckets)]
    first = 0
    span = (0, n)
    for j in range(buckets):
        if sizes[j]:
            span = (first, sizes[j])
            first += sizes[j]
        start, size = span
        members = order[start : start + size]
        values = sorted(log_w[i] for i in members)
        for q in _QUANTILES:
            out[f"is/log_w_len{j + 1}_p{int(q * 100)}"] = _quantile(values, q)
        out[f"is/len{j + 1}_mean"] = sum(lengths[i] for i in members) / size
    return out
