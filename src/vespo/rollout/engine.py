"""The sampler-engine interface: what the rollout layer needs from an inference engine.

An engine holds its own copy of the policy weights (possibly at another precision), samples
responses and reports for every sampled token mu, the log-probability under the distribution it
actually drew the token from (temperature and top-p applied and renormalised), and the policy
version of the weights that drew it. The rollout code (:mod:`vespo.rollout.generate`, the sync and
Ray sources) talks to engines only through :class:`SamplerEngine`; :func:`build_engine` makes one
by name. ``hf`` is the project's own KV-cache sampler on the transformers model
(:class:`vespo.rollout.sampler.Sampler`); other engines plug in here without touching the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from vespo.rollout.batch import Rollout

__all__ = ["ENGINES", "EngineError", "SamplerEngine", "build_engine"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class EngineError(ValueError):
    """An engine cannot be built or used as configured (missing package, bad option)."""


@runtime_checkable
class SamplerEngine(Protocol):
    """An inference engine with its own weights (see the module docstring).

    ``supports_partial_rollout``: ``generate`` honours ``stop_flag`` and can continue a
    ``resume`` rollout under newer weights (the partial rollouts of asynchronous training).
    """

    policy_version: int
    supports_partial_rollout: bool

    def load_state_dict(self, state_dict: Mapping[str, Tensor], version: int | None = None) -> None:
        """The weight sync: new weights (cast to the engine's dtype) and their policy version."""
        ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int | None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        resume: Rollout | None = None,
        stop_flag: Callable[[], bool] | None = None,
    ) -> Rollout:
        """One response per prompt; ``resume`` continues the partial responses of an earlier call."""
        ...

    def close(self) -> None:
        """Release the engine's processes and memory (a no-op for in-process engines)."""
        ...


def _build_hf(model: nn.Module, dtype: str, options: Mapping[str, Any]) -> SamplerEngine:
    from vespo.rollout.sampler import Sampler

    if options:
        raise EngineError(f"sampling.engine=hf takes no engine options, got {sorted(options)}")
    return Sampler(model, dtype=DTYPES[dtype])


def _build_vllm(model: nn.Module, dtype: str, options: Mapping[str, Any]) -> SamplerEngine:
    try:
        from vespo.rollout.vllm_engine import VLLMSampler
    except ImportError as exc:  # the module itself imports vllm lazily; this is a broken install
        raise EngineError(f"sampling.engine=vllm is unavailable: {exc}") from None
    return VLLMSampler(model, dtype=dtype, **dict(options))


#: Engine name -> builder(model, dtype name, engine options).
ENGINES: dict[str, Callable[[nn.Module, str, Mapping[str, Any]], SamplerEngine]] = {
    "hf": _build_hf,
    "vllm": _build_vllm,
}


def build_engine(
    name: str, model: nn.Module, *, dtype: str = "float32", options: Mapping[str, Any] | None = None
) -> SamplerEngine:
    """An engine by name (``hf`` or ``vllm``) holding a copy of ``model``'s weights in ``dtype``."""
    if name not in ENGINES:
        raise EngineError(f"unknown sampling.engine '{name}' (choose from {', '.join(ENGINES)})")
    if dtype not in DTYPES:
        raise EngineError(f"unknown sampler dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    return ENGINES[name](model, dtype, options or {})
