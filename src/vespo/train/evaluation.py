"""Evaluation: greedy accuracy and sampled avg@k / pass@k on held-out prompts.

:func:`evaluate_policy` is a pure function of the weights it is given: it samples with its own
engine copy, scores, and returns the metrics; it writes nothing. The trainer decides what to do
with the result (track and save the best weights); ``vespo eval RUN --which latest|best`` calls it
on a checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from vespo.rollout.engine import SamplerEngine
from vespo.rollout.prompts import encode_prompts
from vespo.tasks import Example

__all__ = ["evaluate_policy"]


@torch.no_grad()
def evaluate_policy(
    engine: SamplerEngine,
    examples: Sequence[Example],
    *,
    tokenizer: Any,
    reward_runner: Any,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    avg_k: int,
    seed: int,
) -> dict[str, float]:
    """``eval/accuracy`` (greedy), ``eval/avg_at_k`` and ``eval/pass_at_k`` (``k`` samples per prompt at
    the training temperature and top-p), the mean greedy response length and the time it took.

    ``engine`` must already hold the weights to evaluate; sampling is seeded by ``seed``.
    """
    if not examples:
        raise ValueError("evaluation needs at least one held-out prompt (the eval split is empty)")
    t0 = time.perf_counter()
    prompts = encode_prompts(tokenizer, examples)
    generator = torch.Generator().manual_seed(seed)
    common = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generator=generator,
    )
    greedy = engine.generate(prompts, temperature=0.0, **common)
    greedy_scores, _ = reward_runner.score_batch(
        [tokenizer.decode(r, skip_special_tokens=True) for r in greedy.response_ids], examples
    )
    sampled = engine.generate(
        [p for p in prompts for _ in range(avg_k)], temperature=temperature, top_p=top_p, **common
    )
    sampled_scores, _ = reward_runner.score_batch(
        [tokenizer.decode(r, skip_special_tokens=True) for r in sampled.response_ids],
        [ex for ex in examples for _ in range(avg_k)],
    )
    per_prompt = torch.tensor(sampled_scores).reshape(-1, avg_k)
    return {
        "eval/accuracy": sum(greedy_scores) / len(greedy_scores),
        f"eval/avg_at_{avg_k}": per_prompt.mean().item(),
        f"eval/pass_at_{avg_k}": (per_prompt.max(-1).values > 0.5).float().mean().item(),
        "eval/response_length": sum(greedy.response_lengths) / len(greedy.response_ids),
        "perf/eval_time_s": time.perf_counter() - t0,
    }
