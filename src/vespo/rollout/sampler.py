"""Rollout engine: batched KV-cache sampling that records exact behaviour log-probs.

Two halves that must agree token for token:

* :class:`Sampler` keeps its own copy of the policy (possibly in bf16) and samples responses. For
  every sampled token it records ``mu``, the log-probability under the distribution the token was
  actually drawn from (temperature-scaled, top-p truncated and renormalised), and the policy
  version that produced it. Generation can be interrupted (``stop_flag``) and resumed later under
  newer weights (``continuations``): the partial rollouts of asynchronous training.
* :func:`sequence_log_probs` / :func:`sequence_log_probs_and_entropy` recompute log-probs of the
  same tokens with one full forward pass: the trainer's ``log pi_theta`` (and ``pi_old``).

With the same weights in fp32, temperature and ``top_p=1``, the two agree to ~1e-6; any gap
left is the train/inference mismatch (bf16 sampler, MoE routing flips) or staleness that the
off-policy losses correct for.
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PaddedRollout",
    "Rollout",
    "Sampler",
    "left_pad",
    "position_ids_from_mask",
    "sample_tokens",
    "sequence_log_probs",
    "sequence_log_probs_and_entropy",
]


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------


@dataclass
class PaddedRollout:
    """A :class:`Rollout` as tensors (``B`` sequences, prompt width ``P``, response width ``T``).

    ``input_ids [B, P+T]``: prompts left-padded to ``P``, responses right-padded to ``T``.
    ``attention_mask [B, P+T]`` (long): 1 on real prompt and response tokens.
    ``response_mask [B, T]`` (bool): True on response tokens, up to and including EOS.
    ``behaviour_log_prob [B, T]`` (float32): ``mu`` per token, 0 on padding.
    ``token_version [B, T]`` (long): policy version per token, -1 on padding.
    ``finished [B]`` (bool): the response ended with EOS.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    behaviour_log_prob: Tensor
    token_version: Tensor
    prompt_length: int
    finished: Tensor

    @property
    def response_length(self) -> int:
        """Response width ``T``."""
        return self.input_ids.shape[1] - self.prompt_length

    @property
    def response_ids(self) -> Tensor:
        """``[B, T]`` response tokens (pad id after the end)."""
        return self.input_ids[:, self.prompt_length :]

    def to(self, device: torch.device | str) -> PaddedRollout:
        """Copy of the tensors on ``device``."""
        return PaddedRollout(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            response_mask=self.response_mask.to(device),
            behaviour_log_prob=self.behaviour_log_prob.to(device),
            token_version=self.token_version.to(device),
            prompt_length=self.prompt_length,
            finished=self.finished.to(device),
        )


