"""vespo's policy losses inside TRL's ``GRPOTrainer``.

:class:`VespoGRPOTrainer` is a ``GRPOTrainer`` whose policy loss is any loss of
:mod:`vespo.losses` (``VespoGRPOConfig.vespo_loss``); everything else (generation, rewards,
advantages, the ``steps_per_generation`` / ``num_iterations`` reuse, the vLLM importance-sampling
ratios, logging) is TRL's own::

    from vespo.integrations.trl import VespoGRPOConfig, VespoGRPOTrainer

    args = VespoGRPOConfig(output_dir="out", vespo_loss="vespo",
                           vespo_loss_params={"k_pos": 2.0, "lambda_pos": 3.0})
    trainer = VespoGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds)
    trainer.train()

What the loss sees, per micro-batch:

- ``log_prob``: TRL's ``_get_per_token_logps_and_entropies`` on the current model (no second
  forward pass is written here);
- ``old_log_prob``: ``inputs["old_per_token_logps"]`` (TRL fills it whenever a batch is reused
  across optimizer steps or vLLM is used), else the detached current log-probs (on-policy, W = 1);
- ``rollout_is_weights``: ``inputs["importance_sampling_ratio"]`` (TRL's vLLM correction, token
  ``(B, T)`` or sequence ``(B, 1)`` shaped) when present. VESPO folds it into log W (the released
  code's behaviour); every other loss multiplies its per-token loss by it, as TRL does;
- ``response_mask``: ``completion_mask`` (times ``tool_mask`` when TRL gives one).

Aggregation (``vespo_loss_agg_mode``) uses TRL's normalisers, so gradient accumulation and
multi-process training scale the loss as TRL's own loss types do: ``token-mean`` divides by the
window's global token count like ``dapo``/``vespo`` (default), ``seq-mean-token-mean`` is ``grpo``'s
per-sequence mean, ``token-sum-norm`` is ``dr_grpo``'s B x max_completion_length. TRL's own
``loss_type`` is ignored.

``vespo_adaptive`` across gradient-accumulation steps and processes: its tempering exponent depends
on statistics of the whole optimizer batch. At the first micro-batch of every accumulation window
the trainer runs a no-grad pre-pass over the window's micro-batches (TRL has buffered them all when
``steps_per_generation`` is a multiple of ``gradient_accumulation_steps``, the default), computes
each one's :class:`vespo.losses.AdaptiveStats` from log pi_theta, ``old_per_token_logps`` and the
vLLM ratios, adds them, sums them over processes (``accelerator.reduce``), and gives the result to
every micro-batch of the window through ``batch_stats``. Loss and gradient are then those of the
whole window in one pass, for any ``gradient_accumulation_steps`` and number of processes. The
pre-pass costs one extra forward (no grad) per window, and none when the window is on-policy (no
``old_per_token_logps``: log W is then the vLLM part only). It is exact when the forward is
deterministic (no active dropout: ``disable_dropout=True`` or a model whose dropout is 0). When the
window cannot be seen in advance (``steps_per_generation`` not a multiple of the accumulation
steps) each micro-batch uses its own statistics, with a warning. Evaluation batches use their own.

Metrics go to ``self._metrics[mode]`` like TRL's: ``entropy`` and ``kl`` (when ``beta != 0``) as TRL
computes them, and every vespo diagnostic as ``vespo/<key with '/' -> '_'>`` (``vespo/phi_mean``,
``vespo/is_ess``, ``vespo/is_log_w_neg_p90``, ``vespo/loss_clip_frac``, ...), averaged over processes.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from vespo.integrations import fill_sign_quantiles, flat_metric_name, loss_diagnostics
from vespo.losses import (
    aggregate_loss,
    build_loss_batch,
    compute_loss_terms,
    get_loss_spec,
    merge_adaptive_stats,
    vespo_adaptive_batch_stats,
    vespo_adaptive_seq_inputs,
)
from vespo.losses.aggregation import normalize_agg_mode
from vespo.losses.vespo_adaptive import adaptive_seq_log_w

TESTED_TRL_VERSIONS: tuple[str, ...] = ("1.16.0",)
SUPPORTED_TRL = "trl>=1.16,<1.17 (tested: 1.16.0)"

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:
    raise ImportError(
        f"vespo.integrations.trl needs {SUPPORTED_TRL} ({exc}); install it with "
        "`pip install -c constraints.txt trl==1.16.0`"
    ) from exc

TRL_VERSION: str = str(getattr(trl, "__version__", "unknown"))

_LOGPS_ARGS = ("model", "input_ids", "attention_mask", "logits_to_keep", "compute_entropy", "compute_aux_loss")
#: Multimodal inputs TRL's own loss forwards to the log-prob computation, unchanged.
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _check_interface() -> None:
    """ImportError naming the supported versions if TRL's GRPOTrainer internals differ."""

    def fail(problem: str) -> ImportError:
        return ImportError(
            f"vespo.integrations.trl supports {SUPPORTED_TRL}; the installed trl {TRL_VERSION} "
            f"has a different GRPOTrainer interface: {problem}"
        )

    for attr in ("_compute_loss", "_get_per_token_logps_and_entropies", "compute_loss"):
        if not callable(getattr(GRPOTrainer, attr, None)):
            raise fail(f"GRPOTrainer.{attr} is missing")
    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    missing = [p for p in (*_LOGPS_ARGS, *_FORWARD_KEYS) if p not in params]
    if missing:
        raise fail(f"_get_per_token_logps_and_entropies() lacks {', '.join(missing)}")
    fields = GRPOConfig.__dataclass_fields__
    missing = [f for f in ("steps_per_generation", "beta", "use_bias_correction_kl") if f not in fields]
    if missing:
        raise fail(f"GRPOConfig lacks {', '.join(missing)}")
    if TRL_VERSION not in TESTED_TRL_VERSIONS:
        warnings.warn(
            f"vespo.integrations.trl was tested with trl {', '.join(TESTED_TRL_VERSIONS)}; trl {TRL_VERSION} "
            "has the same GRPOTrainer interface, so it is used as is",
            stacklevel=3,
        )


