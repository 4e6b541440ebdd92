"""The two shapes rollout data takes on its way from the sampler to the loss.

* :class:`Rollout`: ragged per-sequence lists, what a sampler engine returns and what travels
  through Ray as it is. Scoring fills ``rewards`` and ``advantages``; a reference pass (the
  trainer's precision under the sampling weights) may fill ``reference_log_probs``.
* :class:`RolloutBatch`: the same sequences as padded tensors, the one batch type from the rollout
  source to the loss (a rollout batch, its mini-batches and their micro-batch slices).

Names: ``rollout_log_prob`` is mu, the log-probability of each token under the distribution the
sampler actually drew it from (the loss library's ``rollout_log_prob=``); ``old_log_prob`` is what
the loss takes its ratio against (pi_old recomputed by the trainer, or mu itself);
``token_version`` is the policy version (optimizer step) of the weights that drew each token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

__all__ = ["Rollout", "RolloutBatch"]


@dataclass
class Rollout:
    """Sampled responses with per-token mu and policy versions (ragged lists, one entry a sequence).

    ``response_ids[i]`` ends with EOS iff ``finished[i]``; ``rollout_log_probs[i]``,
    ``token_versions[i]`` (and ``reference_log_probs[i]`` when present) have the length of
    ``response_ids[i]``. ``rewards``/``advantages`` are None until the rollout is scored.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rollout_log_probs: list[list[float]]
    token_versions: list[list[int]]
    finished: list[bool]
    reference_log_probs: list[list[float]] | None = None
    rewards: list[float] | None = None
    advantages: list[float] | None = None
    routed_experts: list[Tensor] | None = None  # per sequence [prompt + response, MoE layers, k] (routing.py)

    _PER_TOKEN = ("rollout_log_probs", "token_versions")
    _OPTIONAL = ("reference_log_probs", "rewards", "advantages", "routed_experts")

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        sizes = [len(self.response_ids), len(self.rollout_log_probs), len(self.token_versions), len(self.finished)]
        sizes += [len(getattr(self, name)) for name in self._OPTIONAL if getattr(self, name) is not None]
        if any(size != n for size in sizes):
            raise ValueError("Rollout fields must all have one entry per sequence")
        for i, response in enumerate(self.response_ids):
            lengths = [len(self.rollout_log_probs[i]), len(self.token_versions[i])]
            if self.reference_log_probs is not None:
                lengths.append(len(self.reference_log_probs[i]))
            if any(length != len(response) for length in lengths):
                raise ValueError(
                    f"sequence {i}: {len(response)} response tokens but per-token fields of lengths {lengths}"
                )
            if self.routed_experts is not None and len(self.routed_experts[i]) != len(self.prompt_ids[i]) + len(
                response
            ):
                raise ValueError(f"sequence {i}: routed_experts must cover its prompt and response tokens")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def response_lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]

    def select(self, indices: Iterable[int]) -> Rollout:
        """The sub-rollout of the given sequence indices (lists are copied)."""
        idx = list(indices)
        values = {}
        for f in fields(self):
            column = getattr(self, f.name)
            if column is None:
                values[f.name] = None
            else:
                values[f.name] = [list(column[i]) if isinstance(column[i], list) else column[i] for i in idx]
        return Rollout(**values)

    @staticmethod
    def concat(rollouts: Sequence[Rollout]) -> Rollout:
        """Sequences of several rollouts, in order; an optional field survives only if all have it."""
        values = {}
        for f in fields(Rollout):
            columns = [getattr(r, f.name) for r in rollouts]
            values[f.name] = None if any(c is None for c in columns) else [x for c in columns for x in c]
        return Rollout(**values)

    def to_batch(self, pad_id: int, *, device: torch.device | str | None = None) -> RolloutBatch:
        """Tensors for the trainer: left-padded prompts, right-padded responses (see :class:`RolloutBatch`)."""
        b = len(self)
        p = max((len(x) for x in self.prompt_ids), default=0)
        t = max((len(x) for x in self.response_ids), default=0)
        input_ids = torch.full((b, p + t), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, p + t), dtype=torch.long)
        response_mask = torch.zeros((b, t), dtype=torch.bool)
        mu = torch.zeros((b, t), dtype=torch.float32)
        version = torch.full((b, t), -1, dtype=torch.long)
        reference = torch.zeros((b, t), dtype=torch.float32) if self.reference_log_probs is not None else None
        routed = _routing_like(self.routed_experts, (b, p + t))
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
                mu[i, :lr] = torch.tensor(self.rollout_log_probs[i], dtype=torch.float32)
                version[i, :lr] = torch.tensor(self.token_versions[i], dtype=torch.long)
                if reference is not None:
                    reference[i, :lr] = torch.tensor(self.reference_log_probs[i], dtype=torch.float32)
            if routed is not None:
                routed[i, p - lp : p + lr] = self.routed_experts[i]
        batch = RolloutBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=response_mask,
            rollout_log_prob=mu,
            token_version=version,
            prompt_length=p,
            finished=torch.tensor(self.finished, dtype=torch.bool),
            reference_log_prob=reference,
            rewards=None if self.rewards is None else torch.tensor(self.rewards, dtype=torch.float32),
            advantages=None if self.advantages is None else torch.tensor(self.advantages, dtype=torch.float32),
            routed_experts=routed,
        )
        return batch.to(device) if device is not None else batch


