"""Packed (padding-free) training forward: several sequences per row, no padding tokens computed.

A mini-batch's padded layout (left-padded prompts, right-padded responses) spends compute on pads:
23-37 % of the token grid in the SmolLM2 runs (``perf/pad_frac``). With ``algorithm.packing: true``
the trainer's forward instead places each sequence's real tokens (prompt + response, contiguous in
the padded row) into rows of width ``C``, first-fit decreasing, with position ids restarting at 0 for
each sequence and no attention mask. transformers (>= 4.54,
``masking_utils.find_packed_sequence_indices``) reads the restarts as sequence boundaries and builds
a block-diagonal causal mask, so no token attends across sequences.

The row width trades padding against attention: CPU attention kernels compute the whole ``C x C``
score matrix of a row, masked entries included, so attention per token grows with ``C``, while the
linear layers (most of the cost of a 135M model at a few hundred tokens) only see fewer pads. With
``C`` = the longest sequence, two sequences share a row only when together they are no longer than
the longest one, which prompts of half the length rule out; ``C`` = twice the longest packs pairs
and triples. :func:`plan_rows` takes whichever of the two widths (:data:`ROW_WIDTH_FACTORS`) gives
the smaller token grid (rows x width; the narrower on a tie), so sequences of equal length stay one
per row (measured in docs/real_lm.md).

Only the positions that predict response tokens go through the LM head (gathered from the
decoder's last hidden states), then the float32 ``log_softmax`` of
:func:`vespo.rollout.log_probs.sequence_log_probs_and_entropy`; the result is scattered back into
the padded ``[B, T]`` response layout (0 on padding), so the loss sees exactly what the padded
forward gives (tested to float tolerance).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vespo.rollout.log_probs import check_log_prob_args, sequence_log_probs_and_entropy, target_log_probs

__all__ = [
    "ROW_WIDTH_FACTORS",
    "PackingError",
    "check_packing_support",
    "pack_rows",
    "packed_log_probs_and_entropy",
    "packed_pad_fraction",
    "plan_rows",
]


#: candidate row widths, in multiples of the micro-batch's longest sequence
ROW_WIDTH_FACTORS = (1, 2)


def plan_rows(lengths: list[int], factors: tuple[float, ...] = ROW_WIDTH_FACTORS) -> tuple[list[list[int]], int]:
    """``(rows, width)``: the first-fit-decreasing rows of the candidate width with the smallest grid."""
    best: tuple[int, int, list[list[int]]] | None = None
    for factor in factors:
        width = max(1, int(factor * max(lengths)))
        rows = pack_rows(lengths, width)
        if best is None or len(rows) * width < best[0]:
            best = (len(rows) * width, width, rows)
    assert best is not None
    return best[2], best[1]


class PackingError(ValueError):
    """The model or the installed transformers cannot run a packed forward (one line)."""


def check_packing_support(model: nn.Module) -> None:
    """Raise :class:`PackingError` unless a packed forward of ``model`` gives per-sequence attention."""
    try:
        from transformers import masking_utils
    except ImportError as exc:  # pragma: no cover - the trainer needs transformers anyway
        raise PackingError("algorithm.packing needs transformers") from exc
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        raise PackingError(
            "algorithm.packing needs transformers >= 4.54 (packed sequences read from position ids); "
            "upgrade transformers or set algorithm.packing=false"
        )
    target = _base(model)
    if not (hasattr(target, "get_decoder") and hasattr(target, "get_output_embeddings")):
        raise PackingError(f"algorithm.packing: {type(target).__name__} has no decoder / LM head to run packed")
    config = getattr(target, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        raise PackingError("algorithm.packing does not support models with final_logit_softcapping")
    _self_check(model)


@torch.no_grad()
def _self_check(model: nn.Module) -> None:
    """A packed forward of three short sequences must give their padded forward's log-probs.

    Catches a model whose attention ignores the packed position ids (custom modelling code), which
    would otherwise let sequences attend to each other silently. Costs one forward of ~30 tokens.
    """
    vocab = int(getattr(getattr(_base(model), "config", None), "vocab_size", 0) or 0)
    if vocab < 8:
        return
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    prompt, resp = [3, 5, 2], [4, 1, 6]  # lengths 7, 6, 8: rows twice the longest pack them together
    width_p, width_r = max(prompt), max(resp)
    ids = torch.zeros((3, width_p + width_r), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (a, r) in enumerate(zip(prompt, resp)):
        ids[i, width_p - a : width_p + r] = torch.randint(1, vocab, (a + r,), generator=g)
        mask[i, width_p - a : width_p + r] = 1
    ids, mask = ids.to(device), mask.to(device)
    was_training = model.training
    model.eval()
    try:
        ref, _ = sequence_log_probs_and_entropy(model, ids, mask, width_r, grad=False, with_entropy=False)
        got, _ = packed_log_probs_and_entropy(
            model, ids, mask, width_r, grad=False, with_entropy=False, width_factors=(2,)
        )
    finally:
        model.train(was_training)
    gap = float((got.float() - ref.float()).abs().max())
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.1
    if not gap <= tol:
        raise PackingError(
            f"algorithm.packing: a packed forward of {type(_base(model)).__name__} differs from the padded one "
            f"by {gap:.3g} nats (its attention does not separate packed sequences); set algorithm.packing=false"
        )


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (its LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row, each row's lengths summing to <= ``capacity``."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit a row of {capacity}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def packed_pad_fraction(attention_mask: Tensor, slices: list[tuple[int, int]]) -> float:
    """Share of padding in the packed rows of these micro-batch slices (``perf/packed_pad_frac``)."""
    real, grid = 0, 0
    for a, b in slices:
        lengths = [n for n in attention_mask[a:b].sum(1).tolist() if n > 0]
        if lengths:
            real += sum(lengths)
            rows, width = plan_rows(lengths)
            grid += len(rows) * width
    return 1.0 - real / grid if grid else 0.0


def packed_log_probs_and_entropy(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_length: int,
    *,
    temperature: float = 1.0,
    grad: bool | None = None,
    with_entropy: bool = True,
    width_factors: tuple[float, ...] = ROW_WIDTH_FACTORS,
) -> tuple[Tensor, Tensor | None]:
    """What :func:`~vespo.rollout.log_probs.sequence_log_probs_and_entropy` returns, by a packed forward.

    ``input_ids``/``attention_mask`` ``[B, P+T]`` in the padded layout (each row's real tokens
    contiguous); returns log-probs and entropies ``[B, T]`` of the response tokens, 0 on padding.
    Rows as :func:`plan_rows` lays them out over ``width_factors``.
    """
    b, width = input_ids.shape
    t = check_log_prob_args(width, response_length, temperature)
    device = input_ids.device
    logp_out = torch.zeros((b, t), dtype=torch.float32, device=device)
    ent_out = torch.zeros((b, t), dtype=torch.float32, device=device) if with_entropy else None
    mask = attention_mask.bool()
    lengths = mask.sum(1).tolist()
    resp_lengths = mask[:, width - t :].sum(1).tolist() if t else [0] * b
    if t == 0 or sum(resp_lengths) == 0:
        return logp_out, ent_out
    first = mask.float().argmax(1).tolist()  # the first real token of each row
    if any(r > 0 and n - r < 1 for n, r in zip(lengths, resp_lengths)):
        raise ValueError("every sequence with a response needs at least one prompt token")
    seqs = [i for i in range(b) if lengths[i] > 0]
    rows, capacity = plan_rows([lengths[i] for i in seqs], width_factors)

    packed = torch.zeros((len(rows), capacity), dtype=input_ids.dtype, device=device)
    positions = torch.empty((len(rows), capacity), dtype=torch.long, device=device)
    pred_row, pred_col, out_seq, out_k = [], [], [], []
    for r, members in enumerate(rows):
        offset = 0
        for m in members:
            i, n = seqs[m], lengths[seqs[m]]
            packed[r, offset : offset + n] = input_ids[i, first[i] : first[i] + n]
            positions[r, offset : offset + n] = torch.arange(n, device=device)
            k = resp_lengths[i]
            if k:  # positions offset + n - k - 1 ... offset + n - 2 predict the k response tokens
                start = offset + n - k - 1
                pred_row += [r] * k
                pred_col += range(start, start + k)
                out_seq += [i] * k
                out_k += range(k)
            offset += n
        positions[r, offset:] = torch.arange(capacity - offset, device=device)  # the tail: its own block
    pred_row_t = torch.tensor(pred_row, device=device)
    pred_col_t = torch.tensor(pred_col, device=device)
    targets = packed[pred_row_t, pred_col_t + 1]

    target_model = _base(model)
    use_grad = (model.training and torch.is_grad_enabled()) if grad is None else grad
    with torch.set_grad_enabled(use_grad):
        hidden = target_model.get_decoder()(input_ids=packed, position_ids=positions, use_cache=False)
        hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
        logits = target_model.get_output_embeddings()(hidden[pred_row_t, pred_col_t])  # [N, V]
        logp, entropy = target_log_probs(logits, targets, temperature, with_entropy=with_entropy)
        index = (torch.tensor(out_seq, device=device), torch.tensor(out_k, device=device))
        logp_out = logp_out.index_put(index, logp)
        if ent_out is not None:
            ent_out = ent_out.index_put(index, entropy)
    return logp_out, ent_out
