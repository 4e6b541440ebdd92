"""Log-probabilities of given tokens under a model: one full forward pass (trainer side).

:func:`sequence_log_probs` gives the trainer's ``log pi_theta`` (with gradients) and ``pi_old``
(without); the HF sampler uses :func:`forward_logits` for its decoding steps, so both halves run
the same model code.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "check_log_prob_args",
    "forward_logits",
    "left_pad",
    "position_ids_from_mask",
    "sequence_log_probs",
    "sequence_log_probs_and_entropy",
    "target_log_probs",
]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so a left-padded row starts at 0 (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` ``[B, L]`` with every sequence right-aligned."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


_FORWARD_PARAMS: dict[type, frozenset[str]] = {}


def _forward_params(model: nn.Module) -> frozenset[str]:
    """Keyword names of ``model.forward`` (cached per class)."""
    cls = type(model)
    if cls not in _FORWARD_PARAMS:
        try:
            _FORWARD_PARAMS[cls] = frozenset(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):  # pragma: no cover
            _FORWARD_PARAMS[cls] = frozenset()
    return _FORWARD_PARAMS[cls]


def forward_logits(model: nn.Module, keep: int, cache: Any = None, **inputs: Any) -> Tensor:
    """Logits of the last ``keep`` positions, ``[B, keep, V]``.

    Only those positions go through the LM head when the model takes ``logits_to_keep``. They are
    given as an index tensor, not an int: transformers turns an int into a slice of the hidden
    states, and torch's CPU ``linear`` on that non-contiguous 3-D view is 6x (fp32) to 250x (bf16)
    slower than on a contiguous copy (2.2 s instead of 9 ms for SmolLM2's LM head at B=16, bf16);
    indexing with a tensor makes the copy. A KV ``cache`` is passed as ``cache=`` (transformers >=
    5.2x) or ``past_key_values=`` (older) and is updated in place.
    """
    params = _forward_params(model)
    if "logits_to_keep" in params:
        length = inputs["input_ids"].shape[1]
        if length > keep:
            inputs["logits_to_keep"] = torch.arange(length - keep, length, device=inputs["input_ids"].device)
        else:
            inputs["logits_to_keep"] = keep
    if cache is not None:
        inputs["cache" if "cache" in params else "past_key_values"] = cache
        inputs["use_cache"] = True
    logits = model(**inputs).logits
    if logits.shape[1] != keep:
        logits = logits[:, -keep:]
    return logits


def sequence_log_probs_and_entropy(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_length: int,
    *,
    temperature: float = 1.0,
    grad: bool | None = None,
    with_entropy: bool = True,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[B, T]`` of the last ``T = response_length`` tokens, and their entropies ``[B, T]``.

    One forward pass over ``input_ids [B, P+T]`` (left-padded prompts, right-padded responses, as in
    :meth:`Rollout.to_batch`), with position ids counted from ``attention_mask`` so left padding
    does not shift positions. Only the ``T`` response positions reach the LM head and the float32
    ``log_softmax``. Logits are divided by ``temperature`` but *not* top-p truncated: this is the
    trainer's ``pi_theta``, the full tempered policy being optimised, whose support is the whole
    vocabulary; the sampler's truncation is part of the behaviour policy ``mu`` and shows up in
    the importance ratio instead. Entries where ``attention_mask`` is 0 are set to 0.

    Gradients flow when ``grad`` is True; by default (``grad=None``) they do when the model is in
    training mode and grad mode is on, so ``model.eval()`` gives the no-grad ``pi_old`` pass. The
    entropy is detached unless ``entropy_grad=True`` (for an entropy bonus).
    """
    b, length = input_ids.shape
    t = check_log_prob_args(length, response_length, temperature)
    if t == 0:
        empty = torch.zeros((b, 0), dtype=torch.float32, device=input_ids.device)
        return empty, (empty.clone() if with_entropy else None)
    use_grad = (model.training and torch.is_grad_enabled()) if grad is None else grad
    with torch.set_grad_enabled(use_grad):
        logits = forward_logits(
            model,
            t + 1,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        # position j predicts token j + 1 -> [B, T, V]
        logp, entropy = target_log_probs(
            logits[:, :-1],
            input_ids[:, -t:],
            temperature,
            with_entropy=with_entropy,
            entropy_grad=use_grad and entropy_grad,
        )
        valid = attention_mask[:, -t:].bool()
        logp = torch.where(valid, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
        if entropy is not None:
            entropy = torch.where(valid, entropy, torch.zeros((), dtype=entropy.dtype, device=entropy.device))
    return logp, entropy


def check_log_prob_args(width: int, response_length: int, temperature: float) -> int:
    """Validate a log-prob call's shape and temperature; returns ``T`` as an int."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    t = int(response_length)
    if not 0 <= t < width:
        raise ValueError(f"response_length={t} must be in [0, {width - 1}] for input width {width}")
    return t


def target_log_probs(
    logits: Tensor, targets: Tensor, temperature: float, *, with_entropy: bool = True, entropy_grad: bool = False
) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / temperature) at ``targets`` (float32), and the entropy of each row.

    ``logits [..., V]``, ``targets [...]``. The entropy is a metric, computed without a graph
    (so it costs no activation memory) unless ``entropy_grad``.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def sequence_log_probs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_length: int,
    *,
    temperature: float = 1.0,
    grad: bool | None = None,
) -> Tensor:
    """Log-probs ``[B, T]`` of the response tokens; see :func:`sequence_log_probs_and_entropy`."""
    logp, _ = sequence_log_probs_and_entropy(
        model, input_ids, attention_mask, response_length, temperature=temperature, grad=grad, with_entropy=False
    )
    return logp
