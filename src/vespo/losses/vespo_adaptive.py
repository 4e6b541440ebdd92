"""Adaptive VESPO: the paper's kernel on a tempered sequence weight W^alpha (docs/adaptive.md).

VESPO's weight phi(W) = W^c1 exp(c2 (1 - W)) (shifted Eq. 17) passes weight only for log W in a
narrow window, while log W = sum_t log rho_t (Eq. 5) grows with response length and staleness. The
adaptive member tempers the weight by one exponent per batch (one per advantage sign as an
ablation), as adaptive tempering in sequential Monte Carlo does:

    phi_alpha(W) = phi(W^alpha) = W^(alpha c1) exp(c2 (1 - W^alpha)),   alpha in [alpha_min, 1]

W^alpha = (pi/mu)^alpha is the importance weight towards the geometric bridge pi^alpha mu^(1-alpha)
(the mu-to-pi interpolation that the tilt objective Eq. 11 describes). alpha is the largest value
for which the normalised ESS of phi_alpha over the batch's sequences reaches ``tau`` and their mean
weight reaches ``mass_target`` (0.1: a uniform shift of log W leaves the weights well spread but
all small): alpha = 1, i.e. exactly ``vespo``, whenever the batch already meets both, in particular
on-policy (log W = 0).

The statistics alpha depends on are sums over sequences (counts, sum phi_alpha, sum phi_alpha^2 on
a fixed grid of alpha), so they add up exactly over micro-batches and data-parallel ranks:

    stats = vespo_adaptive_batch_stats(seq_log_w, seq_adv, valid)       # per micro-batch / rank
    stats = merge_adaptive_stats([...])  or  dist.all_reduce(stats.sums)  # whole mini-batch
    compute_policy_loss("vespo_adaptive", ..., batch_stats=stats)       # every micro-batch

Without ``batch_stats`` the call's own batch is the statistics' batch.

The part of W that tempering takes out, W^(1 - alpha) = prod_t rho_t^(1 - alpha), is applied per
decision (``remainder='token'``, the default): the loss on token t is

    -phi(W^alpha) * min(rho_t^(1 - alpha), remainder_cap) * A * log pi(y_t)

which is vespo's at alpha = 1 and tends to a truncated per-token ratio as alpha -> 0.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress
from typing import Any

import torch

from vespo.losses.diagnostics import host_length_bucket_quantiles
from vespo.losses.numerics import LOG_RATIO_CLAMP
from vespo.losses.registry import Param, get_loss_spec, register_policy_loss
from vespo.losses.reinforce import _logp_coeff
from vespo.losses.types import KernelOutput, LossBatch
from vespo.losses.vespo import vespo_log_phi

_C1_NOTE = "the variance bound of Prop. 3.1 needs c1 >= 1"
#: bound on log phi inside the statistics (the paper's kernels stay below log 1.2): e^600 sums safely
_LOG_PHI_MAX = 300.0
#: parameters that change the sums (a stats object built with other values is rejected)
_STATS_KEYS = ("k_pos", "lambda_pos", "k_neg", "lambda_neg", "alpha_min", "grid", "is_mode", "criterion")


@dataclass(frozen=True)
class AdaptiveStats:
    """Additive batch statistics of ``vespo_adaptive`` (exact under any split of the batch).

    Attributes:
        sums: [n_groups, 2, 1 + 2 G] float64 (criterion 'phi'; 1 + 4 G for 'w'). Row 0 is A >= 0,
            row 1 is A < 0; column 0 counts the valid sequences, then blocks of G columns hold
            sum_b phi(W_b^alpha_g) and sum_b phi(W_b^alpha_g)^2 (and, for 'w', sum_b W_b^alpha_g
            and sum_b W_b^(2 alpha_g)), for the grid alpha_g = alpha_min^((g-1)/(G-1)) (alpha_1 = 1).
            Adding ``sums`` of disjoint parts gives the ``sums`` of their union.
        key: the kernel parameters the sums were computed with (checked by the loss).
        groups: [B] long, the group of each row of the loss call, or ``None`` (one group). Groups
            let one call hold several independent batches (the simulator's seeds).
    """

    sums: torch.Tensor
    key: tuple
    groups: torch.Tensor | None = None

    def with_groups(self, groups: torch.Tensor | None) -> AdaptiveStats:
        return AdaptiveStats(self.sums, self.key, groups)


@functools.lru_cache(maxsize=32)
def _grid(alpha_min: float, grid: int) -> torch.Tensor:
    g = torch.linspace(0.0, 1.0, int(grid), dtype=torch.float64)
    out = torch.exp(g * math.log(alpha_min))
    out[0] = 1.0
    return out


def alpha_grid(alpha_min: float, grid: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[G] log-spaced grid from 1 down to ``alpha_min`` (1 exactly first)."""
    return _grid(float(alpha_min), int(grid)).to(dtype)


def _key(params: dict) -> tuple:
    return tuple((k, params[k]) for k in _STATS_KEYS)


def temper_bound(alpha_min: float) -> float:
    """Bound on |log W| before tempering: 20 / alpha_min.

    The kernel clamps the *tempered* log-weight alpha * log W to +-20, as vespo clamps log W. A bound
    of 20 on log W itself would tie every sequence beyond 20 nats at the same weight, which is the
    regime the tempering is for (long responses, large N). Beyond 20 / alpha_min even the smallest
    exponent gives a tempered value outside the kernel's window, so nothing is lost there.
    """
    return min(LOG_RATIO_CLAMP / float(alpha_min), 1e30)  # any bound above 20 T acts the same; float32-safe


def adaptive_seq_log_w(batch: LossBatch, is_mode: str = "joint", alpha_min: float = 0.02) -> torch.Tensor:
    """[B] log W the adaptive kernel tempers: log(pi_theta/pi_old) (+ log(pi_old/mu) in 'joint'
    mode), detached, clamped to +-:func:`temper_bound`. Where |log W| <= 20 it is exactly what
    ``vespo`` feeds its kernel; beyond, vespo's clamp would tie the weights the tempering separates."""
    bound = temper_bound(alpha_min)
    return _joint_seq_log_w(batch, is_mode).clamp(-bound, bound)


def _joint_seq_log_w(batch: LossBatch, is_mode: str) -> torch.Tensor:
    """[B] sum_t clamp(log rho_t, +-20) (+ the rollout part in 'joint' mode), detached, unclamped."""
    seq_log_w = batch.seq_log_ratio
    if batch.rollout_seq_log_w is not None and is_mode == "joint":
        seq_log_w = seq_log_w + batch.rollout_seq_log_w
    return seq_log_w.detach()


def _coefficients(seq_adv: torch.Tensor, like: torch.Tensor, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] (c1, c2) of each sequence in ``like``'s dtype: A = 0 takes the positive branch, as in vespo."""
    positive = seq_adv >= 0
    c1 = torch.full_like(like, p["k_neg"]).masked_fill_(positive, p["k_pos"])
    c2 = torch.full_like(like, p["lambda_neg"]).masked_fill_(positive, p["lambda_pos"])
    return c1, c2


def vespo_adaptive_batch_stats(
    seq_log_w: torch.Tensor,
    seq_advantages: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    groups: torch.Tensor | None = None,
    n_groups: int | None = None,
    **params: object,
) -> AdaptiveStats:
    """Sufficient statistics of the adaptation from per-sequence log W and advantages.

    Args:
        seq_log_w: [B] log W per sequence as the loss computes it (:func:`adaptive_seq_log_w`, or
            :func:`vespo_adaptive_seq_inputs` from raw tensors). Non-finite values count as 0.
        seq_advantages: [B] advantage of each sequence (its sign picks the branch).
        valid: [B] bool, sequences that count (default: all).
        groups, n_groups: optional [B] group index in [0, n_groups) for several independent batches.
        **params: ``vespo_adaptive`` parameters (defaults otherwise); only the kernel and grid ones
            matter here, the targets are applied when the loss resolves alpha.

    Cost: O(B * G) elementwise work on [B] vectors, no [B, T] pass.
    """
    p = get_loss_spec("vespo_adaptive").resolve({k: v for k, v in params.items() if k != "batch_stats"})
    if not isinstance(seq_log_w, torch.Tensor) or not isinstance(seq_advantages, torch.Tensor):
        raise ValueError("seq_log_w and seq_advantages must be torch tensors of one value per sequence")
    if seq_log_w.dim() > 1 and not (seq_log_w.dim() == 2 and seq_log_w.shape[1] == 1):
        raise ValueError(f"seq_log_w must be [B] (one log W per sequence), got shape {tuple(seq_log_w.shape)}")
    b = seq_log_w.numel()
    for name, x in (("seq_advantages", seq_advantages), ("valid", valid)):
        if x is not None and (not isinstance(x, torch.Tensor) or x.numel() != b):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a [B] tensor with B = {b} (one value per sequence), got {got}")
    if groups is not None:
        n_groups = _check_groups(groups, b, n_groups)
    with torch.no_grad():
        log_w = torch.nan_to_num(seq_log_w.detach().double().reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
        bound = temper_bound(p["alpha_min"])
        log_w = log_w.clamp(-bound, bound)
        adv = torch.nan_to_num(seq_advantages.detach().double().reshape(-1), nan=0.0)
        ok = None if valid is None else valid.reshape(-1).bool()
        if groups is not None:
            groups = groups.reshape(-1).long().to(log_w.device)
        return _batch_sums(log_w, adv, ok, p, groups, n_groups)


def _check_groups(groups: object, b: int, n_groups: int | None) -> int:
    """The number of groups, after checking that ``groups`` is a [B] integer tensor in [0, n_groups)."""
    if not isinstance(groups, torch.Tensor) or groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ValueError("groups must be an integer torch tensor with one group index per sequence")
    if groups.dim() != 1 or groups.numel() != b:
        raise ValueError(f"groups must have shape [B] = [{b}], got {tuple(groups.shape)}")
    low = int(groups.min()) if b else 0
    high = int(groups.max()) + 1 if b else 1
    if n_groups is None:
        n_groups = high
    if isinstance(n_groups, bool) or int(n_groups) != n_groups or n_groups < 1:
        raise ValueError(f"n_groups must be a whole number >= 1, got {n_groups!r}")
    if low < 0 or high > n_groups:
        raise ValueError(f"groups must lie in [0, {int(n_groups)}), got values in [{low}, {high - 1}]")
    return int(n_groups)


def _batch_sums(
    log_w: torch.Tensor,
    adv: torch.Tensor,
    ok: torch.Tensor | None,
    p: dict,
    groups: torch.Tensor | None,
    n_groups: int | None,
    with_phi: bool = False,
) -> Any:
    """The sums of :class:`AdaptiveStats` from clean float64 [B] inputs (|log W| <= temper_bound); with
    ``with_phi`` also the [B] float64 vespo weight phi(W) (the alpha = 1 row)."""
    b = log_w.numel()
    g = int(p["grid"])
    alphas = alpha_grid(p["alpha_min"], g).to(log_w.device)  # [G]
    c1, c2 = _coefficients(adv, log_w, p)
    c1, c2 = c1[:, None], c2[:, None]
    # one row per sequence, so that the reduction below is a [2n, B] x [B, 1 + 2G] product
    cols = torch.empty(b, 1 + (2 if p["criterion"] == "phi" else 4) * g, dtype=torch.float64, device=log_w.device)
    cols[:, 0] = 1.0
    # [B, G] log W^alpha with the kernel's upper clamp. Below, no floor: the released code's floor
    # (log W >= log 1e-8 in the power term) would give every sequence under it one weight, and the
    # ESS of equal weights reads 1, so a batch far below the floor would never be tempered.
    la = (log_w[:, None] * alphas).clamp_(max=LOG_RATIO_CLAMP)
    v = torch.exp(la)  # W^alpha <= e^20: its square cannot overflow in float64
    log_phi = torch.addcmul(c2, c1, la).sub_(c2 * v)  # log phi(W^alpha), shifted Eq. 17
    log_phi.clamp_(max=_LOG_PHI_MAX)  # phi^2 and its sum stay finite for any (c1, c2) in range
    phi = torch.exp(log_phi, out=cols[:, 1 : 1 + g])
    torch.mul(phi, phi, out=cols[:, 1 + g : 1 + 2 * g])
    if p["criterion"] == "w":
        cols[:, 1 + 2 * g : 1 + 3 * g] = v
        torch.mul(v, v, out=cols[:, 1 + 3 * g :])
    sign = (adv < 0).long()  # 0: A >= 0, 1: A < 0
    if groups is None:
        n, slot = 1, sign
    else:
        n = int(n_groups) if n_groups is not None else (int(groups.max()) + 1 if b else 1)
        slot = groups * 2 + sign
    sel = slot == torch.arange(2 * n, device=log_w.device)[:, None]  # [2n, B]
    if ok is not None:
        sel &= ok
    sums = sel.to(torch.float64) @ cols  # [2n, 1 + 2G]: one reduction for every group, sign and column
    stats = AdaptiveStats(sums=sums.reshape(n, 2, -1), key=_key(p), groups=groups)
    return (stats, phi[:, 0]) if with_phi else stats


def merge_adaptive_stats(parts: Sequence[AdaptiveStats]) -> AdaptiveStats:
    """Statistics of the union of disjoint parts (micro-batches, gradient-accumulation steps)."""
    parts = list(parts)
    if not parts:
        raise ValueError("merge_adaptive_stats needs at least one part")
    if not all(isinstance(p, AdaptiveStats) for p in parts):
        raise ValueError("merge_adaptive_stats takes AdaptiveStats (from vespo_adaptive_batch_stats)")
    key, shape = parts[0].key, parts[0].sums.shape
    if any(p.key != key for p in parts):
        raise ValueError("cannot merge vespo_adaptive statistics computed with different parameters")
    if any(p.sums.shape != shape for p in parts):
        raise ValueError(f"cannot merge statistics of different shapes: {sorted({tuple(p.sums.shape) for p in parts})}")
    # a row-to-group map belongs to one call's rows: keep it only if every part has the same one
    groups = parts[0].groups
    if any(p.groups is None or groups is None or not torch.equal(p.groups, groups) for p in parts[1:]):
        groups = None
    return AdaptiveStats(sums=sum(p.sums for p in parts[1:]) + parts[0].sums, key=key, groups=groups)


def vespo_adaptive_seq_inputs(
    *,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is_weights: torch.Tensor | None = None,
    is_mode: str = "joint",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq_log_w [B], seq_advantages [B], valid [B]) from the loss's own inputs, computed exactly
    as the loss computes them (a trainer's no-grad pre-pass calls this per micro-batch). log W is
    not bounded here: :func:`vespo_adaptive_batch_stats` applies the bound of its ``alpha_min``."""
    from vespo.losses.core import build_loss_batch  # core imports the registry that imports us

    with torch.no_grad():
        batch = build_loss_batch(
            log_prob=log_prob.detach(),
            old_log_prob=old_log_prob,
            advantages=advantages,
            response_mask=response_mask,
            rollout_is_weights=rollout_is_weights,
        )
        return _joint_seq_log_w(batch, is_mode), batch.seq_advantages, batch.lengths > 0


def _alpha_of_row(
    row: list[float], alphas: list[float], tau: float, mass_target: float, criterion: str
) -> tuple[float, bool]:
    """(alpha, saturated) of one [1 + 2G] (or [1 + 4G]) row of sums: the scan of :func:`resolve_alpha`."""
    g = len(alphas)
    count = row[0]
    if not count > 0:  # no sequence of this sign: nothing to adapt
        return 1.0, False
    q_prev = q = 0.0
    first = g - 1
    for j in range(g):
        q = _row_ess(row, j, g, criterion) - tau
        m = row[1 + j] / max(count, 1.0) - mass_target  # mean phi against its target (0: always >= 0)
        if m < q or m != m:  # min(), NaN propagating like torch.minimum
            q = m
        if q >= 0:
            first = j
            break
        q_prev = q
    if first == 0:
        return 1.0, False
    if q >= 0 and q_prev < 0:  # move towards the previous grid point by linear interpolation of q
        frac = min(max(q / (q - q_prev), 0.0), 1.0)
        return alphas[first] + frac * (alphas[first - 1] - alphas[first]), False
    return alphas[first], first == g - 1 and q < 0


def resolve_alpha(
    stats: AdaptiveStats,
    *,
    alpha_min: float,
    grid: int,
    tau: float,
    mass_target: float,
    per_sign: bool,
    criterion: str = "phi",
) -> tuple[list[list[float]], list[list[bool]]]:
    """(alpha [n_groups][2], saturated [n_groups][2]) from the statistics (index 0: A >= 0, 1: A < 0).

    ESS is the normalised ESS of phi(W^alpha) (``criterion='phi'``) or of W^alpha itself
    (``'w'``, the classic SMC tempering criterion, blind to the kernel).
    q(alpha) = min(ESS(alpha) - tau, mean phi(alpha) - mass_target) on the grid, scanned from
    alpha = 1 down; alpha is the first grid point with q >= 0, moved up towards the previous one by
    linear interpolation of q (so alpha solves q = 0 to second order in the grid step). alpha = 1
    when q(1) >= 0, alpha_min when no grid point qualifies. ``per_sign=False`` pools both signs.

    The scan runs on the host over one transfer of the sums (a few hundred numbers): Python floats
    are IEEE doubles, so it computes what the same scan in float64 torch would, without dozens of
    tiny kernels.
    """
    g = int(grid)
    alphas = alpha_grid(alpha_min, g).tolist()
    alpha, saturated = [], []
    for pos, neg in _sign_rows(stats, g, criterion, per_sign):
        (a_pos, s_pos), (a_neg, s_neg) = (_alpha_of_row(r, alphas, tau, mass_target, criterion) for r in (pos, neg))
        alpha.append([a_pos, a_neg])
        saturated.append([s_pos, s_neg])
    return alpha, saturated


def _sign_rows(stats: AdaptiveStats, grid: int, criterion: str, per_sign: bool) -> list[list[list[float]]]:
    """[n_groups][2] rows of sums on the host (A >= 0, A < 0), both signs pooled unless ``per_sign``,
    after checking that the statistics are well formed (a bad all-reduce must not pass silently)."""
    sums = stats.sums
    width = 1 + (2 if criterion == "phi" else 4) * grid
    if not isinstance(sums, torch.Tensor) or sums.dim() != 3 or sums.shape[0] < 1 or sums.shape[1] != 2:
        got = tuple(sums.shape) if isinstance(sums, torch.Tensor) else type(sums).__name__
        raise ValueError(f"batch_stats.sums must be a [n_groups >= 1, 2, {width}] tensor, got {got}")
    if sums.shape[-1] != width:
        raise ValueError(f"batch_stats has {sums.shape[-1]} columns, expected {width} for grid={grid}")
    rows = sums.tolist()
    if not all(0 <= x < math.inf for group in rows for row in group for x in row):  # False for NaN too
        raise ValueError("batch_stats.sums must be finite and non-negative (they are counts and sums of weights)")
    if not per_sign:
        rows = [[pooled, pooled] for pooled in ([x + y for x, y in zip(pos, neg)] for pos, neg in rows)]
    return rows


def _row_ess(row: list[float], j: int, grid: int, criterion: str) -> float:
    """Normalised ESS at grid point j of one row of sums (of phi, or of W^alpha for 'w'); 0 when
    every weight is 0 or the row counts no sequence."""
    off = 1 if criterion == "phi" else 1 + 2 * grid  # where the ESS sums start
    e1, e2 = row[off + j], row[off + grid + j]
    return e1 * e1 / max(row[0] * e2, 1e-300) if e2 > 0 else 0.0


def _ess_at_alpha_min(stats: AdaptiveStats, grid: int, criterion: str, per_sign: bool) -> list[list[float]]:
    """[n_groups][2] normalised ESS at alpha_min (the last grid point), pooled like alpha."""
    rows = _sign_rows(stats, grid, criterion, per_sign)
    return [[_row_ess(r, grid - 1, grid, criterion) for r in pair] for pair in rows]


def _diagnostics(
    phi: torch.Tensor,
    phi_before: torch.Tensor,
    positive: torch.Tensor,
    valid: torch.Tensor,
    alpha: torch.Tensor | float,
    saturated: torch.Tensor | bool,
    seq_log_w: torch.Tensor,
    lengths: torch.Tensor,
) -> dict[str, float]:
    """The metrics of one call. The [B] vectors go to the host once and the per-sign sums run there
    in Python doubles: a few hundred numbers cost less than the dozens of tiny device kernels the same
    sums would launch."""
    ok_h, pos_h = valid.tolist(), positive.tolist()
    pb_h, phi_h = phi_before.tolist(), phi.tolist()
    alpha_h = alpha.tolist() if isinstance(alpha, torch.Tensor) else None
    sat_h = saturated.tolist() if isinstance(saturated, torch.Tensor) else None
    masks = ([o and p for o, p in zip(ok_h, pos_h)], [o and not p for o, p in zip(ok_h, pos_h)])
    metrics: dict[str, float] = {}
    n_total = s_sat = s_drop = 0.0
    for mask, name in zip(masks, ("pos", "neg")):  # A >= 0, then A < 0
        pb, pa = list(compress(pb_h, mask)), list(compress(phi_h, mask))
        n = len(pb)
        n_total += n
        s_drop += sum(x < 0.01 for x in pb)
        if sat_h is not None:
            s_sat += sum(compress(sat_h, mask))
        # a sign absent from the batch has nothing adapted: alpha 1, ESS 1, mass 0 (finite, same keys)
        a = (sum(compress(alpha_h, mask)) / n if alpha_h is not None else float(alpha)) if n else 1.0
        metrics[f"vespo_adaptive/alpha_{name}"] = a
        metrics[f"phi/ess_{name}_before"] = _host_ess(pb)
        metrics[f"phi/ess_{name}_after"] = _host_ess(pa)
        metrics[f"phi/mass_{name}"] = sum(pa) / n if n else 0.0
    metrics["phi/frac_below_0.01_before"] = s_drop / n_total if n_total else 0.0
    if sat_h is None:
        s_sat = n_total * bool(saturated)
    metrics["vespo_adaptive/saturated"] = s_sat / n_total if n_total else 0.0
    metrics.update(
        host_length_bucket_quantiles(list(compress(seq_log_w.tolist(), ok_h)), list(compress(lengths.tolist(), ok_h)))
    )
    return metrics


def _host_ess(weights: list[float]) -> float:
    """Normalised ESS (sum w)^2 / (n sum w^2) of non-negative host floats, scale-free (divided by the
    largest weight first, so huge or tiny weights neither overflow nor underflow); 1 for an empty
    list, 0 when every weight is 0."""
    top = max(weights, default=0.0)
    if not weights or not top > 0 or top == math.inf:
        return float(not weights)
    rel = [w / top for w in weights]
    return sum(rel) ** 2 / (len(rel) * sum(map(operator.mul, rel, rel)))


def _token_remainder(batch: LossBatch, alpha: torch.Tensor | float, cap: float, is_mode: str) -> torch.Tensor:
    """[B, T] min(rho_t^(1 - alpha), cap) on valid tokens, 0 where masked; detached.

    W = W^alpha * prod_t rho_t^(1 - alpha): the kernel takes the tempered part, and the remainder is
    applied per decision, token t keeping only its own factor (the approximation token-level losses
    make for the whole ratio), truncated at ``cap`` as truncated IS truncates rho_t (verl's TIS: 2,
    CISPO: 5). rho_t is pi_theta/pi_old times, in 'joint' mode, the token's rollout weight
    pi_old/mu; a per-sequence rollout weight has no per-token split and enters through W^alpha only."""
    log_ratio = batch.scratch  # build_loss_batch leaves the clamped, masked, detached log-ratio here
    if log_ratio is None or log_ratio.shape != batch.log_prob.shape:
        log_ratio = batch.log_ratio.detach()
    rollout = batch.rollout_weight
    if rollout is not None and is_mode == "joint" and rollout.stride(-1) != 0:  # per-token weights
        log_ratio = log_ratio + rollout.clamp_min(1e-8).log().clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    one_minus = 1.0 - alpha if isinstance(alpha, float) else (1.0 - alpha).unsqueeze(-1)
    factor = torch.mul(log_ratio, one_minus).clamp_(max=math.log(cap)).exp_()
    return factor.mul_(batch.mask_f)


def _remainder_metrics(factor: torch.Tensor | None, batch: LossBatch, phi: torch.Tensor) -> dict[str, float]:
    """Mean per-token remainder factor over valid tokens and the mean per-token weight phi * factor
    (1 and the length-weighted mean phi when nothing is tempered). One [B, T] row sum."""
    n = float(batch.lengths.sum().clamp_min(1.0))
    rows = batch.lengths if factor is None else factor.sum(-1)  # masked tokens are 0 in the factor
    return {
        "vespo_adaptive/remainder_mean": float(rows.sum()) / n,
        "phi/token_mean": float((phi * rows).sum()) / n,
    }


@register_policy_loss(
    "vespo_adaptive",
    level="sequence",
    summary="VESPO kernel on the tempered weight W^alpha, alpha per batch so that ESS(phi) >= tau",
    reference="docs/adaptive.md; reduces to vespo (Eq. 17/20) when alpha = 1",
    params={
        "k_pos": Param(2.0, "c1 for A >= 0", low=1.0, note=_C1_NOTE),
        "lambda_pos": Param(3.0, "c2 for A >= 0", low=0.0, low_open=True),
        "k_neg": Param(3.0, "c1 for A < 0", low=1.0, note=_C1_NOTE),
        "lambda_neg": Param(2.0, "c2 for A < 0", low=0.0, low_open=True),
        "tau": Param(
            0.95, "target normalised ESS of phi; alpha = 1 when it is already met", low=0.0, high=1.0, high_open=True
        ),
        "mass_target": Param(
            0.1,
            "also require mean phi >= this, so the batch as a whole is not down-weighted below it "
            "(down to alpha_min): catches a uniform shift of log W that leaves the weights well spread; 0: off",
            low=0.0,
            high=1.0,
            high_open=True,
        ),
        "alpha_min": Param(0.02, "smallest tempering exponent", low=0.0, high=1.0, low_open=True),
        "grid": Param(64, "grid points of alpha in [alpha_min, 1] (log-spaced)", low=2, high=1024),
        "per_sign": Param(
            False,
            "separate alpha for A >= 0 and A < 0 (default: one alpha per batch, "
            "one geometric bridge for every sequence)",
        ),
        "criterion": Param(
            "phi", "ESS of phi(W^alpha) ('phi') or of W^alpha ('w', SMC tempering)", choices=("phi", "w")
        ),
        "adapt": Param(
            "temper",
            "'temper': phi(W^alpha); 'kernel': phi(W; c1', c2') with "
            "c1' = max(1, alpha c1), c2' = c2 c1'/c1 (keeps the mode; ablation)",
            choices=("temper", "kernel"),
        ),
        "saturate_scale": Param(
            False, "when alpha hits alpha_min with ESS < tau, scale phi by sqrt(ESS/tau) (ablation)"
        ),
        "remainder": Param(
            "token",
            "the untempered part W^(1 - alpha) = prod_t rho_t^(1 - alpha): 'token' applies it per decision "
            "(token t gets min(rho_t^(1 - alpha), remainder_cap)), 'none' drops it (the first version)",
            choices=("token", "none"),
        ),
        "remainder_cap": Param(2.0, "upper bound c on the per-token remainder factor", low=1.0),
        "is_mode": Param(
            "joint", "rollout IS weights: 'joint' folds log(pi_old/mu) into log W (as vespo)", choices=("joint",)
        ),
        "batch_stats": Param(
            None,
            "precomputed AdaptiveStats of the whole mini-batch (vespo_adaptive_batch_stats); None: this call's batch",
        ),
    },
)
def vespo_adaptive_loss(
    batch: LossBatch,
    *,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
    tau: float,
    mass_target: float,
    alpha_min: float,
    grid: float,
    per_sign: bool,
    criterion: str,
    adapt: str,
    saturate_scale: bool,
    remainder: str,
    remainder_cap: float,
    is_mode: str,
    batch_stats: AdaptiveStats | None,
) -> KernelOutput:
    """Adaptive VESPO: -phi(W^alpha) * A * log pi, alpha from the (mini-)batch statistics."""
    p = dict(
        k_pos=k_pos,
        lambda_pos=lambda_pos,
        k_neg=k_neg,
        lambda_neg=lambda_neg,
        alpha_min=alpha_min,
        grid=grid,
        is_mode=is_mode,
        criterion=criterion,
    )
    grid = int(grid)
    seq_log_w = adaptive_seq_log_w(batch, is_mode, alpha_min)  # [B] log W (Eq. 5), vespo's where |log W| <= 20
    valid = batch.lengths > 0
    seq_adv = batch.seq_advantages
    phi_before = None
    if batch_stats is None:
        stats, phi_before = _batch_sums(seq_log_w.double(), seq_adv.double(), valid, p, None, None, with_phi=True)
    else:
        if not isinstance(batch_stats, AdaptiveStats):
            raise ValueError(f"batch_stats must be an AdaptiveStats, got {type(batch_stats).__name__}")
        if batch_stats.key != _key(p):
            raise ValueError(
                f"batch_stats were computed with other vespo_adaptive parameters: {dict(batch_stats.key)} vs {p}"
            )
        stats = batch_stats
    alpha_g, sat_g = resolve_alpha(
        stats, alpha_min=alpha_min, grid=grid, tau=tau, mass_target=mass_target, per_sign=per_sign, criterion=criterion
    )  # [n][2] host floats
    positive = seq_adv >= 0
    dt = seq_log_w.dtype
    if stats.groups is None:
        if len(alpha_g) != 1:
            raise ValueError(
                f"batch_stats hold {len(alpha_g)} groups but no groups map: give it with stats.with_groups(groups)"
            )
        (a_pos, a_neg), (sat_pos, sat_neg) = alpha_g[0], sat_g[0]
        # one alpha for the batch (the default): a Python scalar, so alpha = 1.0 leaves vespo's floats
        alpha = a_pos if a_pos == a_neg else torch.full_like(seq_log_w, a_neg).masked_fill_(positive, a_pos)
        saturated = (
            sat_pos if sat_pos == sat_neg else torch.full_like(positive, sat_neg).masked_fill_(positive, sat_pos)
        )
    else:
        if isinstance(stats.groups, torch.Tensor) and stats.groups.numel() != seq_log_w.numel():
            raise ValueError(f"batch_stats.groups has {stats.groups.numel()} rows, the batch {seq_log_w.numel()}")
        _check_groups(stats.groups, seq_log_w.numel(), len(alpha_g))
        grp, sign = stats.groups.to(seq_log_w.device).long(), (~positive).long()
        alpha = torch.tensor(alpha_g, dtype=torch.float64, device=seq_log_w.device)[grp, sign].to(dt)
        saturated = torch.tensor(sat_g, device=seq_log_w.device)[grp, sign]

    c1, c2 = _coefficients(seq_adv, seq_log_w, p)
    if adapt == "temper":
        log_phi = vespo_log_phi(alpha * seq_log_w, c1, c2)  # phi(W^alpha); alpha = 1: vespo exactly
        mode = (c1 / c2) ** (1.0 / alpha)  # argmax_W phi(W^alpha) = (c1/c2)^(1/alpha)
    else:
        alpha_t = torch.as_tensor(alpha, dtype=dt, device=seq_log_w.device)
        c1a = torch.maximum(alpha_t * c1, torch.ones_like(c1)).where(alpha_t < 1, c1)
        c2a = (c2 * c1a / c1).where(alpha_t < 1, c2)
        log_phi = vespo_log_phi(seq_log_w, c1a, c2a)
        mode = c1a / c2a
    phi = torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).detach()
    if phi_before is None:  # statistics came from outside: vespo's weight of this batch
        phi_before = torch.exp(vespo_log_phi(seq_log_w, c1, c2)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    metrics = _diagnostics(phi, phi_before, positive, valid, alpha, saturated, seq_log_w, batch.lengths)
    if saturate_scale and (not isinstance(saturated, bool) or saturated):
        # the ESS at alpha_min of the statistics' batch (not of this call's rows): exact under splits
        ess_min = torch.tensor(_ess_at_alpha_min(stats, grid, criterion, per_sign), dtype=torch.float64)
        grp = stats.groups.long() if stats.groups is not None else torch.zeros_like(seq_adv, dtype=torch.long)
        ess_seq = ess_min.to(seq_log_w.device)[grp.to(seq_log_w.device), (~positive).long()].to(phi.dtype)
        scaled = phi * (ess_seq / tau).clamp(max=1.0).sqrt()
        phi = scaled if isinstance(saturated, bool) else torch.where(saturated, scaled, phi)

    coeff = _logp_coeff(batch, phi)  # Eq. 20 with phi(W^alpha): loss = -phi * A * log pi
    token_factor = None
    if remainder == "token" and adapt == "temper" and not (isinstance(alpha, float) and alpha == 1.0):
        token_factor = _token_remainder(batch, alpha, remainder_cap, is_mode)  # [B, T], 0 where masked
        metrics.update(_remainder_metrics(token_factor, batch, phi))
        if coeff.dim() == 2:  # per-token advantages: fold the factor into the coefficient
            coeff, token_factor = token_factor.mul_(coeff), None
    else:
        metrics.update(_remainder_metrics(None, batch, phi))
    return KernelOutput(
        loss_mat=None,
        logp_coeff=coeff,
        token_factor=token_factor,
        seq_log_w=seq_log_w,
        seq_weight=phi,
        uses_rollout_is=batch.rollout_seq_log_w is not None,
        kernel_mode=mode.clamp(max=math.exp(LOG_RATIO_CLAMP)),
        metrics=metrics,
    )
