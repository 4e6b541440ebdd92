"""Speed options on SmolLM2-135M-Instruct: update tokens/s and peak RSS of the trainer's step, as
ratios against the plain fp32 full fine-tune measured in the same run (docs/real_lm.md).

Each variant runs in its own subprocess (so its peak RSS is its own) and does what
``Trainer._optimize`` does, with the trainer's own helpers: per micro-batch a forward with
gradients (:func:`sequence_log_probs_and_entropy`, under ``precision.autocast``), the VESPO loss
(:func:`compute_policy_loss`), backward; then clip and AdamW. The options are applied by the
trainer's code paths (``lora.apply_lora``, ``precision.enable_gradient_checkpointing``). The batch
is the config's shape: ``--seqs`` sequences of a 67-token prompt and a response whose lengths are
drawn from the seed-0 run's distribution (mean ~70, max 128, so ~30 % padding), random token ids
(timing does not depend on them). One untimed step, then ``--steps`` timed steps. Also timed: the
no-grad pi_old forward (what ``algorithm.old_log_prob=sampler`` skips) and, for the padding
question, the same number of real tokens with no padding at all (every response of the mean
length: the upper bound of what packed, padding-free batches could save) and the trainer's packed
forward (``algorithm.packing``: :func:`vespo.train.packing.packed_log_probs_and_entropy`).

Figures: wall tokens/s and process-CPU tokens/s (CPU seconds of the 2 threads; robust to other
jobs on a shared machine), peak RSS (``getrusage``) and RSS after loading the model.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/smollm2_speed.py \
        --out benchmarks/results/smollm2_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "fp32": {},
    "autocast_bf16": {"autocast": "bfloat16"},
    "lora_r16": {"lora": 16},
    "lora_r16+autocast_bf16": {"lora": 16, "autocast": "bfloat16"},
    "grad_ckpt": {"gc": True},
    "micro_batch_4": {"micro": 4},
    "grad_ckpt+micro_4": {"gc": True, "micro": 4},
    "lora_r16+autocast+grad_ckpt": {"lora": 16, "autocast": "bfloat16", "gc": True},
    "fp32_no_padding": {"nopad": True},
    "packed": {"packed": True},
    "packed_width_1x": {"packed": True, "factors": [1]},
    "lora_r16+packed": {"lora": 16, "packed": True},
}

PROMPT = 67


def _lengths(n: int, seed: int) -> list[int]:
    """Response lengths like the seed-0 run's (mean ~70, ~10 % cut at 128)."""
    import random

    rng = random.Random(seed)
    return [128 if rng.random() < 0.1 else max(8, min(127, int(rng.gauss(62, 20)))) for _ in range(n)]


