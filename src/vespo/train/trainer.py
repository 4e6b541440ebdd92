"""The training loop, top to bottom.

    setup      task, model + tokenizer, sampler copy, optimizer, rollout source, metrics
    warm-up    optional supervised steps on task demonstrations (random-init models)
    loop       for each optimizer step:
                 mini-batch <- rollout source   (sync: N mini-batches per rollout batch;
                                                 async: groups from Ray workers)
                 log pi_theta on the mini-batch  -> compute_policy_loss(...)  -> backward
                 clip, AdamW step, metrics.jsonl / TensorBoard, eval every K, checkpoint every K
    end        final eval, summary table, summary.json

The staleness experiment of the paper is the sync source with ``algorithm.staleness = N``:
the k-th mini-batch of a rollout batch is trained k optimizer steps after it was sampled, and
every N sees the same number of optimizer steps and samples.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vespo.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from vespo.train.config import ConfigError, TrainConfig, load_config, save_config
from vespo.losses import compute_policy_loss
from vespo.train.metrics_log import MetricsWriter
from vespo.train.models import (
    build_char_tokenizer,
    build_tiny_model,
    count_parameters,
    load_pretrained,
    smollm2_checkpoint,
)
from vespo.rollout.source import (
    MiniBatch,
    PromptStream,
    RolloutSourceError,
    SyncRolloutSource,
    encode_prompts,
    minibatch_metrics,
)
from vespo.rollout.sampler import Sampler, sequence_log_probs_and_entropy
from vespo.tasks import Example, RewardRunner, build_task

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: the eval and train splits of procedural tasks come from fixed data seeds, so that runs with
#: different ``run.seed`` (sampling, order, init) are scored on the same eval prompts.
TRAIN_DATA_SEED, EVAL_DATA_SEED = 1234, 98765


# --------------------------------------------------------------------------------------- setup
def build_policy(cfg: TrainConfig) -> tuple[torch.nn.Module, Any]:
    """Model and tokenizer as the config asks; weights from ``model.init_from`` if given."""
    m = cfg.model
    if m.kind == "tiny":
        tokenizer = build_char_tokenizer()
        model = build_tiny_model(
            m.arch,
            vocab_size=len(tokenizer),
            hidden_size=m.hidden_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            intermediate_size=m.intermediate_size,
            num_experts=m.num_experts,
            num_experts_per_tok=m.num_experts_per_tok,
            max_position_embeddings=1024,
            seed=cfg.run.seed,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    elif m.kind == "smollm2":
        model, tokenizer = load_pretrained(str(smollm2_checkpoint()), dtype=DTYPES[m.dtype])
    else:
        model, tokenizer = load_pretrained(m.name_or_path, dtype=DTYPES[m.dtype], gguf_file=m.gguf_file)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if m.init_from:
        load_init_weights(model, m.init_from)
    return model.to(DTYPES[m.dtype]), tokenizer


def load_init_weights(model: torch.nn.Module, source: str) -> None:
    """Load weights from a .safetensors file, or from a run directory (warm-up or latest checkpoint)."""
    from safetensors.torch import load_model

    path = Path(source)
    if path.is_dir():
        candidates = [path / "warmup" / "model.safetensors"]
        ckpt = latest_checkpoint(path)
        if ckpt is not None:
            candidates.insert(0, ckpt / "model.safetensors")
        path = next((c for c in candidates if c.exists()), candidates[-1])
    if not path.exists():
        raise ConfigError(f"model.init_from: {source} has no model weights (.safetensors)")
    try:
        load_model(model, str(path), strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"model.init_from: weights in {path} do not fit this model: {str(exc)[:200]}") from None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else must be a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"run.device: '{name}' is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name} but no CUDA device is available")
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_eval: dict[str, float]
    best_eval: dict[str, float]
    wall_time_s: float


class Trainer:
    """Owns the model, optimizer, rollout source and run directory of one training run."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.out_dir)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        if resume and latest_checkpoint(self.run_dir) is None:
            raise CheckpointError(f"{self.run_dir} has no checkpoint to resume from")
        if not resume and latest_checkpoint(self.run_dir) is not None:
            raise ConfigError(
                f"{self.run_dir} already holds a run; use 'vespo train --resume {self.run_dir}' "
                "or choose another run.out_dir"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        _seed_everything(cfg.run.seed)

        self.task = build_task(cfg.task.spec())
        self.train_examples = self.task.train_examples(cfg.task.train_size, seed=TRAIN_DATA_SEED)
        self.eval_examples = self.task.eval_examples(cfg.eval.num_prompts, seed=EVAL_DATA_SEED)
        self.reward_runner = RewardRunner(self.task, timeout_s=cfg.task.reward_timeout_s)

        self.device = resolve_device(cfg.run.device)
        self.model, self.tokenizer = build_policy(cfg)
        self.model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
        )
        self.step = 0
        self.best_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.elapsed_before = 0.0
        self.source = self._build_source()
        self.eval_sampler = Sampler(self.model, dtype=DTYPES[cfg.model.dtype])
        self.resumed = False
        if resume:
            self._restore()
            self.resumed = True

    def _build_source(self):
        cfg = self.cfg
        old_fn = self.recompute_old_log_prob if cfg.algorithm.old_log_prob == "recompute" else None
        if cfg.run.mode == "async":
            from vespo.rollout.ray_source import AsyncRolloutSource

            return AsyncRolloutSource(cfg, model=self.model, tokenizer=self.tokenizer, task=self.task,
                                      train_examples=self.train_examples, old_log_prob_fn=old_fn)
        return SyncRolloutSource(
            sampler=Sampler(self.model, dtype=DTYPES[cfg.sampling.sampler_dtype]),
            stream=PromptStream(self.train_examples, seed=cfg.run.seed),
            tokenizer=self.tokenizer,
            reward_runner=self.reward_runner,
            generator=torch.Generator().manual_seed(cfg.run.seed),
            num_minibatches=cfg.algorithm.staleness,
            minibatch_prompts=cfg.algorithm.mini_batch_prompts,
            group_size=cfg.sampling.group_size,
            max_new_tokens=cfg.sampling.max_new_tokens,
            temperature=cfg.sampling.temperature,
            top_p=cfg.sampling.top_p,
            normalize_adv_std=cfg.algorithm.normalize_adv_std,
            old_log_prob_fn=old_fn,
        )

    # ------------------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        cfg = self.cfg
        writer = MetricsWriter(self.run_dir, tensorboard=cfg.logging.tensorboard,
                               resume_step=self.step if self.resumed else None)
        start = time.perf_counter()
        stop = _StopFlag()
        try:
            if not self.resumed:
                self.warm_up(stop)
                if cfg.eval.at_start:
                    writer.write({"step": 0, **self.evaluate()})
                self.save()
            with _progress(cfg, self.step) as progress:
                while self.step < cfg.run.total_steps and not stop.requested:
                    try:
                        row = self.train_step()
                    except RolloutSourceError:  # raised between steps: checkpoint what we have
                        self.elapsed_before += time.perf_counter() - start
                        start = time.perf_counter()
                        self.save()
                        raise
                    if self.step % cfg.eval.every == 0 or self.step == cfg.run.total_steps:
                        row.update(self.evaluate())
                    row["perf/elapsed_s"] = self.elapsed_before + time.perf_counter() - start
                    writer.write(row)
                    if self.step % cfg.checkpoint.every == 0 or self.step == cfg.run.total_steps:
                        self.elapsed_before += time.perf_counter() - start
                        start = time.perf_counter()
                        self.save()
                    progress(self.step, row, self.last_eval)
            if stop.requested:
                self.elapsed_before += time.perf_counter() - start
                start = time.perf_counter()
                self.save()
                raise KeyboardInterrupt
        finally:
            stop.restore()
            writer.close()
            self.source.close()
        wall = self.elapsed_before + time.perf_counter() - start
        result = TrainResult(self.run_dir, self.step, self.last_eval, self.best_eval, wall)
        self._write_summary(result)
        return result

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the next mini-batch; returns its metrics row."""
        cfg = self.cfg
        t0 = time.perf_counter()
        mb = self.source.next_minibatch(self.model, policy_version=self.step)
        t_data = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics = self._optimize(mb)
        self.source.commit()
        self.step += 1
        if hasattr(self.source, "after_optimizer_step"):
            metrics.update(self.source.after_optimizer_step(self.model, self.step))
        t_train = time.perf_counter() - t1
        tokens = float(mb.attention_mask.sum())
        versions_behind = self._versions_behind(mb, policy_version=self.step - 1)
        row = {
            "step": self.step,
            "stale/index": float(mb.stale_index),
            **versions_behind,
            **minibatch_metrics(mb, cfg.sampling.group_size),
            **mb.metrics,
            **metrics,
            "perf/step_time_s": t_data + t_train,
            "perf/train_time_s": t_train,
            "perf/tokens_per_s": tokens / max(t_train, 1e-9),
            "optim/lr": self.optimizer.param_groups[0]["lr"],
        }
        return row

    @staticmethod
    def _versions_behind(mb: MiniBatch, policy_version: int) -> dict[str, float]:
        """Token-weighted staleness: how many optimizer steps old each trained token is."""
        mask = mb.response_mask.bool()
        lag = (policy_version - mb.token_version)[mask].float()
        return {"stale/versions_behind_mean": lag.mean().item(), "stale/versions_behind_max": lag.max().item()}

    def _micro_slices(self, n: int) -> list[tuple[int, int]]:
        size = self.cfg.algorithm.micro_batch_size or n
        return [(i, min(i + size, n)) for i in range(0, n, size)]

    def _log_probs(self, mb: MiniBatch) -> tuple[torch.Tensor, torch.Tensor]:
        mb = mb.to(self.device)
        return sequence_log_probs_and_entropy(
            self.model, mb.input_ids, mb.attention_mask, mb.response_mask.shape[1],
            temperature=self.cfg.sampling.temperature,
        )

    @torch.no_grad()
    def recompute_old_log_prob(self, mb: MiniBatch) -> torch.Tensor:
        """pi_old of a freshly sampled mini-batch, by the trainer (same micro-batches as training)."""
        parts = [self._log_probs(mb.slice(a, b))[0] for a, b in self._micro_slices(mb.num_sequences)]
        return torch.cat(parts).float().cpu()

    def _optimize(self, mb: MiniBatch) -> dict[str, float]:
        cfg, alg = self.cfg, self.cfg.algorithm
        mask = mb.response_mask.bool()
        n_tokens = float(mask.sum())
        n_seqs = float(mask.any(-1).sum())
        sums: dict[str, float] = {}
        entropy_sum = 0.0
        use_correction = alg.correction != "none"
        # sources that report pi_theta-vs-mu gaps (async) get the log-probs of this step's forward
        seen = torch.zeros_like(mb.behaviour_log_prob) if hasattr(self.source, "log_prob_metrics") else None
        for a, b in self._micro_slices(mb.num_sequences):
            micro = mb.slice(a, b).to(self.device)
            if not micro.response_mask.any():
                continue
            log_prob, entropy = self._log_probs(micro)
            if seen is not None:
                seen[a:b] = log_prob.detach().float().cpu()
            out = compute_policy_loss(
                alg.loss,
                log_prob=log_prob,
                old_log_prob=micro.old_log_prob,
                advantages=micro.advantages,
                response_mask=micro.response_mask,
                loss_agg_mode=alg.loss_agg_mode,
                rollout_log_prob=micro.behaviour_log_prob if use_correction else None,
                correction=alg.correction if use_correction else None,
                correction_high=alg.correction_high if use_correction else None,
                correction_low=alg.correction_low if use_correction else None,
                global_num_tokens=n_tokens,
                global_num_seqs=n_seqs,
                norm_length=cfg.sampling.max_new_tokens,
                **alg.loss_params,
            )
            out.loss.backward()
            # micro losses use the mini-batch's global counts, so they add up to its loss;
            # the other metrics are averaged, weighted by the micro-batch's share of sequences
            share = (b - a) / mb.num_sequences
            for key, value in out.metrics.items():
                weight = 1.0 if key == "loss/value" else share
                sums[key] = sums.get(key, 0.0) + weight * value
            entropy_sum += float((entropy.detach().float() * micro.response_mask).sum().cpu())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        skipped = not math.isfinite(float(grad_norm))
        if skipped:  # never let a NaN/Inf reach the weights
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        sums["grad/norm"] = float(grad_norm) if not skipped else float("nan")
        sums["grad/skipped"] = float(skipped)
        sums["policy/entropy"] = entropy_sum / max(n_tokens, 1.0)
        if mb.old_log_prob is not None:
            diff = (mb.old_log_prob - mb.behaviour_log_prob)[mask]
            sums["mismatch/old_vs_sampler_abs_diff"] = diff.abs().mean().item()
        if seen is not None:
            sums.update(self.source.log_prob_metrics(mb, seen))
        return sums

    # --------------------------------------------------------------------------- warm-up
    def warm_up(self, stop: "_StopFlag | None" = None) -> None:
        """Supervised steps on task demonstrations (prompt masked), before RL; logged to warmup.jsonl.

        Interrupted (SIGTERM/Ctrl-C), it stops at once without a checkpoint: the warm-up is short
        and a rerun starts it again.
        """
        wcfg = self.cfg.warmup
        if wcfg.steps == 0:
            return
        pairs = []
        for ex in self.train_examples:
            demo = self.task.demonstration(ex)
            if demo:
                prompt = encode_prompts(self.tokenizer, [ex])[0]
                response = self.tokenizer.encode(demo, add_special_tokens=False) + [self.tokenizer.eos_token_id]
                pairs.append((prompt, response))
        if not pairs:
            raise ConfigError(f"warmup.steps > 0 but task '{self.cfg.task.name}' has no demonstrations")
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=wcfg.lr, weight_decay=0.0)
        rng = random.Random(self.cfg.run.seed + 17)
        pad = self.tokenizer.pad_token_id
        with open(self.run_dir / "warmup.jsonl", "w", buffering=1) as log, \
                _progress(self.cfg, 0, total=wcfg.steps, label="warm-up") as progress:
            for step in range(1, wcfg.steps + 1):
                if stop is not None and stop.requested:
                    raise KeyboardInterrupt
                batch = [pairs[rng.randrange(len(pairs))] for _ in range(wcfg.batch_size)]
                loss = self._sft_loss(batch, pad)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                row = {"warmup/step": step, "warmup/loss": loss.item()}
                log.write(json.dumps(row) + "\n")
                progress(step, row, {})
        out = self.run_dir / "warmup"
        out.mkdir(exist_ok=True)
        from safetensors.torch import save_model

        tmp = out / "model.safetensors.tmp"
        save_model(self.model, str(tmp))
        tmp.replace(out / "model.safetensors")  # atomic: sweeps treat its existence as "done"

    def _sft_loss(self, batch: list[tuple[list[int], list[int]]], pad: int) -> torch.Tensor:
        seqs = [p + r for p, r in batch]
        length = max(map(len, seqs))
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        attn = torch.zeros_like(ids)
        for i, (p, r) in enumerate(batch):
            seq = p + r
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
            labels[i, len(p) : len(seq)] = torch.tensor(r)
        return self.model(input_ids=ids, attention_mask=attn, labels=labels).loss

    # -------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy and sampled avg@k on the held-out prompts; tracks the best checkpoint."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.eval_sampler.load_state_dict(self.model.state_dict(), version=self.step)
        examples = self.eval_examples
        prompts = encode_prompts(self.tokenizer, examples)
        gen = torch.Generator().manual_seed(cfg.run.seed * 7919 + self.step)
        common = dict(max_new_tokens=cfg.sampling.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                      pad_token_id=self.tokenizer.pad_token_id, generator=gen)
        greedy = self.eval_sampler.generate(prompts, temperature=0.0, **common)
        greedy_scores, _ = self.reward_runner.score_batch(
            [self.tokenizer.decode(r, skip_special_tokens=True) for r in greedy.response_ids], examples)
        k = cfg.eval.avg_k
        sampled = self.eval_sampler.generate([p for p in prompts for _ in range(k)],
                                             temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                             **common)
        sampled_scores, _ = self.reward_runner.score_batch(
            [self.tokenizer.decode(r, skip_special_tokens=True) for r in sampled.response_ids],
            [ex for ex in examples for _ in range(k)])
        per_prompt = torch.tensor(sampled_scores).reshape(-1, k)
        result = {
            "eval/accuracy": sum(greedy_scores) / len(greedy_scores),
            f"eval/avg_at_{k}": per_prompt.mean().item(),
            f"eval/pass_at_{k}": (per_prompt.max(-1).values > 0.5).float().mean().item(),
            "eval/response_length": sum(map(len, greedy.response_ids)) / len(greedy.response_ids),
            "perf/eval_time_s": time.perf_counter() - t0,
        }
        self.last_eval = {"step": float(self.step), **result}
        if not self.best_eval or result["eval/accuracy"] > self.best_eval["eval/accuracy"]:
            self.best_eval = dict(self.last_eval)
            self._save_best()
        return result

    def _save_best(self) -> None:
        from safetensors.torch import save_model

        best = self.run_dir / "best"
        best.mkdir(exist_ok=True)
        tmp = best / "model.safetensors.tmp"
        save_model(self.model, str(tmp))
        tmp.replace(best / "model.safetensors")
        write_json_atomic(best / "best.json", self.best_eval)

    # ------------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        source_meta, source_tensors = self.source.state()
        tensors = {"rng.torch": torch.get_rng_state(), **source_tensors}
        state = {
            "source": source_meta,
            "best_eval": self.best_eval,
            "last_eval": self.last_eval,
            "elapsed_s": self.elapsed_before,
            "python_random": _encode_random_state(random.getstate()),
        }
        return save_checkpoint(self.run_dir, self.step, model=self.model, optimizer=self.optimizer,
                               tensors=tensors, state=state, keep_last=self.cfg.checkpoint.keep_last)

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.run_dir, model=self.model, optimizer=self.optimizer)
        self.step = int(ckpt.state["step"])
        self.best_eval = ckpt.state.get("best_eval", {})
        self.last_eval = ckpt.state.get("last_eval", {})
        self.elapsed_before = float(ckpt.state.get("elapsed_s", 0.0))
        torch.set_rng_state(ckpt.tensors["rng.torch"])
        random.setstate(_decode_random_state(ckpt.state["python_random"]))
        self.source.load_state(ckpt.state["source"], ckpt.tensors)

    def _write_summary(self, result: TrainResult) -> None:
        summary = {
            "run_dir": str(result.run_dir),
            "steps": result.steps,
            "wall_time_s": result.wall_time_s,
            "final_eval": result.final_eval,
            "best_eval": result.best_eval,
            "loss": self.cfg.algorithm.loss,
            "staleness": self.cfg.algorithm.staleness,
            "parameters": count_parameters(self.model),
        }
        write_json_atomic(self.run_dir / "summary.json", summary)


# ---------------------------------------------------------------------------- entry points
def train(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Run (or resume) training as configured; prints a summary table at the end."""
    trainer = Trainer(cfg, resume=resume)
    result = trainer.train()
    if cfg.logging.progress:
        print_summary(result, trainer)
    return result


