"""Rollout sources: what the trainer draws its mini-batches from.

:class:`RolloutSource` is the one interface the trainer calls (sync and async alike):

    batch = source.next_batch(model, policy_version)   # a scored RolloutBatch with old_log_prob set
    ... train on it ...
    source.commit()                                    # it was trained on
    metrics = source.after_optimizer_step(model, step) # weight syncs (async); {} when nothing happened
    meta, tensors = source.state(); source.load_state(meta, tensors)   # checkpoints
    source.close()

:class:`SyncRolloutSource` is the paper's synchronous schedule: one rollout batch holds
``N x mini_batch_prompts`` prompts with ``G`` responses each (gbs = N * mbs); it is cut into N
mini-batches of whole prompt groups, trained one after another, so mini-batch k (0-based) is
trained k optimizer steps after it was sampled. The Ray source is
:class:`vespo.rollout.ray_source.AsyncRolloutSource`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from vespo.rollout.batch import RolloutBatch
from vespo.rollout.engine import SamplerEngine
from vespo.rollout.generate import REWARD_COUNTS, RolloutSettings, generate_and_score, rollout_metrics
from vespo.rollout.metrics import engine_mismatch_metrics
from vespo.rollout.prompts import PromptStream

__all__ = ["OldLogProbFn", "RolloutSource", "RolloutSourceError", "SyncRolloutSource", "split_minibatches"]

#: pi_old of a freshly sampled batch, computed by the trainer: ``[b, T]`` float32 on the CPU.
OldLogProbFn = Callable[[RolloutBatch], Tensor]


class RolloutSourceError(RuntimeError):
    """A rollout source failed between two optimizer steps (e.g. its async workers died); the
    trainer's state is consistent, so the trainer checkpoints before stopping."""


