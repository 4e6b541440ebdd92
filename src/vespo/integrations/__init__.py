"""Run vespo's policy losses and diagnostics inside other RL frameworks.

- :mod:`vespo.integrations.verl`: importing it registers every vespo loss in verl's policy-loss
  registry (``loss_mode=vespo``, ``vespo_grpo``, ...). Needs verl 0.9.x.
- :mod:`vespo.integrations.trl`: ``VespoGRPOTrainer`` / ``VespoGRPOConfig``, a TRL ``GRPOTrainer``
  whose loss is any registered vespo loss. Needs TRL 1.16.x.

Neither framework is imported here; this module only holds the helpers both adapters share.
See ``docs/integrations.md``.
"""

from __future__ import annotations

import math
import re

from vespo.losses.core import loss_diagnostics

__all__ = [
    "SIGN_QUANTILE_KEYS",
    "fill_sign_quantiles",
    "flat_metric_name",
    "is_sign_quantile",
    "loss_diagnostics",
]

#: Diagnostics that exist only when the batch holds sequences of that advantage sign. Frameworks
#: that average a metric over micro-batches and ranks need the same keys on every call: verl drops
#: them, TRL fills the missing ones with NaN (its logger skips NaN).
SIGN_QUANTILE_KEYS: tuple[str, ...] = tuple(f"is/log_w_{sign}_p{q}" for sign in ("pos", "neg") for q in (10, 50, 90))
_SIGN_QUANTILE = re.compile(r"^is/log_w_(pos|neg)_p\d+$")


def is_sign_quantile(key: str) -> bool:
    """True for the per-sign quantile keys listed in :data:`SIGN_QUANTILE_KEYS`."""
    return bool(_SIGN_QUANTILE.match(key))


def flat_metric_name(key: str) -> str:
    """``phi/mean`` -> ``phi_mean``: one path segment, for frameworks that prefix their own."""
    return key.replace("/", "_")


def fill_sign_quantiles(metrics: dict[str, float], fill: float = math.nan) -> dict[str, float]:
    """``metrics`` with every key of :data:`SIGN_QUANTILE_KEYS` present (missing ones = ``fill``)."""
    return {**{key: fill for key in SIGN_QUANTILE_KEYS}, **metrics}
