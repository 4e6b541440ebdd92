"""Baseline probe: greedy accuracy of SmolLM2-135M-Instruct on candidate tasks, before any training.

For each candidate (reasoning-gym dataset + params, instruct prompt) it samples greedy responses to
``--prompts`` held-out prompts (the trainer's eval split) with the project's own sampler and prints:
accuracy under the task's reward (the text after the last ``Answer:``, scored by reasoning-gym),
the share of responses the reward cannot parse (no ``Answer:`` line; with ``--reward-fn``, the
responses it returns None for), the accuracy of a naive
"last number in the response" reading (how much a better format alone could give), the mean
response length and the share cut at ``--max-new-tokens``.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/smollm2_probe.py --prompts 128 \
        --out benchmarks/results/smollm2_probe.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

CANDIDATES = {
    "chain_sum_2x1": ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    "chain_sum_3x1": ("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
    "chain_sum_2x2": ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}),
    "chain_sum_3x2": ("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 2}),
    "products_2x1": ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    "basic_arithmetic_2": ("basic_arithmetic", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
    "basic_arithmetic_2t": ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    "basic_arithmetic_2t2d": ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
}

_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--show", type=int, default=2, help="responses printed per candidate")
    ap.add_argument(
        "--reward-fn",
        default="",
        help="a task.reward_fn such as vespo.tasks.final_answer:score (default: the task's Answer: scorer)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from vespo.rollout.engine import build_engine
    from vespo.rollout.prompts import encode_prompts
    from vespo.tasks import build_task
    from vespo.tasks.rewards import extract_answer
    from vespo.train.models import load_pretrained, smollm2_checkpoint
    from vespo.train.trainer import EVAL_DATA_SEED

    model, tok = load_pretrained(str(smollm2_checkpoint()))
    engine = build_engine("hf", model, dtype=args.dtype)
    results = {}
    for name in args.candidates.split(","):
        ds, params = CANDIDATES[name]
        spec = {"kind": "reasoning_gym", "name": ds, "params": params, "prompt_style": "instruct"}
        task = build_task({**spec, "reward_fn": args.reward_fn})
        examples = task.eval_examples(args.prompts, seed=EVAL_DATA_SEED)
        prompts = encode_prompts(tok, examples)
        t0 = time.perf_counter()
        out = engine.generate(
            prompts,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            temperature=0.0,
        )
        secs = time.perf_counter() - t0
        texts = [tok.decode(r, skip_special_tokens=True) for r in out.response_ids]
        raw_scores = [task.score(t, ex) for t, ex in zip(texts, examples)]
        scores = [float(r or 0.0) for r in raw_scores]
        if args.reward_fn:  # a reward function says "unparsed" by returning None
            unparsed = [r is None for r in raw_scores]
        else:
            unparsed = [extract_answer(t) is None for t in texts]
        naive = []
        for t, ex in zip(texts, examples):
            nums = _NUM.findall(t)
            naive.append(float(bool(nums) and task.score(f"Answer: {nums[-1]}", ex) >= 1.0))
        lengths = out.response_lengths
        row = {
            "dataset": ds,
            "params": params,
            "prompts": len(examples),
            "accuracy": sum(scores) / len(scores),
            "unparsed_frac": sum(unparsed) / len(unparsed),
            "naive_last_number_accuracy": sum(naive) / len(naive),
            "mean_length": sum(lengths) / len(lengths),
            "truncated_frac": sum(not f for f in out.finished) / len(lengths),
            "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
            "generate_s": secs,
        }
        results[name] = row
        print(json.dumps({name: row}), flush=True)
        for t in texts[: args.show]:
            print("   >>>", t.replace("\n", " | ")[:400], flush=True)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "max_new_tokens": args.max_new_tokens,
                    "dtype": args.dtype,
                    "reward_fn": args.reward_fn or None,
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
