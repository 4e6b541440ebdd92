"""Generate and score: the one path from prompts to a scored :class:`Rollout`.

Both rollout sources call :func:`generate_and_score`: the sync source on a whole rollout batch, each
Ray worker on its chunk of prompt groups. For every example it samples G responses with the engine,
optionally measures the trainer-precision log-probs of the new tokens (:class:`ReferencePolicy`),
resumes responses a weight sync interrupted (partial rollouts), scores them and computes the group
advantages. :func:`rollout_metrics` turns the statistics of one or several such calls into the
``perf/*``, ``reward/*`` and ``mismatch/*`` entries of a metrics row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vespo.rollout.advantages import group_advantages
from vespo.rollout.batch import Rollout
from vespo.rollout.engine import SamplerEngine
from vespo.rollout.prompts import encode_prompts
from vespo.rollout.reference import ReferencePolicy
from vespo.tasks import Example

__all__ = ["REWARD_COUNTS", "RolloutSettings", "generate_and_score", "rollout_metrics"]

#: Reward outcomes counted per scored response (summed, never averaged, over chunks).
REWARD_COUNTS = ("reward/errors", "reward/timeouts", "reward/nonfinite", "reward/clipped", "reward/unparsed")


@dataclass(frozen=True)
class RolloutSettings:
    """How responses are sampled and scored: the rollout layer's own settings (no trainer config).

    ``engine``/``engine_options``: the sampler engine (:func:`vespo.rollout.engine.build_engine`);
    ``sampler_dtype`` its precision, ``trainer_dtype`` the trainer's (the reference precision).
    """

    group_size: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    normalize_adv_std: bool = True
    engine: str = "hf"
    sampler_dtype: str = "float32"
    trainer_dtype: str = "float32"
    engine_options: dict[str, Any] = field(default_factory=dict)
    reward_timeout_s: float | None = 5.0
    reward_workers: int = 2
    reward_isolation: str = "auto"
    record_routing: bool = False  # MoE on the hf engine: each token's experts travel with the rollout (R3)

    def reward_runner(self, task: Any) -> Any:
        """A :class:`vespo.tasks.RewardRunner` for ``task`` with these settings."""
        from vespo.tasks import RewardRunner

        return RewardRunner(
            task, timeout_s=self.reward_timeout_s, workers=self.reward_workers, isolation=self.reward_isolation
        )


def generate_and_score(
    engine: SamplerEngine,
    examples: Sequence[Example],
    *,
    tokenizer: Any,
    reward_runner: Any,
    settings: RolloutSettings,
    generator: torch.Generator,
    reference: ReferencePolicy | None = None,
    stop_flag: Callable[[], bool] | None = None,
    on_interrupt: Callable[[], None] | None = None,
) -> tuple[Rollout, dict[str, float]]:
    """G responses per example, scored, with group advantages; and the call's statistics.

    ``stop_flag`` (partial rollouts) lets the engine stop early; ``on_interrupt`` is then called
    (it loads the new weights) and the open responses are resumed under them, so one response may
    carry tokens of several policy versions. The returned rollout lists the G responses of
    example 0 first, then example 1, and so on.
    """
    g = settings.group_size
    prompts = [p for p in encode_prompts(tokenizer, examples) for _ in range(g)]
    n = len(prompts)
    reference_log_probs: list[list[float]] = [[] for _ in range(n)]
    flips: list[float] = []
    interrupted: set[int] = set()
    segments = 0
    version_start = engine.policy_version
    if settings.record_routing:
        engine.record_routing = True
    t0 = time.perf_counter()
    rollout: Rollout | None = None
    while True:
        before = [0] * n if rollout is None else rollout.response_lengths
        rollout = engine.generate(
            prompts,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            temperature=settings.temperature,
            top_p=settings.top_p,
            generator=generator,
            resume=rollout,
            stop_flag=stop_flag,
        )
        segments += 1
        if reference is not None:
            flips.extend(reference.score_segment(rollout, before, reference_log_probs))
        open_rows = [
            i for i in range(n) if not rollout.finished[i] and len(rollout.response_ids[i]) < settings.max_new_tokens
        ]
        if not open_rows:
            break
        if on_interrupt is None:
            raise RuntimeError("the engine stopped early but there is no way to resume (on_interrupt is None)")
        interrupted.update(open_rows)  # interrupted by a weight sync: continue under the new weights
        on_interrupt()
    sample_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    responses = [tokenizer.decode(r, skip_special_tokens=True) for r in rollout.response_ids]
    scores, reward_stats = reward_runner.score_batch(responses, [ex for ex in examples for _ in range(g)])
    rewards = torch.tensor(scores, dtype=torch.float32)
    rollout.rewards = rewards.tolist()
    rollout.advantages = group_advantages(rewards, g, normalize_std=settings.normalize_adv_std).tolist()
    if reference is not None:
        rollout.reference_log_probs = reference_log_probs
    stats = {
        "sample_time_s": sample_s,
        "reward_time_s": time.perf_counter() - t1,
        "tokens": float(sum(rollout.response_lengths)),
        "segments": float(segments),
        "interrupted_rows": float(len(interrupted)),
        "rows": float(n),
        "version_start": float(version_start),
        "version_end": float(engine.policy_version),
        **{key: float(reward_stats.get(key, 0.0)) for key in REWARD_COUNTS},
    }
    if flips:
        stats["routing_flip_frac"] = sum(flips) / len(flips)
    return rollout, stats


def rollout_metrics(stats: Sequence[dict[str, float]]) -> dict[str, float]:
    """Metrics of the :func:`generate_and_score` calls behind one step: times averaged per call,
    throughput over all of them, reward outcome counts summed (each response counted once)."""
    if not stats:
        return {}
    calls = len(stats)
    sample_s = sum(s["sample_time_s"] for s in stats)
    out = {
        "perf/sample_time_s": sample_s / calls,
        "perf/reward_time_s": sum(s["reward_time_s"] for s in stats) / calls,
        "perf/sample_tokens_per_s": sum(s["tokens"] for s in stats) / max(sample_s, 1e-9),
        "rollout/interrupted_rows_frac": sum(s["interrupted_rows"] for s in stats)
        / max(sum(s["rows"] for s in stats), 1.0),
    }
    for key in REWARD_COUNTS:
        out[key] = sum(s.get(key, 0.0) for s in stats)
    out["reward/unparsed_frac"] = out["reward/unparsed"] / max(sum(s["rows"] for s in stats), 1.0)
    flips = [s["routing_flip_frac"] for s in stats if "routing_flip_frac" in s]
    if flips:
        out["mismatch/routing_flip_frac"] = sum(flips) / len(flips)
    return out