def _routing_like(per_seq: list[Tensor] | None, shape: tuple[int, int]) -> Tensor | None:
    """An all-"not recorded" routing tensor ``[b, P + T, L, k]`` shaped like ``per_seq``'s entries."""
    if not per_seq:
        return None
    from vespo.rollout.routing import unknown_index

    first = per_seq[0]
    return torch.full((*shape, *first.shape[1:]), unknown_index(first.dtype), dtype=first.dtype)


@dataclass
class RolloutBatch:
    """Sequences as tensors (``b`` sequences, prompt width ``P``, response width ``T``), plus metrics.

    Attributes:
        input_ids: [b, P + T] prompts left-padded, responses right-padded.
        attention_mask: [b, P + T] (long) 1 on real prompt and response tokens.
        response_mask: [b, T] (bool) True on response tokens, up to and including EOS.
        rollout_log_prob: [b, T] mu per token (float32, 0 on padding).
        token_version: [b, T] policy version per token (-1 on padding).
        prompt_length: P.
        finished: [b] the response ended with EOS.
        reference_log_prob: [b, T] the trainer-precision policy of the sampling weights (splits log W
            into staleness and engine mismatch), when measured.
        rewards, advantages: [b] once scored.
        old_log_prob: [b, T] what the loss's ratio is taken against, once the source has set it.
        routed_experts: [b, P + T, L, k] the experts each position was routed to in the L MoE layers
            (sampler's for R3, pi_old's for R2; :mod:`vespo.rollout.routing`), when recorded.
        metrics: rollout metrics that go into the step's metrics row.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    rollout_log_prob: Tensor
    token_version: Tensor
    prompt_length: int
    finished: Tensor
    reference_log_prob: Tensor | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    old_log_prob: Tensor | None = None
    routed_experts: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    TENSORS = (
        "input_ids",
        "attention_mask",
        "response_mask",
        "rollout_log_prob",
        "token_version",
        "finished",
        "reference_log_prob",
        "rewards",
        "advantages",
        "old_log_prob",
        "routed_experts",
    )

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_length(self) -> int:
        """Response width ``T``."""
        return self.input_ids.shape[1] - self.prompt_length

    @property
    def response_ids(self) -> Tensor:
        """``[b, T]`` response tokens (pad id after the end)."""
        return self.input_ids[:, self.prompt_length :]

    def _map(self, fn, metrics: dict[str, float]) -> RolloutBatch:
        changes = {name: fn(getattr(self, name)) for name in self.TENSORS if getattr(self, name) is not None}
        return replace(self, **changes, metrics=metrics)

    def slice(self, start: int, stop: int) -> RolloutBatch:
        """Sequences ``start:stop`` (tensors only; metrics are not carried over)."""
        return self._map(lambda t: t[start:stop], {})

    def rows(self, indices: Tensor) -> RolloutBatch:
        """The sequences at ``indices`` ([k] long), in that order (tensors only; metrics are not carried over)."""
        return self._map(lambda t: t[indices.to(t.device)], {})

    def to(self, device: torch.device | str) -> RolloutBatch:
        """Copy with every tensor on ``device`` (metrics shared)."""
        return self._map(lambda t: t.to(device), self.metrics)

    def token_lag(self, policy_version: int) -> Tensor:
        """``[b, T]`` optimizer steps between each token's policy version and ``policy_version`` (0 on padding)."""
        return (policy_version - self.token_version).masked_fill(~self.response_mask, 0)

    def stale_index(self, policy_version: int) -> int:
        """The batch's staleness: the largest token lag. Sync mode: k for the k-th mini-batch of a
        rollout batch; async mode: the oldest token's age, partial rollouts included."""
        return int(self.token_lag(policy_version).max()) if self.response_mask.any() else 0

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        """Flat tensors for a checkpoint (see :meth:`from_tensors`)."""
        out = {f"{prefix}{n}": getattr(self, n) for n in self.TENSORS if getattr(self, n) is not None}
        out[f"{prefix}meta"] = torch.tensor([self.prompt_length])
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, metrics: dict[str, float]) -> RolloutBatch:
        values = {n: tensors.get(f"{prefix}{n}") for n in cls.TENSORS}
        prompt_length = int(tensors[f"{prefix}meta"].tolist()[0])
        return cls(**values, prompt_length=prompt_length, metrics=dict(metrics))
