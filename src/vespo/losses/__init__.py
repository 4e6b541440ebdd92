"""vespo.losses: every policy-gradient loss for LLM RL as one family, behind one signature.

    from vespo.losses import compute_policy_loss
    out = compute_policy_loss("vespo", log_prob=lp, old_log_prob=old, advantages=adv,
                              response_mask=mask)
    out.loss.backward(); print(out.metrics["phi/mean"])

Only torch is imported here.
"""

from vespo.losses import cispo, geometric, ppo_clip, reinforce, sapo, vespo, vespo_adaptive  # noqa: F401  (register)
from vespo.losses.aggregation import AGGREGATION_MODES, aggregate_loss
from vespo.losses.core import build_loss_batch, compute_loss_terms, compute_policy_loss, loss_diagnostics
from vespo.losses.corrections import CORRECTION_MODES, RolloutCorrection, rollout_correction
from vespo.losses.registry import LossSpec, Param, get_loss_spec, list_losses, loss_specs, register_policy_loss
from vespo.losses.types import KernelOutput, LossBatch, LossOutput
from vespo.losses.vespo import kernel_max, kernel_mode, variance_constant, vespo_log_phi, vespo_phi
from vespo.losses.vespo_adaptive import (
    AdaptiveStats,
    merge_adaptive_stats,
    vespo_adaptive_batch_stats,
    vespo_adaptive_seq_inputs,
)

__all__ = [
    "AGGREGATION_MODES",
    "AdaptiveStats",
    "CORRECTION_MODES",
    "KernelOutput",
    "LossBatch",
    "LossOutput",
    "LossSpec",
    "Param",
    "RolloutCorrection",
    "aggregate_loss",
    "build_loss_batch",
    "compute_loss_terms",
    "compute_policy_loss",
    "get_loss_spec",
    "kernel_max",
    "kernel_mode",
    "list_losses",
    "loss_diagnostics",
    "loss_specs",
    "merge_adaptive_stats",
    "register_policy_loss",
    "rollout_correction",
    "variance_constant",
    "vespo_adaptive_batch_stats",
    "vespo_adaptive_seq_inputs",
    "vespo_log_phi",
    "vespo_phi",
]