def run_warmup(cfg: TrainConfig) -> Path:
    """Only the supervised warm-up; writes ``run.out_dir/warmup/model.safetensors`` and returns it."""
    if cfg.warmup.steps == 0:
        raise ConfigError("warmup.steps is 0: nothing to warm up")
    out = Path(cfg.run.out_dir)
    weights = out / "warmup" / "model.safetensors"
    if weights.exists():
        return weights
    cfg = cfg.model_copy(deep=True)
    cfg.run.mode = "sync"  # the warm-up needs no rollout workers
    trainer = Trainer(cfg)
    trainer.warm_up()
    trainer.source.close()
    return weights


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """The config saved in ``run_dir`` (with ``overrides``, e.g. run.total_steps=400)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a vespo run directory (no config.yaml)")
    cfg = load_config(path, overrides)
    if Path(cfg.run.out_dir).resolve() != Path(run_dir).resolve():
        cfg = load_config(path, [*(overrides or []), f"run.out_dir={run_dir}"])
    return cfg


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None, *, which: str = "latest") -> dict[str, float]:
    """Evaluate a run's latest (or best) weights on its eval split and print the result."""
    cfg = resume_config(run_dir, overrides)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = cfg
    trainer.run_dir = Path(run_dir)
    trainer.task = build_task(cfg.task.spec())
    trainer.eval_examples = trainer.task.eval_examples(cfg.eval.num_prompts, seed=EVAL_DATA_SEED)
    trainer.reward_runner = RewardRunner(trainer.task, timeout_s=cfg.task.reward_timeout_s)
    trainer.device = resolve_device(cfg.run.device)
    trainer.model, trainer.tokenizer = build_policy(cfg)
    trainer.model.to(trainer.device)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no checkpoint to evaluate")
    load_init_weights(trainer.model, str(ckpt / "model.safetensors"))
    trainer.step = int(json.loads((ckpt / "state.json").read_text())["step"])
    trainer.eval_sampler = Sampler(trainer.model, dtype=DTYPES[cfg.model.dtype])
    trainer.best_eval, trainer.last_eval = {"eval/accuracy": math.inf}, {}
    result = trainer.evaluate()
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evaluation of {run_dir} at step {trainer.step}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}")
    Console().print(table)
    return result


