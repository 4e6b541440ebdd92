"""A decorator registry of policy losses with typed, validated parameters.

Every loss is one function ``kernel(batch: LossBatch, **params) -> KernelOutput`` registered with
:func:`register_policy_loss`. Its parameters are declared with :class:`Param`, so that the registry
can list them with their defaults and reject unknown names or out-of-range values with one clear
``ValueError`` before any tensor is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vespo.losses.types import KernelOutput

Kernel = Callable[..., KernelOutput]


@dataclass(frozen=True)
class Param:
    """One loss parameter: default, allowed range and a short description.

    ``low``/``high`` bound the value; ``low_open``/``high_open`` make the bound strict.
    ``choices`` restricts a string parameter. ``note`` is appended to the range error. A parameter
    whose default is an ``int`` takes whole numbers only.
    """

    default: Any
    doc: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    note: str = ""

    def check(self, loss: str, name: str, value: Any) -> Any:
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"loss '{loss}': {name}={value!r} is not one of {', '.join(self.choices)}")
            return value
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"loss '{loss}': {name} must be true or false, got {value!r}")
            return value
        if isinstance(self.default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"loss '{loss}': {name} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"loss '{loss}': {name} must be finite, got {value}")
            if isinstance(self.default, int) and value != int(value):
                raise ValueError(f"loss '{loss}': {name} must be a whole number, got {value:g}")
            too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if too_low or too_high:
                msg = f"loss '{loss}': {name}={value:g} is out of range {self.range_text()}"
                if self.note:
                    msg += f" ({self.note})"
                raise ValueError(msg)
        return value

    def range_text(self) -> str:
        """The allowed values as ``vespo losses`` shows them: an interval, a set, or ``""`` for a
        parameter that is not a number (a flag, or an object such as ``batch_stats``)."""
        if self.choices is not None:
            return "{" + ", ".join(self.choices) + "}"
        if isinstance(self.default, bool):
            return "{True, False}"
        if not isinstance(self.default, (int, float)):
            return ""
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low is None or self.low_open else "["
        right = ")" if self.high is None or self.high_open else "]"
        return f"{left}{lo}, {hi}{right}"


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its kernel, parameters, summary and source of the defaults."""

    name: str
    kernel: Kernel
    params: dict[str, Param] = field(default_factory=dict)
    summary: str = ""
    level: str = "token"  # "token" or "sequence": where the importance weight lives
    reference: str = ""

    def defaults(self) -> dict[str, Any]:
        return {key: p.default for key, p in self.params.items()}

    def resolve(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Defaults updated by ``overrides``; unknown names and bad values raise ValueError."""
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise ValueError(
                f"loss '{self.name}' has no parameter {', '.join(map(repr, unknown))}; its parameters are: {known}"
            )
        values = self.defaults()
        for key, value in overrides.items():
            values[key] = self.params[key].check(self.name, key, value)
        return values


_REGISTRY: dict[str, LossSpec] = {}


def register_policy_loss(
    name: str,
    *,
    params: dict[str, Param] | None = None,
    summary: str = "",
    level: str = "token",
    reference: str = "",
) -> Callable[[Kernel], Kernel]:
    """Register ``kernel`` under ``name``. A second registration of a name is an error."""

    def decorator(kernel: Kernel) -> Kernel:
        if name in _REGISTRY:
            raise ValueError(f"a policy loss named '{name}' is already registered")
        _REGISTRY[name] = LossSpec(
            name=name,
            kernel=kernel,
            params=dict(params or {}),
            summary=summary or (kernel.__doc__ or "").strip().splitlines()[0],
            level=level,
            reference=reference,
        )
        return kernel

    return decorator


def get_loss_spec(name: str) -> LossSpec:
    """The registered loss ``name``, or a ValueError that lists the registered names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy loss '{name}'; registered losses: {', '.join(sorted(_REGISTRY))}") from None


def list_losses() -> dict[str, dict[str, Any]]:
    """Registered loss names mapped to their parameter defaults."""
    return {name: spec.defaults() for name, spec in sorted(_REGISTRY.items())}


def loss_specs() -> list[LossSpec]:
    """All registered losses, sorted by name."""
    return [spec for _, spec in sorted(_REGISTRY.items())]
