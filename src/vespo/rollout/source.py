"""From prompts to scored, advantage-weighted mini-batches.

One rollout batch holds ``N x mini_batch_prompts`` prompts with ``G`` responses each (the paper's
gbs = N * mbs); it is cut into N mini-batches of whole prompt groups, trained one after another,
so mini-batch k (0-based) is trained k optimizer steps after it was sampled.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch

from vespo.rollout.advantages import group_advantages
from vespo.train.models import apply_chat_template_or_plain
from vespo.rollout.sampler import PaddedRollout, Rollout, Sampler
from vespo.tasks import Example


class PromptStream:
    """An endless, reproducible stream of training examples: one shuffled pass after another.

    ``position`` (prompts handed out so far) is the whole state, so a resumed run continues with
    exactly the prompts it would have seen.
    """

    def __init__(self, examples: Sequence[Example], seed: int, position: int = 0):
        if not examples:
            raise ValueError("the task produced no training examples")
        self.examples = list(examples)
        self.seed = seed
        self.position = position

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Example]:
        out = []
        size = len(self.examples)
        while len(out) < n:
            epoch, offset = divmod(self.position, size)
            order = self._order(epoch)
            chunk = order[offset : offset + (n - len(out))]
            out.extend(self.examples[i] for i in chunk)
            self.position += len(chunk)
        return out


@dataclass
class MiniBatch:
    """Tensors of one optimizer step (``b`` sequences = prompts x G), plus bookkeeping.

    Attributes:
        input_ids: [b, P + T] prompts left-padded, responses right-padded.
        attention_mask: [b, P + T].
        response_mask: [b, T] 1 on response tokens (up to and including EOS).
        behaviour_log_prob: [b, T] mu, the sampler's log-prob of each token.
        old_log_prob: [b, T] pi_old recomputed by the trainer, or mu when taken from the sampler.
        token_version: [b, T] policy version that produced each token.
        advantages: [b] group advantages; rewards: [b] scores.
        prompt_length: P.
        stale_index: k, the mini-batch's position within its rollout batch (0 = freshest).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    behaviour_log_prob: torch.Tensor
    old_log_prob: torch.Tensor | None
    token_version: torch.Tensor
    advantages: torch.Tensor
    rewards: torch.Tensor
    prompt_length: int
    stale_index: int = 0
    finished: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    TENSORS = ("input_ids", "attention_mask", "response_mask", "behaviour_log_prob", "old_log_prob",
               "token_version", "advantages", "rewards", "finished")

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, stop: int) -> "MiniBatch":
        """Sequences ``start:stop`` (tensors only; metrics are not carried over)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self.TENSORS:
            value = kwargs[name]
            if value is not None:
                kwargs[name] = value[start:stop]
        kwargs["metrics"] = {}
        return MiniBatch(**kwargs)

    @classmethod
    def from_rollout(
        cls, padded: PaddedRollout, *, advantages: torch.Tensor, rewards: torch.Tensor, stale_index: int = 0
    ) -> "MiniBatch":
        """A mini-batch of freshly sampled, scored sequences (pi_old not yet known)."""
        return cls(
            input_ids=padded.input_ids,
            attention_mask=padded.attention_mask,
            response_mask=padded.response_mask,
            behaviour_log_prob=padded.behaviour_log_prob,
            old_log_prob=None,
            token_version=padded.token_version,
            advantages=advantages,
            rewards=rewards,
            prompt_length=padded.prompt_length,
            stale_index=stale_index,
            finished=padded.finished,
        )

    def to(self, device: torch.device | str) -> "MiniBatch":
        """Copy with every tensor on ``device`` (metrics and bookkeeping shared)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self.TENSORS:
            if kwargs[name] is not None:
                kwargs[name] = kwargs[name].to(device)
        return MiniBatch(**kwargs)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}{n}": getattr(self, n) for n in self.TENSORS if getattr(self, n) is not None}
        out[f"{prefix}meta"] = torch.tensor([self.prompt_length, self.stale_index])
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, metrics: dict[str, float]) -> "MiniBatch":
        meta = tensors[f"{prefix}meta"].tolist()
        values = {n: tensors.get(f"{prefix}{n}") for n in cls.TENSORS}
        return cls(**values, prompt_length=int(meta[0]), stale_index=int(meta[1]), metrics=dict(metrics))


