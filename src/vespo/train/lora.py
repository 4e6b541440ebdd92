"""LoRA adapters (peft) for the trainer, with merged weights for the sampler engines.

``model.lora: {r, alpha, dropout, target_modules}`` wraps the policy in a peft ``PeftModel``: the
base weights are frozen, only the low-rank adapters ``B A`` (and their AdamW state) are trained.

What each part of the trainer sees:

* the optimizer: the adapter parameters only;
* the sampler and eval engines: a plain model of the base architecture (:func:`engine_model`) and,
  at every weight sync, a plain state dict of it with the adapters merged in,
  ``W + (alpha / r) B A`` (:func:`merged_state_dict`, also reachable as ``SyncView.state_dict()``),
  so an engine never needs to know about peft and samples at full speed;
* checkpoints and ``best/``: the peft model's own state dict (frozen base + adapter tensors, keys
  ``...lora_A.default.weight``), so ``--resume`` and ``vespo eval`` rebuild the same peft model and
  load it.

peft is an optional dependency: ``pip install -c constraints.txt 'vespo[lora]'`` (or ``pip install peft``).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "SyncView",
    "apply_lora",
    "engine_model",
    "is_lora",
    "merged_state_dict",
    "sync_view",
    "trainable_parameters",
]

#: the linear layers of Llama / Qwen2 / Mistral-style decoders (attention and MLP)
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PEFT_HINT = "pip install -c constraints.txt 'vespo[lora]' (or: pip install -c constraints.txt peft)"


def is_lora(model: nn.Module) -> bool:
    """True for a peft model."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)})


def apply_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: list[str] | str) -> nn.Module:
    """``model`` wrapped in LoRA adapters (peft); raises ValueError (one line) if it cannot be."""
    if importlib.util.find_spec("peft") is None:
        raise ValueError(f"model.lora needs the peft package, which is not installed: {PEFT_HINT}")
    from peft import LoraConfig, get_peft_model

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    if not isinstance(targets, str):
        available = set(_linear_names(model))
        missing = [t for t in targets if t not in available]
        if missing:
            raise ValueError(
                f"model.lora.target_modules: {', '.join(missing)} not in this model "
                f"(its linear layers: {', '.join(sorted(available)) or 'none'})"
            )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated name of the checkpointing flag
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"model.lora: peft cannot wrap {type(model).__name__}: {first}") from None


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates (all of them without LoRA, the adapters with it)."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base architecture's state dict with every active adapter merged in; ``model`` unchanged.

    Keys are those of the plain model (``model.layers.0.self_attn.q_proj.weight``); the merged
    weight of an adapted layer is ``W + scaling * B @ A`` (peft's ``get_delta_weight``), new tensors,
    so a later sync never aliases the trainer's weights. Without LoRA: ``model.state_dict()``.
    """
    if not is_lora(model):
        return model.state_dict()
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer") and not getattr(module, "merged", False):
            weight = module.base_layer.weight.detach()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{name}.weight"] = weight
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        out[key] = merged.get(key, value.detach())
    return out


def engine_model(model: nn.Module) -> nn.Module:
    """A plain model of the base architecture for building an engine: ``model`` itself without LoRA,
    else a merged copy (``merge_and_unload`` of a deep copy; the trainer's model is untouched)."""
    if not is_lora(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


class SyncView:
    """What a rollout source syncs from: ``state_dict()`` gives the merged plain weights."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return merged_state_dict(self.model)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def __getattr__(self, name: str) -> Any:  # config, device, ... of the underlying model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


def sync_view(model: nn.Module) -> nn.Module | SyncView:
    """``model`` itself, or a :class:`SyncView` of a peft model."""
    return SyncView(model) if is_lora(model) else model