_check_interface()

#: Loss parameters that TRL already configures with its own GRPOConfig fields (used unless
#: ``vespo_loss_params`` sets them). ``epsilon_high`` falls back to ``epsilon`` as in TRL.
TRL_STANDARD_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "vespo": {
        "k_pos": ("vespo_k_pos",),
        "lambda_pos": ("vespo_lambda_pos",),
        "k_neg": ("vespo_k_neg",),
        "lambda_neg": ("vespo_lambda_neg",),
    },
    "vespo_adaptive": {
        "k_pos": ("vespo_k_pos",),
        "lambda_pos": ("vespo_lambda_pos",),
        "k_neg": ("vespo_k_neg",),
        "lambda_neg": ("vespo_lambda_neg",),
    },
    "grpo": {"eps_low": ("epsilon",), "eps_high": ("epsilon_high", "epsilon")},
    "sapo": {"tau_pos": ("sapo_temperature_pos",), "tau_neg": ("sapo_temperature_neg",)},
}

METRIC_PREFIX = "vespo/"


@dataclass
class VespoGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the vespo loss to train with (TRL's ``loss_type`` is then ignored).

    Args:
        vespo_loss: a loss of :func:`vespo.losses.list_losses` (``vespo``, ``grpo``, ``gspo``, ...).
        vespo_loss_params: that loss's parameters (a dict, or a JSON string from the command line);
            missing ones come from TRL's matching fields (:data:`TRL_STANDARD_FIELDS`), then from
            the loss's defaults.
        vespo_loss_agg_mode: token-mean | seq-mean-token-mean | seq-mean-token-sum | token-sum |
            token-sum-norm, with TRL's gradient-accumulation normalisers.
    """

    vespo_loss: str = field(default="vespo", metadata={"help": "vespo loss name (vespo.losses.list_losses())."})
    vespo_loss_params: dict | str | None = field(
        default=None, metadata={"help": "Parameters of the vespo loss, as a dict or a JSON string."}
    )
    vespo_loss_agg_mode: str = field(
        default="token-mean",
        metadata={"help": "token-mean | seq-mean-token-mean | seq-mean-token-sum | token-sum | token-sum-norm"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.vespo_loss_params, str):
            self.vespo_loss_params = json.loads(self.vespo_loss_params)
        if self.vespo_loss_params is None:
            self.vespo_loss_params = {}
        get_loss_spec(self.vespo_loss)  # unknown loss -> ValueError listing the registered ones
        self.vespo_loss_agg_mode = normalize_agg_mode(self.vespo_loss_agg_mode)


def loss_params(name: str, args: Any) -> dict[str, Any]:
    """Parameters of vespo loss ``name`` under TRL ``args`` (validated; ValueError if invalid)."""
    params: dict[str, Any] = {}
    for param, keys in TRL_STANDARD_FIELDS.get(name, {}).items():
        for key in keys:
            value = getattr(args, key, None)
            if value is not None:
                params[param] = float(value)
                break
    params.update(getattr(args, "vespo_loss_params", None) or {})
    return get_loss_spec(name).resolve(params)


class VespoGRPOTrainer(GRPOTrainer):
    """TRL ``GRPOTrainer`` that trains with a vespo loss and logs vespo's weight diagnostics.

    Not supported here (a ValueError says so at construction): TRL's entropy bonus
    (``entropy_coef``/``use_adaptive_entropy``), ``top_entropy_quantile``,
    ``off_policy_mask_threshold`` and ``delta``; they are tied to TRL's own loss types.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.args
        if not isinstance(cfg, VespoGRPOConfig):
            raise ValueError("VespoGRPOTrainer needs args=VespoGRPOConfig(...)")
        unsupported = []
        if getattr(self, "_entropy_bonus_enabled", False):
            unsupported.append("entropy_coef / use_adaptive_entropy")
        if getattr(cfg, "top_entropy_quantile", 1.0) < 1.0:
            unsupported.append("top_entropy_quantile < 1")
        if getattr(cfg, "off_policy_mask_threshold", None) is not None:
            unsupported.append("off_policy_mask_threshold")
        if getattr(cfg, "delta", None) is not None:
            unsupported.append("delta")
        if unsupported:
            raise ValueError(
                f"VespoGRPOTrainer does not support {', '.join(unsupported)}; "
                "use vespo's own losses and corrections instead (docs/integrations.md)"
            )
        if getattr(cfg, "importance_sampling_level", "token") != "token":
            warnings.warn(
                "importance_sampling_level is ignored by VespoGRPOTrainer: each vespo loss defines "
                "its own token or sequence weight",
                stacklevel=2,
            )
        self.vespo_loss = cfg.vespo_loss
        self.vespo_loss_params = loss_params(cfg.vespo_loss, cfg)
        self.vespo_loss_agg_mode = cfg.vespo_loss_agg_mode
        self._adaptive_window: tuple[int, Any] | None = None  # (window index, AdaptiveStats)
        self._adaptive_warned = False

    # -- vespo_adaptive: statistics of the whole accumulation window ------------------------

    def _forward_inputs(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token log pi [B, T], loss mask [B, T]) of one micro-batch, as ``_compute_loss`` sees them."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=False,
            compute_aux_loss=False,
            **{key: inputs.get(key) for key in _FORWARD_KEYS},
        )
        return logps, mask

    def _micro_batch_stats(self, model: Any, inputs: dict[str, Any], logps: torch.Tensor | None = None) -> Any:
        """AdaptiveStats of one micro-batch (None when it has no valid token)."""
        params = {k: v for k, v in self.vespo_loss_params.items() if k != "batch_stats"}
        mask = (
            inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        )
        if not bool(mask.any()):
            return None
        old = inputs.get("old_per_token_logps")
        with torch.no_grad():
            if old is None:  # on-policy: log pi_theta = log pi_old exactly, no forward needed
                logps = old = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            elif logps is None:
                logps, mask = self._forward_inputs(model, inputs)
            seq = vespo_adaptive_seq_inputs(
                log_prob=logps.detach(),
                old_log_prob=old,
                advantages=inputs["advantages"],
                response_mask=mask,
                rollout_is_weights=inputs.get("importance_sampling_ratio"),
            )
        return vespo_adaptive_batch_stats(*seq, **params)

    def adaptive_window_stats(self, model: Any, inputs: dict[str, Any]) -> Any:
        """``vespo_adaptive`` statistics for the micro-batch ``inputs`` (see the module docstring)."""
        accum = self.current_gradient_accumulation_steps
        spg = self.args.steps_per_generation
        buffered = getattr(self, "_buffered_inputs", None)
        if buffered is None or spg % accum != 0:
            if not self._adaptive_warned:
                warnings.warn(
                    "vespo_adaptive: steps_per_generation is not a multiple of gradient_accumulation_steps, so "
                    "each micro-batch uses its own statistics (not those of the optimizer batch)",
                    stacklevel=2,
                )
                self._adaptive_warned = True
            parts = [self._micro_batch_stats(model, inputs)]
        else:
            window = self._step // accum
            if self._adaptive_window is not None and self._adaptive_window[0] == window:
                return self._adaptive_window[1]
            start = (window * accum) % spg
            parts = [self._micro_batch_stats(model, buffered[j]) for j in range(start, start + accum)]
        parts = [p for p in parts if p is not None]
        if not parts:  # nothing valid locally: zero sums still take part in the reduction
            params = {k: v for k, v in self.vespo_loss_params.items() if k != "batch_stats"}
            parts = [vespo_adaptive_batch_stats(torch.zeros(0), torch.zeros(0), **params)]
        stats = merge_adaptive_stats(parts)
        sums = self.accelerator.reduce(stats.sums.to(self.accelerator.device), reduction="sum")
        stats = type(stats)(sums, stats.key, None)
        if buffered is not None and spg % accum == 0:
            self._adaptive_window = (self._step // accum, stats)
        return stats

    # -- loss -------------------------------------------------------------------------------

    def _aggregate(
        self, loss_mat: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any], train: bool
    ) -> torch.Tensor:
        """Reduce ``loss_mat`` with TRL's normalisers for this micro-batch (see module docstring)."""
        mode = self.vespo_loss_agg_mode
        accum = self.current_gradient_accumulation_steps if train else 1
        n_seqs = mask.size(0) * accum
        if mode == "token-mean":
            num_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:  # num_items_in_batch counts the whole generation batch
                num_tokens = num_tokens * accum / self.args.steps_per_generation
            return aggregate_loss(loss_mat, mask, mode, global_num_tokens=num_tokens)
        if mode == "token-sum":  # data-parallel averaging would divide the global sum by the world size
            return aggregate_loss(loss_mat, mask, mode) * self.accelerator.num_processes
        if mode == "token-sum-norm":
            return aggregate_loss(loss_mat, mask, mode, global_num_seqs=n_seqs, norm_length=self.max_completion_length)
        return aggregate_loss(loss_mat, mask, mode, global_num_seqs=n_seqs)

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in _FORWARD_KEYS},
        )
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:  # aligned generation: this batch is on-policy
            old_per_token_logps = per_token_logps.detach()

        # A micro-batch whose every completion is masked (e.g. mask_truncated_completions) still has
        # to take part in the collectives below: run the kernel on a stand-in token, contribute 0.
        empty = not bool(mask.any())
        loss_mask = mask
        if empty:
            loss_mask = torch.zeros_like(mask)
            loss_mask[:, 0] = 1
        batch = build_loss_batch(
            log_prob=per_token_logps,
            old_log_prob=old_per_token_logps,
            advantages=inputs["advantages"],
            response_mask=loss_mask,
            rollout_is_weights=inputs.get("importance_sampling_ratio"),
        )
        params = self.vespo_loss_params
        if self.vespo_loss == "vespo_adaptive" and params.get("batch_stats") is None:
            if self.model.training:
                stats = self.adaptive_window_stats(model, inputs)
            else:
                params_k = {k: v for k, v in params.items() if k != "batch_stats"}  # resolved by loss_params
                stats = vespo_adaptive_batch_stats(
                    adaptive_seq_log_w(batch, params_k["is_mode"], params_k["alpha_min"]),
                    batch.seq_advantages,
                    batch.lengths > 0,
                    **params_k,
                )
            params = {**params, "batch_stats": stats}
        out = compute_loss_terms(self.vespo_loss, batch, **params)
        loss_mat = out.loss_mat

        per_token_kl = None
        if self.beta != 0.0:  # TRL's k3 estimator of KL(pi_theta || pi_ref), added per token
            ref_diff = inputs["ref_per_token_logps"] - per_token_logps
            per_token_kl = torch.exp(ref_diff) - ref_diff - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * torch.exp(per_token_logps - old_per_token_logps)
            loss_mat = loss_mat + self.beta * per_token_kl.to(loss_mat.dtype)

        train = self.model.training
        loss = self._aggregate(loss_mat, batch.mask, inputs, train)
        if empty:
            loss = loss * 0.0  # keeps the graph (zero gradients) without counting the stand-in
        mode = "train" if train else "eval"
        if self.aux_loss_enabled:
            accum = self.current_gradient_accumulation_steps if train else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / accum
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(aux_loss.detach()).mean().item())

        self._log_metrics(mode, batch, out, entropies, per_token_kl, mask, empty)
        return loss

    # -- metrics ----------------------------------------------------------------------------

    def _global_masked_mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        totals = torch.stack([(x * mask).sum().float(), mask.sum().float()])
        totals = self.accelerator.reduce(totals, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_metrics(
        self,
        mode: str,
        batch: Any,
        out: Any,
        entropies: torch.Tensor,
        per_token_kl: torch.Tensor | None,
        mask: torch.Tensor,
        empty: bool = False,
    ) -> None:
        metrics = self._metrics[mode]
        with torch.no_grad():
            metrics["entropy"].append(self._global_masked_mean(entropies.detach(), mask))
            if per_token_kl is not None:
                metrics["kl"].append(self._global_masked_mean(per_token_kl.detach(), mask))
            diag = fill_sign_quantiles(loss_diagnostics(batch, out))
            if empty:
                diag = dict.fromkeys(diag, math.nan)
            keys = sorted(diag)  # the same keys on every rank and micro-batch
            local = torch.tensor([diag[k] for k in keys], dtype=torch.float32, device=entropies.device)
            gathered = self.accelerator.gather(local.unsqueeze(0)).reshape(-1, len(keys))
            for key, value in zip(keys, gathered.nanmean(0).tolist()):
                metrics[METRIC_PREFIX + flat_metric_name(key)].append(value)  # NaN: skipped by TRL's log()


__all__ = [
    "SUPPORTED_TRL",
    "TESTED_TRL_VERSIONS",
    "TRL_STANDARD_FIELDS",
    "VespoGRPOConfig",
    "VespoGRPOTrainer",
    "loss_params",
]