def print_summary(result: TrainResult, trainer: Trainer) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = []
    metrics_path = result.run_dir / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if metrics_path.exists() else []
    start_acc = next((r["eval/accuracy"] for r in lines if "eval/accuracy" in r), None)
    rewards = [r["reward/mean"] for r in lines if "reward/mean" in r]
    table = Table(title=f"vespo run summary: {result.run_dir}")
    table.add_column("")
    table.add_column("value", justify="right")
    if trainer.cfg.run.mode == "async":
        acfg = trainer.cfg.async_
        rows.append(("loss / async", f"{trainer.cfg.algorithm.loss} / sync_every {acfg.sync_every}, "
                     f"staleness_threshold {acfg.staleness_threshold:g}"))
    else:
        rows.append(("loss / staleness N", f"{trainer.cfg.algorithm.loss} / {trainer.cfg.algorithm.staleness}"))
    rows.append(("optimizer steps", str(result.steps)))
    rows.append(("wall time", f"{result.wall_time_s:.0f} s"))
    if start_acc is not None:
        rows.append(("eval accuracy at start", f"{start_acc:.3f}"))
    if result.final_eval:
        rows.append(("eval accuracy at end", f"{result.final_eval['eval/accuracy']:.3f}"))
    if result.best_eval:
        rows.append(("best eval accuracy (step)", f"{result.best_eval['eval/accuracy']:.3f} ({int(result.best_eval['step'])})"))
    if rewards:
        head, tail = rewards[: max(1, len(rewards) // 10)], rewards[-max(1, len(rewards) // 10):]
        rows.append(("train reward first 10% -> last 10%", f"{sum(head)/len(head):.3f} -> {sum(tail)/len(tail):.3f}"))
    for row in rows:
        table.add_row(*row)
    Console().print(table)


# ------------------------------------------------------------------------------- helpers
class _StopFlag:
    """SIGTERM/SIGINT ask the loop to stop after the current step and checkpoint."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _progress:
    """A rich progress bar with live reward and accuracy (a no-op when logging.progress is off)."""

    def __init__(self, cfg: TrainConfig, done: int, total: int | None = None, label: str = "train"):
        self.enabled = cfg.logging.progress
        self.total = total if total is not None else cfg.run.total_steps
        self.done = done
        self.label = label

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.done, info="")
        return self._update

    def _update(self, step: int, row: dict[str, float], last_eval: dict[str, float]) -> None:
        if not self.enabled:
            return
        parts = []
        if "reward/mean" in row:
            parts.append(f"reward {row['reward/mean']:.3f}")
        if "warmup/loss" in row:
            parts.append(f"loss {row['warmup/loss']:.3f}")
        if "eval/accuracy" in last_eval:
            parts.append(f"eval acc {last_eval['eval/accuracy']:.3f}")
        if "phi/mean" in row:
            parts.append(f"phi {row['phi/mean']:.2f}")
        self._bar.update(self._task, completed=step, info="  ".join(parts))

    def __exit__(self, *exc):
        if self.enabled:
            self._bar.stop()
        return False


def _encode_random_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_random_state(data: list) -> tuple:
    return (data[0], tuple(data[1]), data[2])
