"""The ``hf`` sampler engine: batched KV-cache sampling on the transformers model.

:class:`Sampler` keeps its own copy of the policy (possibly in bf16) and samples responses. For
every sampled token it records mu, the log-probability under the distribution the token was
actually drawn from (temperature-scaled, top-p truncated and renormalised), and the policy version
that produced it. Generation can be interrupted (``stop_flag``) and resumed later under newer
weights (``resume``): the partial rollouts of asynchronous training.

With the same weights in fp32, temperature and ``top_p=1``, mu agrees with the trainer's full
forward (:func:`vespo.rollout.log_probs.sequence_log_probs`) to ~1e-6; any gap left is the
train/inference mismatch (bf16 sampler, MoE routing flips) or staleness that the off-policy
losses correct for.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vespo.rollout.batch import Rollout
from vespo.rollout.log_probs import forward_logits, left_pad, position_ids_from_mask

__all__ = ["Sampler", "sample_tokens"]


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
    routing: Any = None  # recorded experts, when recording (vespo.rollout.routing.SamplerRouting)


class Sampler:
    """The ``hf`` engine (:class:`vespo.rollout.engine.SamplerEngine`): a private, frozen copy of the
    policy that samples rollouts.

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
        self.record_routing = False  # MoE: record each token's experts (routing replay R3)

    supports_partial_rollout = True

    def close(self) -> None:
        """Nothing to release: the engine lives in this process."""

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
        resume: Rollout | None = None,
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

        Partial rollouts: ``resume`` is the rollout an earlier (interrupted) call returned for the
        same prompts. Prompt + partial response are prefilled under the *current* weights and
        sampling goes on; the partial tokens keep their recorded mu and versions. They count towards
        ``max_new_tokens``, so a resumed response ends at the same length limit as an uninterrupted one.

        ``stop_flag`` is called before every decoding step (the prefill included); once it returns
        True, generation ends and unfinished sequences come back with ``finished=False``, ready to
        be passed as ``resume`` later. Sampling is deterministic given ``generator``.
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
        rows = self._init_rows(n, resume)
        for i, p in enumerate(prompts):
            if len(p) + len(rows[i].tokens) == 0:
                raise ValueError(f"prompt {i} is empty: generation needs at least one token to condition on")
            if rows[i].tokens and rows[i].tokens[-1] in eos_ids:
                rows[i].finished = True

        from vespo.rollout.routing import SamplerRouting

        routing = SamplerRouting(self.model) if self.record_routing else contextlib.nullcontext()
        with self._lock, torch.inference_mode(), routing:
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
                    routing=routing if self.record_routing else None,
                )
        return Rollout(
            prompt_ids=[list(p) for p in prompts],
            response_ids=[r.tokens for r in rows],
            rollout_log_probs=[r.log_probs for r in rows],
            token_versions=[r.versions for r in rows],
            finished=[r.finished for r in rows],
            routed_experts=routing.finish(prompts, rows) if self.record_routing else None,
        )

    # -- internals ----------------------------------------------------------------------------------

    @staticmethod
    def _init_rows(n: int, resume: Rollout | None) -> list[_Row]:
        if resume is None:
            return [_Row([], [], []) for _ in range(n)]
        if len(resume) != n:
            raise ValueError(f"resume holds {len(resume)} sequences for {n} prompts")
        routed = resume.routed_experts or [None] * n
        return [
            _Row(list(r), list(lp), list(v), routing=e)
            for r, lp, v, e in zip(resume.response_ids, resume.rollout_log_probs, resume.token_versions, routed)
        ]

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
        routing: Any = None,
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
            logits = forward_logits(model, 1, cache, attention_mask=mask if padded else None, **inputs)
            if routing is not None:
                routing.collect(rows, live, mask if padded else None)
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