@runtime_checkable
class RolloutSource(Protocol):
    """What the trainer needs from a rollout source (see the module docstring)."""

    def next_batch(self, model: nn.Module, policy_version: int) -> RolloutBatch: ...

    def commit(self) -> None: ...

    def after_optimizer_step(self, model: nn.Module, step: int) -> dict[str, float]: ...

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]: ...

    def load_state(self, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None: ...

    def close(self) -> None: ...


def split_minibatches(batch: RolloutBatch, num_minibatches: int, group_size: int) -> list[RolloutBatch]:
    """Cut a rollout batch into ``num_minibatches`` consecutive runs of whole prompt groups."""
    n_seq = batch.num_sequences
    per = n_seq // num_minibatches
    if per * num_minibatches != n_seq or per % group_size:
        raise ValueError(f"{n_seq} sequences do not split into {num_minibatches} mini-batches of whole groups")
    return [batch.slice(k * per, (k + 1) * per) for k in range(num_minibatches)]


def set_old_log_prob(batch: RolloutBatch, old_log_prob_fn: OldLogProbFn | None) -> float:
    """``batch.old_log_prob``: recomputed by the trainer, or mu itself; returns the seconds it took."""
    t0 = time.perf_counter()
    batch.old_log_prob = old_log_prob_fn(batch) if old_log_prob_fn is not None else batch.rollout_log_prob
    return time.perf_counter() - t0


class SyncRolloutSource:
    """The paper's synchronous schedule (module docstring): sample a rollout batch of N mini-batches
    with the current weights, set pi_old once per mini-batch (before any of them is trained on),
    then hand them out one per step.

    State for checkpoints: the prompt stream position, the sampling generator and the mini-batches
    of the current rollout batch not yet trained on.
    """

    def __init__(
        self,
        *,
        settings: RolloutSettings,
        engine: SamplerEngine,
        stream: PromptStream,
        tokenizer: Any,
        reward_runner: Any,
        num_minibatches: int,
        minibatch_prompts: int,
        seed: int,
        old_log_prob_fn: OldLogProbFn | None = None,
        reference_fn: OldLogProbFn | None = None,
    ):
        """``reference_fn``: with ``old_log_prob_fn`` None (pi_old is mu), the trainer-precision log-probs
        under the sampling weights, for the mismatch metrics and the log W split only."""
        self.settings = settings
        self.engine = engine
        self.stream = stream
        self.tokenizer = tokenizer
        self.reward_runner = reward_runner
        self.generator = torch.Generator().manual_seed(seed)
        self.num_minibatches = num_minibatches
        self.minibatch_prompts = minibatch_prompts
        self.old_log_prob_fn = old_log_prob_fn
        self.reference_fn = reference_fn if old_log_prob_fn is None else None
        self.pending: list[RolloutBatch] = []
        self.rollout_index = 0

    def next_batch(self, model: nn.Module, policy_version: int) -> RolloutBatch:
        """The next mini-batch to train on; samples a new rollout batch when the last is used up."""
        if not self.pending:
            self._new_rollout_batch(model, policy_version)
        return self.pending[0]

    def commit(self) -> None:
        """Mark the mini-batch returned by :meth:`next_batch` as trained on."""
        self.pending.pop(0)

    def after_optimizer_step(self, model: nn.Module, step: int) -> dict[str, float]:
        """Nothing to do: the engine gets the weights at the start of each rollout batch."""
        return {}

    def _new_rollout_batch(self, model: nn.Module, policy_version: int) -> None:
        t0 = time.perf_counter()
        self.engine.load_state_dict(model.state_dict(), version=policy_version)
        sync_s = time.perf_counter() - t0
        examples = self.stream.take(self.num_minibatches * self.minibatch_prompts)
        rollout, stats = generate_and_score(
            self.engine,
            examples,
            tokenizer=self.tokenizer,
            reward_runner=self.reward_runner,
            settings=self.settings,
            generator=self.generator,
        )
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        minibatches = split_minibatches(rollout.to_batch(pad), self.num_minibatches, self.settings.group_size)
        info = {**rollout_metrics([stats]), "perf/sync_time_s": sync_s, "rollout/index": float(self.rollout_index)}
        if hasattr(self.engine, "start_time_s") and not getattr(self, "_start_logged", False):  # vllm: once per process
            info["perf/engine_start_s"] = float(self.engine.start_time_s)
            self._start_logged = True
        old_s = sum(set_old_log_prob(mb, self.old_log_prob_fn) for mb in minibatches)
        t0 = time.perf_counter()
        for mb in minibatches:
            # the trainer's precision under the sampling weights: the reference that splits log W into
            # staleness and engine mismatch (pi_old itself when recomputed)
            if self.old_log_prob_fn is not None:
                mb.reference_log_prob = mb.old_log_prob
            elif self.reference_fn is not None:
                mb.reference_log_prob = self.reference_fn(mb)
        reference_s = time.perf_counter() - t0
        for k, mb in enumerate(minibatches):
            mb.metrics = {**info, **engine_mismatch_metrics(mb)}
            if self.old_log_prob_fn is not None:
                mb.metrics["perf/old_log_prob_time_s"] = old_s
            elif self.reference_fn is not None:
                mb.metrics["perf/reference_time_s"] = reference_s
            if k:  # counts of the whole rollout batch appear once, on its first mini-batch's row
                for key in REWARD_COUNTS:
                    mb.metrics.pop(key, None)
        self.rollout_index += 1
        self.pending = minibatches

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        tensors = {"source.generator": self.generator.get_state()}
        for i, mb in enumerate(self.pending):
            tensors.update(mb.to_tensors(f"source.pending{i}."))
        meta = {
            "stream_position": self.stream.position,
            "rollout_index": self.rollout_index,
            "pending_metrics": [mb.metrics for mb in self.pending],
        }
        return meta, tensors

    def load_state(self, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.stream.position = int(meta["stream_position"])
        self.rollout_index = int(meta["rollout_index"])
        self.generator.set_state(tensors["source.generator"])
        self.pending = [
            RolloutBatch.from_tensors(tensors, f"source.pending{i}.", metrics)
            for i, metrics in enumerate(meta["pending_metrics"])
        ]

    def close(self) -> None:
        self.engine.close()