def child(spec: dict, seqs: int, steps: int, threads: int) -> dict:
    import resource

    import torch

    torch.set_num_threads(threads)
    from vespo.losses import compute_policy_loss
    from vespo.rollout.log_probs import sequence_log_probs_and_entropy
    from vespo.train import lora, precision
    from vespo.train.models import load_pretrained, smollm2_checkpoint
    from vespo.train.packing import packed_log_probs_and_entropy

    model, _ = load_pretrained(str(smollm2_checkpoint()))
    if spec.get("lora"):
        model = lora.apply_lora(
            model, r=spec["lora"], alpha=2 * spec["lora"], dropout=0.0, target_modules=list(lora.DEFAULT_TARGET_MODULES)
        )
    if spec.get("gc"):
        precision.enable_gradient_checkpointing(model)
    model.train()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    params = lora.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-5)
    lengths = _lengths(seqs, 0)
    if spec.get("nopad"):
        mean = round(sum(lengths) / len(lengths))
        lengths = [mean] * seqs
    t = max(lengths)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (seqs, PROMPT + t), generator=g)
    attn = torch.ones_like(ids)
    resp_mask = torch.zeros(seqs, t)
    for i, n in enumerate(lengths):
        attn[i, PROMPT + n :] = 0
        resp_mask[i, :n] = 1
    adv = torch.randn(seqs, 1).expand(seqs, t).contiguous()
    old = torch.full((seqs, t), -2.0)
    micro = spec.get("micro") or seqs
    mode = spec.get("autocast", "none")
    n_tok, n_seq = float(resp_mask.sum()), float(seqs)
    forward = sequence_log_probs_and_entropy
    if spec.get("packed"):
        factors = tuple(spec.get("factors", ())) or None

        def forward(*a, **k):  # noqa: F811 - the packed forward, rows as the trainer lays them out
            return packed_log_probs_and_entropy(*a, **k, **({"width_factors": factors} if factors else {}))

    def step() -> None:
        for a in range(0, seqs, micro):
            b = min(a + micro, seqs)
            with precision.autocast(mode):
                logp, _ = forward(model, ids[a:b], attn[a:b], t)
                out = compute_policy_loss(
                    "vespo",
                    log_prob=logp,
                    old_log_prob=old[a:b],
                    advantages=adv[a:b],
                    response_mask=resp_mask[a:b],
                    loss_agg_mode="token-mean",
                    global_num_tokens=n_tok,
                    global_num_seqs=n_seq,
                    norm_length=128,
                )
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, AdamW state)
    wall, cpu = [], []
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    with torch.no_grad():  # pi_old: the no-grad forward that old_log_prob=sampler skips
        w0, c0 = time.perf_counter(), time.process_time()
        for a in range(0, seqs, micro):
            with precision.autocast(mode):
                forward(model, ids[a : a + micro], attn[a : a + micro], t, grad=False)
        old_wall, old_cpu = time.perf_counter() - w0, time.process_time() - c0
    tokens = float(attn.sum())
    return {
        "spec": spec,
        "seqs": seqs,
        "width": PROMPT + t,
        "real_tokens": tokens,
        "pad_frac": 1 - tokens / attn.numel(),
        "step_wall_s": sorted(wall)[len(wall) // 2],
        "step_cpu_s": sorted(cpu)[len(cpu) // 2],
        "tokens_per_s_wall": tokens / sorted(wall)[len(wall) // 2],
        "tokens_per_s_cpu": tokens / sorted(cpu)[len(cpu) // 2] * threads,
        "old_log_prob_wall_s": old_wall,
        "old_log_prob_cpu_s": old_cpu,
        "trainable_params": sum(p.numel() for p in params),
        "rss_after_load_gb": rss_loaded,
        "peak_rss_gb": precision.peak_rss_gb(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.seqs, args.steps, args.threads)))
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    results: dict[str, dict] = {}
    t_start = time.perf_counter()
    for name in args.variants.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            json.dumps(VARIANTS[name]),
            "--seqs",
            str(args.seqs),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            results[name] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({name: results[name]}), flush=True)
    base = results.get("fp32", {})
    lines = [
        f"{'variant':30s} {'tok/s wall':>10s} {'x fp32':>7s} {'tok/s cpu':>10s} {'x fp32':>7s} "
        f"{'peak RSS GB':>11s} {'x fp32':>7s} {'pi_old s':>8s}"
    ]
    for name, r in results.items():
        if "error" in r or "tokens_per_s_wall" not in base:
            lines.append(f"{name:30s} failed: {r.get('error')}" if "error" in r else f"{name:30s} (no fp32 baseline)")
            continue
        lines.append(
            f"{name:30s} {r['tokens_per_s_wall']:10.1f} {r['tokens_per_s_wall'] / base['tokens_per_s_wall']:7.2f} "
            f"{r['tokens_per_s_cpu']:10.1f} {r['tokens_per_s_cpu'] / base['tokens_per_s_cpu']:7.2f} "
            f"{r['peak_rss_gb']:11.2f} {r['peak_rss_gb'] / base['peak_rss_gb']:7.2f} {r['old_log_prob_wall_s']:8.1f}"
        )
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "seqs": args.seqs,
                    "steps": args.steps,
                    "threads": args.threads,
                    "wall_s": time.perf_counter() - t_start,
                    "results": results,
                    "table": lines,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
