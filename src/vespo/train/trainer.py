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
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vespo.losses import compute_policy_loss
from vespo.rollout.batch import RolloutBatch
from vespo.rollout.engine import DTYPES, build_engine
from vespo.rollout.generate import RolloutSettings
from vespo.rollout.log_probs import sequence_log_probs_and_entropy
from vespo.rollout.metrics import batch_metrics, log_w_split_metrics, staleness_metrics
from vespo.rollout.prompts import PromptStream, encode_prompts
from vespo.rollout.routing import TrainerRouting
from vespo.rollout.source import RolloutSource, RolloutSourceError, SyncRolloutSource
from vespo.tasks import RewardRunner, build_task
from vespo.train import preflight
from vespo.train.checkpoint import (
    CheckpointError,
    WarmupCheckpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from vespo.train.config import ConfigError, TrainConfig, load_config, save_config
from vespo.train.evaluation import evaluate_policy
from vespo.train.lora import apply_lora, engine_model, merged_state_dict, sync_view, trainable_parameters
from vespo.train.metrics_log import MetricsWriter
from vespo.train.models import (
    build_char_tokenizer,
    build_tiny_model,
    count_parameters,
    load_pretrained,
    smollm2_checkpoint,
)
from vespo.train.packing import (
    PackingError,
    check_packing_support,
    packed_log_probs_and_entropy,
    packed_pad_fraction,
)
from vespo.train.precision import (
    TrainingOutOfMemory,
    autocast,
    bf16_speed_warning,
    enable_gradient_checkpointing,
    is_out_of_memory,
    out_of_memory_message,
    peak_rss_gb,
    resolve_auto_precision,
)
from vespo.train.zero_advantage import rows_with_gradient

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
    init = init_weights_file(m.init_from) if m.init_from else None
    adapters = init is not None and holds_lora_adapters(init)  # e.g. a LoRA run's best/model.safetensors
    if adapters and m.lora is None:
        raise ConfigError(
            f"model.init_from: {init} holds LoRA adapters; set model.lora to the settings it was trained with"
        )
    if init is not None and not adapters:
        load_init_weights(model, str(init))
    if m.lora is not None:  # speed options (docs/real_lm.md): adapters; engines get merged weights
        model = apply_lora(model, **m.lora.model_dump())
    if adapters:
        load_init_weights(model, str(init))
    if m.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.algorithm.packing:
        try:
            check_packing_support(model)
        except PackingError as exc:
            raise ConfigError(str(exc)) from None
    return model.to(DTYPES[m.dtype]), tokenizer


def init_weights_file(source: str) -> Path:
    """The .safetensors file ``model.init_from`` names: the file itself, or a run directory's latest
    checkpoint (else its warm-up weights)."""
    path = Path(source)
    if path.is_dir():
        candidates = [path / "warmup" / "model.safetensors"]
        ckpt = latest_checkpoint(path)
        if ckpt is not None:
            candidates.insert(0, ckpt / "model.safetensors")
        path = next((c for c in candidates if c.exists()), candidates[-1])
    if not path.exists():
        raise ConfigError(f"model.init_from: {source} has no model weights (.safetensors)")
    return path


def holds_lora_adapters(path: Path) -> bool:
    """Whether a weights file was saved from a LoRA (peft) model: it must be loaded after the adapters go on."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(".lora_A." in key for key in f.keys())


def load_init_weights(model: torch.nn.Module, source: str) -> None:
    """Load weights from a .safetensors file, or from a run directory (warm-up or latest checkpoint).

    Every tensor of the file must belong to the model (a file saved from another architecture, or
    from a LoRA model into a model without adapters, is an error, never a silent no-op); tensors the
    file lacks (tied heads) keep their values."""
    from safetensors.torch import load_model

    path = init_weights_file(source)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"model.init_from: weights in {path} do not fit this model: {str(exc)[:200]}") from None
    if unexpected or len(missing) >= len(model.state_dict()):
        names = ", ".join(sorted(unexpected)[:3]) or "none of the model's"
        raise ConfigError(f"model.init_from: weights in {path} do not fit this model (tensors: {names} ...)")


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
        # pre-flight (train/preflight.py): nothing is written before every check has passed
        restore = preflight.check_run_dir(cfg, resume=resume)
        self.continue_warmup = resume and not restore  # resumed before its first checkpoint
        preflight.check_data_files(cfg)
        _seed_everything(cfg.run.seed)

        self.task = build_task(cfg.task.spec())
        self.train_examples = self.task.train_examples(cfg.task.train_size, seed=TRAIN_DATA_SEED)
        self.eval_examples = self.task.eval_examples(cfg.eval.num_prompts, seed=EVAL_DATA_SEED)
        self.reward_runner = self.rollout_settings().reward_runner(self.task)

        self.device = resolve_device(cfg.run.device)
        requested_cfg = cfg.model_copy(deep=True)  # what config.yaml keeps: "auto" is resolved again on resume
        for note in resolve_auto_precision(cfg, self.device):
            print(f"vespo: {note}", file=sys.stderr)
        if (slow := bf16_speed_warning(cfg, self.device)) is not None:
            print(f"vespo: warning: {slow}", file=sys.stderr)
        self.model, self.tokenizer = build_policy(cfg)
        self.train_examples, self.eval_examples = preflight.check_examples(
            cfg, self.tokenizer, self.model, self.train_examples, self.eval_examples
        )
        self.model.to(self.device).train()
        self.sync_model = sync_view(self.model)  # what engines sync from (merged weights under LoRA)
        self.optimizer = torch.optim.AdamW(
            trainable_parameters(self.model),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
        )
        self.step = 0
        self.best_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.elapsed_before = 0.0
        self.source: RolloutSource = self._build_source()
        self.eval_engine = build_engine("hf", engine_model(self.model), dtype=cfg.model.dtype)
        self.resumed = False
        if restore:
            try:
                self._restore()
            except BaseException:
                self.source.close()
                raise
            self.resumed = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(requested_cfg, self.run_dir / "config.yaml")  # only once the run is valid (and restored)

    def rollout_settings(self) -> RolloutSettings:
        """The rollout layer's view of the config."""
        cfg, smp = self.cfg, self.cfg.sampling
        return RolloutSettings(
            group_size=smp.group_size,
            max_new_tokens=smp.max_new_tokens,
            temperature=smp.temperature,
            top_p=smp.top_p,
            normalize_adv_std=cfg.algorithm.normalize_adv_std,
            engine=smp.engine,
            sampler_dtype=smp.sampler_dtype,
            trainer_dtype=cfg.model.dtype,
            engine_options=dict(smp.engine_options),
            reward_timeout_s=cfg.task.reward_timeout_s,
            reward_workers=cfg.task.reward_workers,
            reward_isolation=cfg.task.reward_isolation,
            record_routing=cfg.algorithm.routing_replay == "r3",
        )

    def _build_source(self) -> RolloutSource:
        cfg = self.cfg
        self.routing = TrainerRouting(cfg.algorithm.routing_replay, self.model)  # MoE routing replay (R2/R3)
        settings = self.rollout_settings()
        old_fn = self.recompute_old_log_prob if cfg.algorithm.old_log_prob == "recompute" else None
        if cfg.run.mode == "async":
            from vespo.rollout.ray_source import AsyncRolloutSource, AsyncSettings

            acfg = cfg.async_
            if cfg.run.threads is None and not acfg.ray_address:  # the workers' cores are not the trainer's
                torch.set_num_threads(max(1, (os.cpu_count() or 1) - acfg.num_workers * acfg.worker_threads))
            async_settings = AsyncSettings(**{name: getattr(acfg, name) for name in AsyncSettings.__dataclass_fields__})
            return AsyncRolloutSource(
                settings,
                async_settings,
                model=engine_model(self.model),
                tokenizer=self.tokenizer,
                task=self.task,
                train_examples=self.train_examples,
                mini_batch_prompts=cfg.algorithm.mini_batch_prompts,
                seed=cfg.run.seed,
                run_dir=self.run_dir,
                old_log_prob_fn=old_fn,
            )
        return SyncRolloutSource(
            settings=settings,
            engine=build_engine(
                settings.engine, engine_model(self.model), dtype=settings.sampler_dtype, options=settings.engine_options
            ),
            stream=PromptStream(self.train_examples, seed=cfg.run.seed),
            tokenizer=self.tokenizer,
            reward_runner=self.reward_runner,
            num_minibatches=cfg.algorithm.staleness,
            minibatch_prompts=cfg.algorithm.mini_batch_prompts,
            seed=cfg.run.seed,
            old_log_prob_fn=old_fn,
            reference_fn=self.recompute_old_log_prob if cfg.algorithm.measure_mismatch else None,
        )

    # ------------------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        cfg = self.cfg
        writer = MetricsWriter(
            self.run_dir, tensorboard=cfg.logging.tensorboard, resume_step=self.step if self.resumed else None
        )
        start = time.perf_counter()
        stop = _StopFlag()
        try:
            if not self.resumed:
                self.warm_up(stop)
                if cfg.eval.at_start:
                    writer.write({"step": 0, **self.evaluate()})
                self.save()
            with _progress(cfg, self.step) as progress:
                longest_step = 0.0
                while self.step < cfg.run.total_steps and not stop.requested:
                    t_step = time.perf_counter()
                    try:
                        row = self.train_step()
                    except RolloutSourceError:  # raised between steps: checkpoint what we have
                        self.elapsed_before += time.perf_counter() - start
                        start = time.perf_counter()
                        self.save()
                        raise
                    except (RuntimeError, MemoryError) as exc:
                        if not is_out_of_memory(exc):
                            raise
                        self.optimizer.zero_grad(set_to_none=True)  # the step is redone on resume
                        self.elapsed_before += time.perf_counter() - start
                        start = time.perf_counter()
                        path = self.save()
                        raise TrainingOutOfMemory(out_of_memory_message(cfg, self._last_shape, str(path))) from None
                    longest_step = max(longest_step, time.perf_counter() - t_step)
                    last = self.step == cfg.run.total_steps or self._time_is_up(start, longest_step)
                    if self.step % cfg.eval.every == 0 or last:
                        row.update(self.evaluate())
                    row["perf/elapsed_s"] = self.elapsed_before + time.perf_counter() - start
                    writer.write(row)
                    if self.step % cfg.checkpoint.every == 0 or last:
                        self.elapsed_before += time.perf_counter() - start
                        start = time.perf_counter()
                        self.save()
                    progress(self.step, row, self.last_eval)
                    if last:
                        break
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

    def _time_is_up(self, start: float, longest_step: float) -> bool:
        """True when another step (as long as the longest so far) would end past ``run.time_limit_minutes``."""
        limit = self.cfg.run.time_limit_minutes
        elapsed = self.elapsed_before + time.perf_counter() - start
        if limit is None or elapsed + longest_step < 60.0 * limit:
            return False
        print(
            f"vespo: run.time_limit_minutes={limit:g}: stopping after step {self.step} of {self.cfg.run.total_steps} "
            f"({elapsed / 60:.1f} min; a step takes up to {longest_step / 60:.1f} min): final eval and checkpoint",
            file=sys.stderr,
        )
        return True

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the next mini-batch; returns its metrics row."""
        cfg = self.cfg
        t0 = time.perf_counter()
        version = self.step
        self._last_shape = None
        mb = self.source.next_batch(self.sync_model, policy_version=version)
        self._last_shape = tuple(mb.input_ids.shape)
        t_data = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics = self._optimize(mb)
        self.source.commit()
        self.step += 1
        metrics.update(self.source.after_optimizer_step(self.sync_model, self.step))
        t_train = time.perf_counter() - t1
        tokens = float(mb.attention_mask.sum())
        return {
            "step": self.step,
            **staleness_metrics(mb, version),
            **batch_metrics(mb, cfg.sampling.group_size),
            **mb.metrics,
            **metrics,
            "perf/step_time_s": t_data + t_train,
            "perf/train_time_s": t_train,
            "perf/tokens_per_s": tokens / max(t_train, 1e-9),
            "perf/pad_frac": 1.0 - tokens / max(float(mb.attention_mask.numel()), 1.0),
            **(
                {"perf/packed_pad_frac": packed_pad_fraction(mb.attention_mask, self._micro_slices(mb.num_sequences))}
                if cfg.algorithm.packing
                else {}
            ),
            "perf/peak_rss_gb": peak_rss_gb(),
            "optim/lr": self.optimizer.param_groups[0]["lr"],
        }

    def _micro_slices(self, n: int) -> list[tuple[int, int]]:
        size = self.cfg.algorithm.micro_batch_size or max(n, 1)
        return [(i, min(i + size, n)) for i in range(0, n, size)]

    def _log_probs(self, mb: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        mb = mb.to(self.device)
        forward = packed_log_probs_and_entropy if self.cfg.algorithm.packing else sequence_log_probs_and_entropy
        with self.routing.forward(mb), autocast(self.cfg.model.autocast, self.device):
            return forward(
                self.model,
                mb.input_ids,
                mb.attention_mask,
                mb.response_mask.shape[1],
                temperature=self.cfg.sampling.temperature,
            )

    @torch.no_grad()
    def recompute_old_log_prob(self, mb: RolloutBatch) -> torch.Tensor:
        """pi_old of a freshly sampled mini-batch, by the trainer (same micro-batches as training)."""
        with self.routing.old_pass(mb):  # R2: records pi_old's routing into mb.routed_experts
            parts = [self._log_probs(mb.slice(a, b))[0] for a, b in self._micro_slices(mb.num_sequences)]
        return torch.cat(parts).float().cpu()

    def _loss(
        self,
        mb: RolloutBatch,
        log_prob: torch.Tensor,
        n_tokens: float,
        n_seqs: float,
        batch_params: dict[str, Any] | None = None,
    ):
        """compute_policy_loss on (a slice of) a mini-batch, normalised by the mini-batch's counts;
        ``batch_params``: statistics of the whole mini-batch for losses that need them."""
        alg = self.cfg.algorithm
        use_correction = alg.correction != "none"
        return compute_policy_loss(
            alg.loss,
            log_prob=log_prob,
            old_log_prob=mb.old_log_prob,
            advantages=mb.advantages,
            response_mask=mb.response_mask,
            loss_agg_mode=alg.loss_agg_mode,
            rollout_log_prob=mb.rollout_log_prob if use_correction else None,
            correction=alg.correction if use_correction else None,
            correction_high=alg.correction_high if use_correction else None,
            correction_low=alg.correction_low if use_correction else None,
            global_num_tokens=n_tokens,
            global_num_seqs=n_seqs,
            norm_length=self.cfg.sampling.max_new_tokens,
            **alg.loss_params,
            **(batch_params or {}),
        )

    @torch.no_grad()
    def _batch_params(self, mb: RolloutBatch) -> dict[str, Any]:
        """Whole-mini-batch statistics of a loss whose weights depend on the batch (vespo_adaptive's
        alpha), from a no-grad pre-pass over the micro-batches, so that every micro-batch's loss and
        gradient equal the whole mini-batch's. Nothing to do for other losses."""
        alg = self.cfg.algorithm
        if alg.loss != "vespo_adaptive":
            return {}
        from vespo.losses import merge_adaptive_stats, vespo_adaptive_batch_stats, vespo_adaptive_seq_inputs
        from vespo.losses.corrections import rollout_correction

        parts = []
        for a, b in self._micro_slices(mb.num_sequences):
            micro = mb.slice(a, b).to(self.device)
            mask, weights = micro.response_mask, None
            if alg.correction != "none":  # the same weights and mask as compute_policy_loss derives
                corr = rollout_correction(
                    micro.old_log_prob,
                    micro.rollout_log_prob,
                    mask,
                    alg.correction,
                    high=alg.correction_high,
                    low=alg.correction_low,
                )
                mask, weights = corr.mask, corr.weights
            log_prob, _ = self._log_probs(micro)
            seq_log_w, seq_adv, valid = vespo_adaptive_seq_inputs(
                log_prob=log_prob,
                old_log_prob=micro.old_log_prob,
                advantages=micro.advantages,
                response_mask=mask,
                rollout_is_weights=weights,
            )
            parts.append(vespo_adaptive_batch_stats(seq_log_w, seq_adv, valid, **alg.loss_params))
        return {"batch_stats": merge_adaptive_stats(parts)}

    def _optimize(self, mb: RolloutBatch) -> dict[str, float]:
        """Forward + backward over micro-batches, one optimizer step; metrics of the whole mini-batch.

        Each micro-batch's loss is normalised by the mini-batch's token/sequence counts, so the
        gradients add up to the mini-batch's. The diagnostics (quantiles, ESS, phi shares, ...) are
        not additive: they are computed once on the whole mini-batch's detached log-probs. With
        ``algorithm.skip_zero_advantage`` only the sequences with a nonzero advantage get a forward
        (same gradient, see :mod:`vespo.train.zero_advantage`), and the diagnostics describe them.
        """
        cfg = self.cfg
        mask = mb.response_mask
        n_tokens = float(mask.sum())
        n_seqs = float(mask.any(-1).sum())
        work = mb
        metrics: dict[str, float] = {}
        if cfg.algorithm.skip_zero_advantage:
            rows = rows_with_gradient(mb.advantages, mask)
            metrics["perf/skipped_seq_frac"] = 1.0 - rows.numel() / max(mb.num_sequences, 1)
            if rows.numel() < mb.num_sequences:
                work = mb.rows(rows)
        nothing_forwarded = work is not mb and work.num_sequences == 0  # (skipped rows all have tokens)
        slices = self._micro_slices(work.num_sequences)
        # one loss call that sees every sequence computes the batch statistics itself
        batch_params = {} if work is mb and len(slices) == 1 else self._batch_params(mb)
        log_prob_all = torch.zeros_like(work.rollout_log_prob)
        entropy_sum = 0.0
        loss_metrics: dict[str, float] = {}
        for a, b in slices:
            micro = work.slice(a, b).to(self.device)
            if not micro.response_mask.any():
                continue
            log_prob, entropy = self._log_probs(micro)
            out = self._loss(micro, log_prob, n_tokens, n_seqs, batch_params)
            out.loss.backward()
            log_prob_all[a:b] = log_prob.detach().float().cpu()
            entropy_sum += float((entropy.detach().float() * micro.response_mask).sum().cpu())
            if len(slices) == 1:
                loss_metrics = dict(out.metrics)
        if len(slices) > 1:  # diagnostics of the whole mini-batch, not averages over micro-batches
            with torch.no_grad():
                loss_metrics = dict(self._loss(work, log_prob_all, n_tokens, n_seqs, batch_params).metrics)
        metrics.update(loss_metrics)
        if nothing_forwarded:  # every sequence skipped: the zero gradient they would give
            for p in trainable_parameters(self.model):
                p.grad = torch.zeros_like(p)
            metrics["loss/value"] = 0.0  # every loss term is proportional to A, which is 0 for all of them
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        skipped = not math.isfinite(float(grad_norm))
        if not skipped:  # never let a NaN/Inf reach the weights
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["grad/norm"] = float(grad_norm) if not skipped else float("nan")
        metrics["grad/skipped"] = float(skipped)
        if not nothing_forwarded:  # (all skipped: no forward, so no entropy or log W to report)
            metrics["policy/entropy"] = entropy_sum / max(float(work.response_mask.sum()), 1.0)
            metrics.update(log_w_split_metrics(work, log_prob_all))
        metrics.update(self.routing.metrics(work))
        return metrics

    # --------------------------------------------------------------------------- warm-up
    def warm_up(self, stop: _StopFlag | None = None) -> None:
        """Supervised steps on task demonstrations (prompt masked), before RL; logged to warmup.jsonl.

        Interrupted (SIGTERM/Ctrl-C), it stops at once. It checkpoints every
        ``warmup.checkpoint_every`` steps (``RUN/warmup/checkpoints``), so ``--resume`` after a kill
        continues it from the last of them.
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
        ckpts = WarmupCheckpoints(self.run_dir, wcfg.checkpoint_every, resume=self.continue_warmup)
        start = ckpts.restore(self.model, optimizer, rng, log_path=self.run_dir / "warmup.jsonl")
        with (
            open(self.run_dir / "warmup.jsonl", "a" if start else "w", buffering=1) as log,
            _progress(self.cfg, start, total=wcfg.steps, label="warm-up") as progress,
        ):
            for step in range(start + 1, wcfg.steps + 1):
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
                ckpts.maybe_save(step, self.model, optimizer, rng)
        out = self.run_dir / "warmup"
        out.mkdir(exist_ok=True)
        from safetensors.torch import save_model

        tmp = out / "model.safetensors.tmp"
        save_model(self.model, str(tmp))
        tmp.replace(out / "model.safetensors")  # atomic: sweeps treat its existence as "done"
        ckpts.done()

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
    def evaluate(self) -> dict[str, float]:
        """Evaluate the current weights (:func:`evaluate_policy`); keep the best weights in ``best/``."""
        result = run_evaluation(
            self.cfg,
            self.eval_engine,
            self.model,
            self.tokenizer,
            self.eval_examples,
            self.reward_runner,
            step=self.step,
        )
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
        return save_checkpoint(
            self.run_dir,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            tensors=tensors,
            state=state,
            keep_last=self.cfg.checkpoint.keep_last,
        )

    def _restore(self) -> None:
        ckpt = load_checkpoint(
            self.run_dir, model=self.model, optimizer=self.optimizer, verify=self.cfg.checkpoint.verify
        )
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


def run_evaluation(
    cfg: TrainConfig, engine, model: torch.nn.Module, tokenizer: Any, examples, reward_runner, *, step: int
) -> dict[str, float]:
    """:func:`evaluate_policy` of ``model``'s weights with the config's sampling settings."""
    engine.load_state_dict(merged_state_dict(model), version=step)
    smp = cfg.sampling
    return evaluate_policy(
        engine,
        examples,
        tokenizer=tokenizer,
        reward_runner=reward_runner,
        max_new_tokens=smp.max_new_tokens,
        temperature=smp.temperature,
        top_p=smp.top_p,
        avg_k=cfg.eval.avg_k,
        seed=cfg.run.seed * 7919 + step,
    )


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None, *, which: str = "latest") -> dict[str, float]:
    """Evaluate a run's latest checkpoint or its best weights on its eval split and print the result."""
    if which not in ("latest", "best"):
        raise ConfigError(f"--which must be 'latest' or 'best', got '{which}'")
    cfg = resume_config(run_dir, overrides)
    task = build_task(cfg.task.spec())
    examples = task.eval_examples(cfg.eval.num_prompts, seed=EVAL_DATA_SEED)
    runner = RewardRunner(
        task, timeout_s=cfg.task.reward_timeout_s, workers=cfg.task.reward_workers, isolation=cfg.task.reward_isolation
    )
    model, tokenizer = build_policy(cfg)
    model.to(resolve_device(cfg.run.device))
    if which == "best":
        weights = Path(run_dir) / "best" / "model.safetensors"
        info = Path(run_dir) / "best" / "best.json"
        if not weights.exists() or not info.exists():
            raise CheckpointError(f"{run_dir} has no best weights yet (best/model.safetensors)")
        step = int(json.loads(info.read_text())["step"])
        load_init_weights(model, str(weights))
    else:  # the newest intact checkpoint, verified as a resume would
        step = int(load_checkpoint(run_dir, model=model, verify=cfg.checkpoint.verify).state["step"])
    engine = build_engine("hf", engine_model(model), dtype=cfg.model.dtype)
    result = run_evaluation(cfg, engine, model, tokenizer, examples, runner, step=step)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evaluation of {run_dir} ({which} weights, step {step})")
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
        rows.append(
            (
                "loss / async",
                f"{trainer.cfg.algorithm.loss} / sync_every {acfg.sync_every}, "
                f"staleness_threshold {acfg.staleness_threshold:g}",
            )
        )
    else:
        rows.append(("loss / staleness N", f"{trainer.cfg.algorithm.loss} / {trainer.cfg.algorithm.staleness}"))
    rows.append(("optimizer steps", str(result.steps)))
    rows.append(("wall time", f"{result.wall_time_s:.0f} s"))
    if start_acc is not None:
        rows.append(("eval accuracy at start", f"{start_acc:.3f}"))
    if result.final_eval:
        rows.append(("eval accuracy at end", f"{result.final_eval['eval/accuracy']:.3f}"))
    if result.best_eval:
        rows.append(
            ("best eval accuracy (step)", f"{result.best_eval['eval/accuracy']:.3f} ({int(result.best_eval['step'])})")
        )
    if rewards:
        head, tail = rewards[: max(1, len(rewards) // 10)], rewards[-max(1, len(rewards) // 10) :]
        rows.append(
            ("train reward first 10% -> last 10%", f"{sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f}")
        )
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
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
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