def encode_prompts(tokenizer, examples: Sequence[Example]) -> list[list[int]]:
    return [apply_chat_template_or_plain(tokenizer, ex.prompt) for ex in examples]


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in rollout.response_ids]


def score_rollout(
    *,
    rollout: Rollout,
    examples: Sequence[Example],
    group_size: int,
    tokenizer,
    reward_runner,
    normalize_adv_std: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Rewards [B], group advantages [B] and reward stats for a rollout of ``len(examples) * G``."""
    responses = decode_responses(tokenizer, rollout)
    expanded = [ex for ex in examples for _ in range(group_size)]
    scores, stats = reward_runner.score_batch(responses, expanded)
    rewards = torch.tensor(scores, dtype=torch.float32)
    advantages = group_advantages(rewards, group_size, normalize_std=normalize_adv_std)
    return rewards, advantages, dict(stats)


def minibatch_metrics(mb: MiniBatch, group_size: int) -> dict[str, float]:
    """reward/*, response/* statistics of one mini-batch."""
    lengths = mb.response_mask.sum(-1).float()
    grouped = mb.rewards.reshape(-1, group_size)
    solved = (grouped.max(-1).values > 0).float()
    informative = (grouped.std(-1) > 0).float()
    out = {
        "reward/mean": mb.rewards.mean().item(),
        "reward/std": mb.rewards.std().item() if mb.rewards.numel() > 1 else 0.0,
        "reward/group_solved_frac": solved.mean().item(),
        "reward/informative_group_frac": informative.mean().item(),
        "response/length_mean": lengths.mean().item(),
        "response/length_max": lengths.max().item(),
    }
    if mb.finished is not None:
        out["response/truncated_frac"] = 1.0 - mb.finished.float().mean().item()
    return out


def build_rollout_batch(
    *,
    sampler: Sampler,
    examples: Sequence[Example],
    tokenizer,
    reward_runner,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
    normalize_adv_std: bool,
) -> tuple[MiniBatch, dict[str, float]]:
    """Sample G responses per example, score them and return one big MiniBatch (all prompts)."""
    prompts = encode_prompts(tokenizer, examples)
    repeated = [p for p in prompts for _ in range(group_size)]
    t0 = time.perf_counter()
    rollout = sampler.generate(
        repeated,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    sample_time = time.perf_counter() - t0
    t1 = time.perf_counter()
    rewards, advantages, stats = score_rollout(
        rollout=rollout, examples=examples, group_size=group_size, tokenizer=tokenizer,
        reward_runner=reward_runner, normalize_adv_std=normalize_adv_std,
    )
    reward_time = time.perf_counter() - t1
    padded = rollout.to_padded(tokenizer.pad_token_id)
    batch = MiniBatch.from_rollout(padded, advantages=advantages, rewards=rewards)
    new_tokens = int(padded.response_mask.sum())
    info = {
        "perf/sample_time_s": sample_time,
        "perf/reward_time_s": reward_time,
        "perf/sample_tokens_per_s": new_tokens / max(sample_time, 1e-9),
    }
    for key, value in stats.items():  # reward/errors, reward/timeouts, ...; timings go under perf/
        name = key if "/" in key else f"reward/{key}"
        if name.endswith("_time_s"):
            name = "perf/" + name.split("/", 1)[1]
        info[name] = float(value)
    return batch, info


def split_minibatches(batch: MiniBatch, num_minibatches: int, group_size: int) -> list[MiniBatch]:
    """Cut a rollout batch into ``num_minibatches`` consecutive runs of whole prompt groups."""
    n_seq = batch.num_sequences
    per = n_seq // num_minibatches
    if per * num_minibatches != n_seq or per % group_size:
        raise ValueError(f"{n_seq} sequences do not split into {num_minibatches} mini-batches of whole groups")
    out = []
    for k in range(num_minibatches):
        mb = batch.slice(k * per, (k + 1) * per)
        mb.stale_index = k
        out.append(mb)
    return out


OldLogProbFn = Callable[[MiniBatch], torch.Tensor]


class RolloutSourceError(RuntimeError):
    """A rollout source failed between two optimizer steps (e.g. its async workers died); the
    trainer's state is consistent, so the trainer checkpoints before stopping."""


class SyncRolloutSource:
    """The paper's synchronous schedule: sample a rollout batch of N mini-batches with the current
    weights, recompute pi_old once (optional), then hand out the mini-batches one per step.

    State for checkpoints: the prompt stream position, the sampling generator and the mini-batches
    of the current rollout batch not yet trained on.
    """

    def __init__(
        self,
        *,
        sampler: Sampler,
        stream: PromptStream,
        tokenizer,
        reward_runner,
        generator: torch.Generator,
        num_minibatches: int,
        minibatch_prompts: int,
        group_size: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        normalize_adv_std: bool,
        old_log_prob_fn: OldLogProbFn | None,
    ):
        self.sampler = sampler
        self.stream = stream
        self.tokenizer = tokenizer
        self.reward_runner = reward_runner
        self.generator = generator
        self.num_minibatches = num_minibatches
        self.minibatch_prompts = minibatch_prompts
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.normalize_adv_std = normalize_adv_std
        self.old_log_prob_fn = old_log_prob_fn
        self.pending: list[MiniBatch] = []
        self.rollout_index = 0

    def next_minibatch(self, model: torch.nn.Module, policy_version: int) -> MiniBatch:
        """The next mini-batch to train on; samples a new rollout batch when the last is used up."""
        if not self.pending:
            self._new_rollout_batch(model, policy_version)
        return self.pending[0]

    def commit(self) -> None:
        """Mark the mini-batch returned by :meth:`next_minibatch` as trained on."""
        self.pending.pop(0)

    def _new_rollout_batch(self, model: torch.nn.Module, policy_version: int) -> None:
        self.sampler.load_state_dict(model.state_dict(), version=policy_version)
        examples = self.stream.take(self.num_minibatches * self.minibatch_prompts)
        batch, info = build_rollout_batch(
            sampler=self.sampler, examples=examples, tokenizer=self.tokenizer,
            reward_runner=self.reward_runner, group_size=self.group_size,
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            generator=self.generator, normalize_adv_std=self.normalize_adv_std,
        )
        minibatches = split_minibatches(batch, self.num_minibatches, self.group_size)
        t0 = time.perf_counter()
        for mb in minibatches:
            mb.old_log_prob = self.old_log_prob_fn(mb) if self.old_log_prob_fn else mb.behaviour_log_prob
            mb.metrics = {**info, "rollout/index": float(self.rollout_index)}
        if self.old_log_prob_fn:
            info["perf/old_log_prob_time_s"] = time.perf_counter() - t0
            for mb in minibatches:
                mb.metrics["perf/old_log_prob_time_s"] = info["perf/old_log_prob_time_s"]
        self.rollout_index += 1
        self.pending = minibatches

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors = {"source.generator": self.generator.get_state()}
        for i, mb in enumerate(self.pending):
            tensors.update(mb.to_tensors(f"source.pending{i}."))
        meta = {
            "stream_position": self.stream.position,
            "rollout_index": self.rollout_index,
            "pending_metrics": [mb.metrics for mb in self.pending],
        }
        return meta, tensors

    def load_state(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.stream.position = int(meta["stream_position"])
        self.rollout_index = int(meta["rollout_index"])
        self.generator.set_state(tensors["source.generator"])
        self.pending = [
            MiniBatch.from_tensors(tensors, f"source.pending{i}.", metrics)
            for i, metrics in enumerate(meta["pending_metrics"])
        ]

    def close(self) -> None:
        """Nothing to release in synchronous mode."""
