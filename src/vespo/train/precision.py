"""Speed and memory options of the trainer's forward/backward (docs/real_lm.md).

* ``model.autocast: bfloat16`` -- the trainer's forward and backward run under
  ``torch.autocast(device, bfloat16)``: matmuls in bf16, while the parameters (the master weights),
  their gradients and the AdamW state stay float32. The log-softmax of the trainer's log-probs is
  float32 either way (:func:`vespo.rollout.log_probs.sequence_log_probs_and_entropy` upcasts the
  logits, and autocast keeps ``log_softmax`` in float32). pi_old is recomputed under the same
  autocast, so an on-policy mini-batch still has W = 1 exactly.
* ``model.gradient_checkpointing: true`` -- transformers' activation checkpointing (non-reentrant):
  the activations of each decoder layer are recomputed in the backward pass instead of kept, so
  activation memory no longer grows with the number of layers (about one more forward of compute).
* ``auto`` (``model.autocast`` and ``sampling.sampler_dtype``) -- :func:`resolve_auto_precision` picks
  bf16 where the device has native bf16 matmuls (a CUDA GPU that supports it, a CPU with AVX-512 or
  AMX) and float32 elsewhere, once at the start of a run, and says what it chose.
* :func:`bf16_speed_warning` -- bf16 on a CPU without native bf16 matmuls (AVX2 only: measured 0.5
  against 9.9 GFLOP/s for fp32 on one core, 20x slower) is a pessimisation; the trainer says so.
* :func:`peak_rss_gb` -- the process's peak resident memory, logged as ``perf/peak_rss_gb``.
* :func:`is_out_of_memory` / :class:`TrainingOutOfMemory` -- an allocation failure in a training step
  becomes one line that names the settings to lower (the trainer checkpoints first).
"""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Any

import torch

__all__ = [
    "TrainingOutOfMemory",
    "autocast",
    "bf16_speed_warning",
    "cpu_has_native_bf16",
    "enable_gradient_checkpointing",
    "is_checkpointing",
    "is_out_of_memory",
    "peak_rss_gb",
    "resolve_auto_precision",
]

AUTOCAST_DTYPES = {"none": None, "bfloat16": torch.bfloat16}


class TrainingOutOfMemory(ValueError):
    """A training step ran out of memory; the message (one line) names the settings to lower."""


def autocast(mode: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """The autocast context for ``model.autocast`` (``none``: a no-op context)."""
    dtype = AUTOCAST_DTYPES[mode]
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype)


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 matmuls on this CPU with bf16 instructions (AVX-512 or AMX), not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: judge by the vector ISA
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2")


def device_has_native_bf16(device: torch.device | str) -> bool:
    """True when bf16 matmuls on ``device`` run natively (so bf16 is a speed-up, not an emulation)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_auto_precision(cfg: Any, device: torch.device | str) -> list[str]:
    """Replace ``auto`` in ``cfg.model.autocast`` / ``cfg.sampling.sampler_dtype`` in place; one note per choice."""
    native = device_has_native_bf16(device)
    why = "native bf16 matmuls" if native else f"no native bf16 matmuls on {_describe(device)}"
    notes = []
    if cfg.model.autocast == "auto":
        cfg.model.autocast = "bfloat16" if native and cfg.model.dtype == "float32" else "none"
        notes.append(f"model.autocast=auto -> {cfg.model.autocast} ({why})")
    if cfg.sampling.sampler_dtype == "auto":
        cfg.sampling.sampler_dtype = "bfloat16" if native else "float32"
        notes.append(f"sampling.sampler_dtype=auto -> {cfg.sampling.sampler_dtype} ({why})")
    return notes


def _describe(device: torch.device | str) -> str:
    device = torch.device(device)
    return f"this CPU ({torch.backends.cpu.get_cpu_capability()})" if device.type == "cpu" else str(device)


def bf16_speed_warning(cfg: Any, device: torch.device | str) -> str | None:
    """One line when the run asks for bf16 compute on a CPU that would emulate it, else None.

    Covers ``model.autocast: bfloat16`` and the hf engine's ``sampling.sampler_dtype: bfloat16``
    (the vLLM engine's CPU kernels are its own and were not measured here).
    """
    if torch.device(device).type != "cpu" or cpu_has_native_bf16():
        return None
    asked = []
    if cfg.model.autocast == "bfloat16":
        asked.append("model.autocast=bfloat16")
    if cfg.sampling.sampler_dtype == "bfloat16" and cfg.sampling.engine == "hf":
        asked.append("sampling.sampler_dtype=bfloat16")
    if not asked:
        return None
    return (
        f"{' and '.join(asked)} on a CPU without native bf16 matmuls "
        f"({torch.backends.cpu.get_cpu_capability()}): bf16 is emulated there and measured ~20x slower than "
        "float32; set model.autocast=none and sampling.sampler_dtype=float32 on this machine"
    )


def is_checkpointing(model: torch.nn.Module) -> bool:
    """True when activation checkpointing is on (either transformers name of the flag)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(type(target), "is_activation_checkpointing"):  # transformers >= 5.2x name
        return bool(target.is_activation_checkpointing)
    return bool(getattr(target, "is_gradient_checkpointing", False))


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on activation checkpointing of a transformers model (or of a peft model's base model).

    Raises ValueError (one line) for a model that does not support it.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(target, "supports_gradient_checkpointing", False) or not hasattr(
        target, "gradient_checkpointing_enable"
    ):
        raise ValueError(
            f"model.gradient_checkpointing: {type(target).__name__} does not support gradient checkpointing"
        )
    # non-reentrant: works with frozen inputs (LoRA) and needs no enable_input_require_grads
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        target.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(target, "config", None) is not None:
        target.config.use_cache = False


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (``getrusage``; KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the allocation failures torch raises (CPU ``DefaultCPUAllocator``, CUDA OOM, MemoryError)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


def out_of_memory_message(cfg: Any, batch_shape: tuple[int, int] | None, checkpoint: str | None) -> str:
    """One line: where the step ran out of memory and which settings bound the memory."""
    alg, m = cfg.algorithm, cfg.model
    micro = alg.micro_batch_size or (alg.mini_batch_prompts * cfg.sampling.group_size)
    shape = f" on a mini-batch of {batch_shape[0]} x {batch_shape[1]} tokens" if batch_shape else ""
    hints = [f"lower algorithm.micro_batch_size (now {micro} sequences per forward)"]
    if not m.gradient_checkpointing:
        hints.append("set model.gradient_checkpointing=true")
    if m.lora is None and m.kind != "tiny":
        hints.append("use model.lora (adapters: no full-size gradients or AdamW state)")
    hints.append(f"or lower sampling.max_new_tokens (now {cfg.sampling.max_new_tokens})")
    kept = (
        f"; checkpoint kept at {checkpoint}, continue with vespo train --resume {cfg.run.out_dir}" if checkpoint else ""
    )
    return f"out of memory in training step{shape} (peak RSS {peak_rss_gb():.1f} GB): {', '.join(hints)}{kept}"