@dataclass
class Rollout:
    """Sampled responses with per-token behaviour log-probs and policy versions (ragged lists).

    ``response_ids[i]`` ends with EOS iff ``finished[i]``; ``behaviour_log_probs[i]`` and
    ``token_versions[i]`` have the same length as ``response_ids[i]``.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    behaviour_log_probs: list[list[float]]
    token_versions: list[list[int]]
    finished: list[bool]

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        if not (len(self.response_ids) == len(self.behaviour_log_probs) == len(self.token_versions)
                == len(self.finished) == n):
            raise ValueError("Rollout fields must all have one entry per sequence")
        for i, (r, lp, v) in enumerate(zip(self.response_ids, self.behaviour_log_probs, self.token_versions)):
            if not len(r) == len(lp) == len(v):
                raise ValueError(
                    f"sequence {i}: response_ids, behaviour_log_probs and token_versions have lengths "
                    f"{len(r)}, {len(lp)}, {len(v)}"
                )

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def response_lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]

    def select(self, indices: Iterable[int]) -> Rollout:
        """The sub-rollout of the given sequence indices (lists are copied)."""
        idx = list(indices)
        return Rollout(
            prompt_ids=[list(self.prompt_ids[i]) for i in idx],
            response_ids=[list(self.response_ids[i]) for i in idx],
            behaviour_log_probs=[list(self.behaviour_log_probs[i]) for i in idx],
            token_versions=[list(self.token_versions[i]) for i in idx],
            finished=[self.finished[i] for i in idx],
        )

    @staticmethod
    def concat(rollouts: Sequence[Rollout]) -> Rollout:
        """Sequences of several rollouts, in order."""
        return Rollout(
            prompt_ids=[p for r in rollouts for p in r.prompt_ids],
            response_ids=[p for r in rollouts for p in r.response_ids],
            behaviour_log_probs=[p for r in rollouts for p in r.behaviour_log_probs],
            token_versions=[p for r in rollouts for p in r.token_versions],
            finished=[f for r in rollouts for f in r.finished],
        )

    def to_padded(self, pad_id: int, *, device: torch.device | str | None = None) -> PaddedRollout:
        """Tensors for the trainer: left-padded prompts, right-padded responses (see :class:`PaddedRollout`)."""
        b = len(self)
        p = max((len(x) for x in self.prompt_ids), default=0)
        t = max((len(x) for x in self.response_ids), default=0)
        input_ids = torch.full((b, p + t), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, p + t), dtype=torch.long)
        response_mask = torch.zeros((b, t), dtype=torch.bool)
        mu = torch.zeros((b, t), dtype=torch.float32)
        version = torch.full((b, t), -1, dtype=torch.long)
        for i in range(b):
            prompt, resp = self.prompt_ids[i], self.response_ids[i]
            lp, lr = len(prompt), len(resp)
            if lp:
                input_ids[i, p - lp : p] = torch.tensor(prompt, dtype=torch.long)
                attention_mask[i, p - lp : p] = 1
            if lr:
                input_ids[i, p : p + lr] = torch.tensor(resp, dtype=torch.long)
                attention_mask[i, p : p + lr] = 1
                response_mask[i, :lr] = True
                mu[i, :lr] = torch.tensor(self.behaviour_log_probs[i], dtype=torch.float32)
                version[i, :lr] = torch.tensor(self.token_versions[i], dtype=torch.long)
        out = PaddedRollout(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=response_mask,
            behaviour_log_prob=mu,
            token_version=version,
            prompt_length=p,
            finished=torch.tensor(self.finished, dtype=torch.bool),
        )
        return out.to(device) if device is not None else out


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so a left-padded row starts at 0 (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
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


def _forward_logits(model: nn.Module, keep: int, cache: Any = None, **inputs: Any) -> Tensor:
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


def sample_tokens(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniform: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one token per row of ``logits [B, V]``; returns ``(tokens [B], log_probs [B])``.

    ``log_probs`` is the log-probability of each token under the distribution it was drawn from:
    ``softmax(logits / temperature)``, restricted to the top-p nucleus (the smallest set of most
    likely tokens whose mass reaches ``top_p``) and renormalised. Sampling is by inverse CDF
    (float64 cumulative sum) with one uniform number per row (``uniform [B]``, drawn from
    ``generator`` if not given), so each row's draw depends only on its own number; it is also
    several times cheaper than ``torch.multinomial`` for a large vocabulary. With
    ``temperature == 0`` the token is the argmax and the recorded log-prob is that of the
    untempered distribution (``temperature=1``), since the log-prob of a point mass (0) carries no
    information.
    """
    logits = logits.float()
    if temperature == 0:
        logp_all = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logp_all.gather(-1, tokens[:, None]).squeeze(-1)
    logp_all = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    if top_p < 1.0:
        sorted_lp, order = logp_all.sort(dim=-1, descending=True)
        probs = sorted_lp.exp()
        # Drop a token once the more likely ones already cover top_p; the top token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logp_all = logp_all.masked_fill(drop, float("-inf"))
        logp_all = logp_all - torch.logsumexp(logp_all, dim=-1, keepdim=True)
    if uniform is None:
        uniform = torch.rand(logp_all.shape[0], generator=generator, dtype=torch.float64)
    cdf = logp_all.exp().double().cumsum(-1)  # dropped tokens have probability 0: never chosen
    target = uniform.to(device=cdf.device, dtype=torch.float64)[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # first index with cdf > target
    overflow = tokens >= cdf.shape[-1]  # u * total rounded up to total: take the last likely token
    if bool(overflow.any()):
        tokens = torch.where(overflow, cdf.argmax(-1), tokens)
    return tokens, logp_all.gather(-1, tokens[:, None]).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# Trainer side: full-forward log-probs
# --------------------------------------------------------------------------------------------------


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
    :meth:`Rollout.to_padded`), with position ids counted from ``attention_mask`` so left padding
    does not shift positions. Only the ``T`` response positions reach the LM head and the float32
    ``log_softmax``. Logits are divided by ``temperature`` but *not* top-p truncated: this is the
    trainer's ``pi_theta``, the full tempered policy being optimised, whose support is the whole
    vocabulary; the sampler's truncation is part of the behaviour policy ``mu`` and shows up in
    the importance ratio instead. Entries where ``attention_mask`` is 0 are set to 0.

    Gradients flow when ``grad`` is True; by default (``grad=None``) they do when the model is in
    training mode and grad mode is on, so ``model.eval()`` gives the no-grad ``pi_old`` pass. The
    entropy is detached unless ``entropy_grad=True`` (for an entropy bonus).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    b, length = input_ids.shape
    t = int(response_length)
    if not 0 <= t < length:
        raise ValueError(f"response_length={t} must be in [0, {length - 1}] for input width {length}")
    if t == 0:
        empty = torch.zeros((b, 0), dtype=torch.float32, device=input_ids.device)
        return empty, (empty.clone() if with_entropy else None)
    use_grad = (model.training and torch.is_grad_enabled()) if grad is None else grad
    with torch.set_grad_enabled(use_grad):
        logits = _forward_logits(
            model,
            t + 1,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        logits = logits[:, :-1].float()  # position j predicts token j + 1 -> [B, T, V]
        if temperature != 1.0:
            logits = logits / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        targets = input_ids[:, -t:]
        valid = attention_mask[:, -t:].bool()
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        logp = torch.where(valid, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
        entropy = None
        if with_entropy:  # a metric: computed without a graph, so it costs no activation memory
            with torch.set_grad_enabled(use_grad and entropy_grad):
                entropy = -(logp_all.exp() * logp_all).sum(-1)
                entropy = torch.where(valid, entropy, torch.zeros((), dtype=entropy.dtype, device=entropy.device))
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


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


def _make_cache(model: nn.Module, capacity: int) -> Any:
    """A transformers ``DynamicCache`` whose full-attention layers write into preallocated buffers.

    transformers' ``DynamicLayer`` concatenates every step (a copy of the whole cache per token);
    here each layer allocates ``capacity`` positions once and hands out views of the filled part.
    The cache stays a real ``DynamicCache`` (masks, ``batch_select_indices`` and sliding-window
    layers behave as usual); if its internals are not the ones expected, the stock cache is used.
    """
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    try:
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
    except TypeError:  # pragma: no cover - older transformers
        return DynamicCache()
    layer_cls = _preallocated_layer_class()
    layers = getattr(cache, "layers", None)
    if layer_cls is None or not layers:
        return cache
    base = layer_cls.__mro__[1]
    cache.layers = [layer_cls(capacity) if type(layer) is base else layer for layer in layers]
    return cache


_PREALLOC_CLS: list[type | None] = []


def _preallocated_layer_class() -> type | None:
    if _PREALLOC_CLS:
        return _PREALLOC_CLS[0]
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover
        _PREALLOC_CLS.append(None)
        return None

    class _PreallocatedLayer(DynamicLayer):  # type: ignore[misc, valid-type]
        def __init__(self, capacity: int) -> None:
            super().__init__()
            self._capacity = max(int(capacity), 1)
            self._length = 0

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> None:
            self.device = key_states.device
            b, h, _, dk = key_states.shape
            dv = value_states.shape[-1]
            self._k = key_states.new_empty((b, h, self._capacity, dk))
            self._v = value_states.new_empty((b, h, self._capacity, dv))
            self._length = 0
            self.keys = self._k[:, :, :0]
            self.values = self._v[:, :, :0]
            self.is_initialized = True

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, s = self._length, key_states.shape[-2]
            if n + s > self._capacity:  # grow (not expected when capacity is right)
                self._capacity = 2 * (n + s)
                k, v = self._k, self._v
                self._k = k.new_empty((*k.shape[:2], self._capacity, k.shape[-1]))
                self._v = v.new_empty((*v.shape[:2], self._capacity, v.shape[-1]))
                self._k[:, :, :n] = k[:, :, :n]
                self._v[:, :, :n] = v[:, :, :n]
            self._k[:, :, n : n + s] = key_states
            self._v[:, :, n : n + s] = value_states
            self._length = n + s
            self.keys = self._k[:, :, : n + s]
            self.values = self._v[:, :, : n + s]
            return self.keys, self.values

        def batch_select_indices(self, indices: Tensor) -> None:
            if self.is_initialized:
                self._k = self._k[indices]
                self._v = self._v[indices]
                self.keys = self._k[:, :, : self._length]
                self.values = self._v[:, :, : self._length]

    _PREALLOC_CLS.append(_PreallocatedLayer)
    return _PreallocatedLayer


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------


@dataclass
class _Row:
    """Bookkeeping of one sequence during :meth:`Sampler.generate`."""

    tokens: list[int]
    log_probs: list[float]
    versions: list[int]
    finished: bool = False


class Sampler:
    """The inference engine: a private, frozen copy of the policy that samples rollouts.

    ``Sampler(model, dtype=torch.bfloat16)`` deep-copies ``model`` (so the trainer's weights and
    optimizer never alias it), puts the copy in eval mode without gradients and optionally casts it
    to another dtype: a bf16 sampler against an fp32 trainer is a real training-inference mismatch.
    ``load_state_dict(trainer.state_dict(), version)`` is the weight sync. ``generate`` and
    ``load_state_dict`` hold a lock, so a sync from another thread waits for the current generation
    (interrupt it early with ``stop_flag``).
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None, policy_version: int = 0) -> None:
        self.model: nn.Module = copy.deepcopy(model)
        for p in self.model.parameters():
            p.grad = None
        if dtype is not None:
            self.model.to(dtype=dtype)
        self.model.eval()
        self.model.requires_grad_(False)
        self.policy_version: int = int(policy_version)
        self._lock = threading.RLock()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_state_dict(self, state_dict: Mapping[str, Tensor], version: int | None = None) -> None:
        """Copy new weights in (cast to the sampler's dtype/device) and set the policy version.

        ``version=None`` increments the current version. Keys of weights tied to a loaded key (an LM
        head tied to the embeddings) may be missing; any other missing or unexpected key raises.
        """
        with self._lock, torch.no_grad():
            result = self.model.load_state_dict(dict(state_dict), strict=False)
            if result.unexpected_keys:
                raise KeyError(f"unexpected keys in state_dict: {sorted(result.unexpected_keys)[:5]}")
            if result.missing_keys:
                own = dict(self.model.state_dict(keep_vars=True))
                loaded_ptrs = {own[k].data_ptr() for k in state_dict if k in own}
                really_missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
                if really_missing:
                    raise KeyError(f"missing keys in state_dict: {sorted(really_missing)[:5]}")
            self.policy_version = self.policy_version + 1 if version is None else int(version)

    def sync_from(self, model: nn.Module, version: int | None = None) -> None:
        """``load_state_dict(model.state_dict(), version)``."""
        self.load_state_dict(model.state_dict(), version)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int | None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        continuations: Sequence[Sequence[int]] | None = None,
        continuation_log_probs: Sequence[Sequence[float]] | None = None,
        continuation_versions: Sequence[Sequence[int]] | None = None,
        stop_flag: Callable[[], bool] | None = None,
        prune_finished: bool = True,
    ) -> Rollout:
        """Sample one response per prompt (token-id lists, any lengths) with a KV cache.

        Prompts are left-padded; position ids follow the attention mask. Each step samples from
        ``softmax(logits / temperature)`` truncated to the top-p nucleus (argmax when
        ``temperature == 0``, see :func:`sample_tokens`) and records the token's log-prob ``mu``
        and ``self.policy_version``. A sequence stops at EOS (``finished=True``) or when its
        response holds ``max_new_tokens`` tokens (``finished=False``); rows that stop are pruned
        from the batch once enough of them accumulate (``prune_finished``; the samples do not
        depend on it). ``eos_token_id`` may be one id, several, or None (no EOS); ``pad_token_id``
        only fills masked positions (None means 0).

        Partial rollouts: ``continuations[i]`` is an already generated partial response of prompt
        ``i``. Prompt + partial response are prefilled under the *current* weights and sampling goes
        on; the partial tokens keep their recorded ``continuation_log_probs`` / ``continuation_versions``
        (required when ``continuations`` is given). They count towards ``max_new_tokens``, so a
        resumed response ends at the same length limit as an uninterrupted one.

        ``stop_flag`` is called before every decoding step (the prefill included); once it returns
        True, generation ends and unfinished sequences come back with ``finished=False``, ready to
        be passed as ``continuations`` later. Sampling is deterministic given ``generator``.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if eos_token_id is None:
            eos_ids: set[int] = set()
        elif isinstance(eos_token_id, int):
            eos_ids = {int(eos_token_id)}
        else:
            eos_ids = {int(e) for e in eos_token_id}
        pad = 0 if pad_token_id is None else int(pad_token_id)
        n = len(prompts)
        rows = self._init_rows(n, continuations, continuation_log_probs, continuation_versions)
        for i, p in enumerate(prompts):
            if len(p) + len(rows[i].tokens) == 0:
                raise ValueError(f"prompt {i} is empty: generation needs at least one token to condition on")
            if rows[i].tokens and rows[i].tokens[-1] in eos_ids:
                rows[i].finished = True

        with self._lock, torch.inference_mode():
            todo = [i for i in range(n) if not rows[i].finished and len(rows[i].tokens) < max_new_tokens]
            if todo:
                self._decode(
                    [list(prompts[i]) + rows[i].tokens for i in todo],
                    [rows[i] for i in todo],
                    max_new_tokens=max_new_tokens,
                    eos_ids=eos_ids,
                    pad_token_id=pad,
                    temperature=temperature,
                    top_p=top_p,
                    generator=generator,
                    stop_flag=stop_flag,
                    prune_finished=prune_finished,
                )
        return Rollout(
            prompt_ids=[list(p) for p in prompts],
            response_ids=[r.tokens for r in rows],
            behaviour_log_probs=[r.log_probs for r in rows],
            token_versions=[r.versions for r in rows],
            finished=[r.finished for r in rows],
        )

    # -- internals ----------------------------------------------------------------------------------

    @staticmethod
    def _init_rows(
        n: int,
        continuations: Sequence[Sequence[int]] | None,
        log_probs: Sequence[Sequence[float]] | None,
        versions: Sequence[Sequence[int]] | None,
    ) -> list[_Row]:
        if continuations is None:
            if log_probs is not None or versions is not None:
                raise ValueError("continuation_log_probs/versions given without continuations")
            return [_Row([], [], []) for _ in range(n)]
        if log_probs is None or versions is None:
            raise ValueError("continuations need continuation_log_probs and continuation_versions")
        if not len(continuations) == len(log_probs) == len(versions) == n:
            raise ValueError("continuations, their log-probs and versions need one entry per prompt")
        rows = []
        for i, (c, lp, v) in enumerate(zip(continuations, log_probs, versions)):
            if not len(c) == len(lp) == len(v):
                raise ValueError(f"continuation {i}: tokens, log-probs and versions differ in length")
            rows.append(_Row([int(x) for x in c], [float(x) for x in lp], [int(x) for x in v]))
        return rows

    def _decode(
        self,
        contexts: list[list[int]],
        rows: list[_Row],
        *,
        max_new_tokens: int,
        eos_ids: set[int],
        pad_token_id: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
        stop_flag: Callable[[], bool] | None,
        prune_finished: bool,
    ) -> None:
        """The decoding loop over the rows that still need tokens; fills ``rows`` in place."""
        model, device, version = self.model, self.device, self.policy_version
        ids, mask = left_pad(contexts, pad_token_id, device)
        positions = position_ids_from_mask(mask)
        padded = not bool(mask.all())
        next_pos = positions[:, -1:] + 1  # [b, 1] position of the next token
        live = list(range(len(rows)))  # rows[live[k]] is batch row k
        steps = max_new_tokens - min(len(r.tokens) for r in rows)
        cache = _make_cache(model, ids.shape[1] + steps)
        inputs: dict[str, Tensor] = {"input_ids": ids, "position_ids": positions}
        for _ in range(steps):
            if stop_flag is not None and stop_flag():
                return
            # Without padding the causal mask alone is right; skipping the 2D mask saves its expansion.
            logits = _forward_logits(model, 1, cache, attention_mask=mask if padded else None, **inputs)
            uniform = None
            if temperature > 0:  # one number per original sequence: pruning never shifts the draws
                uniform = torch.rand(len(rows), generator=generator, dtype=torch.float64)
                if len(live) != len(rows):
                    uniform = uniform[torch.tensor(live)]
            tokens, logp = sample_tokens(logits[:, -1], temperature=temperature, top_p=top_p, uniform=uniform)
            done_rows: list[int] = []
            for k, (tok, lp) in enumerate(zip(tokens.tolist(), logp.tolist())):
                row = rows[live[k]]
                if row.finished or len(row.tokens) >= max_new_tokens:
                    done_rows.append(k)  # already stopped; riding along until pruned
                    continue
                row.tokens.append(tok)
                row.log_probs.append(lp)
                row.versions.append(version)
                if tok in eos_ids:
                    row.finished = True
                if row.finished or len(row.tokens) >= max_new_tokens:
                    done_rows.append(k)
            if len(done_rows) == len(live):
                return
            if prune_finished and done_rows and len(done_rows) * 4 >= len(live):
                gone = set(done_rows)
                keep = torch.tensor([k for k in range(len(live)) if k not in gone], device=device)
                cache.batch_select_indices(keep)
                live = [live[k] for k in keep.tolist()]
                tokens, mask, next_pos = tokens[keep], mask[keep], next_pos[keep]
            if padded:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            inputs = {"input_ids": tokens[:, None], "position_ids": next_pos}
            next_pos = next_pos + 1
