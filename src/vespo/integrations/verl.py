"""vespo's policy losses inside verl's actor, through verl's own policy-loss registry.

Importing this module registers every loss of :mod:`vespo.losses` with
``verl.trainer.ppo.core_algos.register_policy_loss`` under verl's signature::

    (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
     config=None, rollout_is_weights=None) -> (loss, metrics)

Names: ``vespo`` (the released recipe's name) and ``vespo_<name>`` for every loss of the
registry (``vespo_vespo``, ``vespo_grpo``, ``vespo_gspo``, ``vespo_sapo``, ``vespo_cispo``,
``vespo_gmpo``, ``vespo_topr``, ``vespo_seq_clip``, ``vespo_reinforce``, ``vespo_vespo_adaptive``). If verl itself ever ships
a ``vespo`` loss, verl's stays under ``vespo`` (a warning says so) unless the environment variable
``VESPO_VERL_REPLACE_BUILTIN=1`` is set; ours is always reachable as ``vespo_vespo``.

Parameters, highest priority first:

1. ``actor.policy_loss.<node>.<param>`` where ``<node>`` is ``vespo`` for VESPO (the recipe's
   ``policy_loss.vespo.{k_pos,lambda_pos,k_neg,lambda_neg}``) and ``vespo_<name>`` otherwise;
2. verl's standard actor keys where verl has one (:data:`VERL_STANDARD_KEYS`: ``clip_ratio_low``,
   ``clip_ratio_high``, ``clip_ratio_c``, ``tau_pos``, ``tau_neg``);
3. the loss's defaults in :mod:`vespo.losses` (VESPO: 2 / 3 / 3 / 2 like the recipe).

verl 0.9 turns ``actor.policy_loss`` into the strict dataclass ``PolicyLossConfig``, which rejects
unknown keys such as ``vespo``. Point its ``_target_`` at :class:`VespoPolicyLossConfig` (the same
dataclass plus one dict per vespo loss): hydra then imports this module in every process that
builds the actor config, which is also what registers the losses in verl's Ray workers::

    actor_rollout_ref.actor.policy_loss._target_=vespo.integrations.verl.VespoPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=vespo
    +actor_rollout_ref.actor.policy_loss.vespo.k_pos=2.0

The loss matrix is reduced by verl's ``agg_loss`` with ``config.global_batch_info`` (global token
and sequence counts, data-parallel size), exactly as verl's built-in losses do. Metrics: verl's
``actor/pg_clipfrac``, ``actor/pg_clipfrac_lower``, ``actor/ppo_kl`` plus every vespo diagnostic
as ``actor/vespo/<key with '/' -> '_'>`` (``actor/vespo/phi_mean``, ``actor/vespo/is_ess``, ...).

``vespo_adaptive`` across data-parallel ranks: its tempering exponent depends on statistics of the
whole batch (:class:`vespo.losses.AdaptiveStats`, plain sums). Each call computes the sums of its
own micro-batch and, when ``torch.distributed`` is initialised with more than one rank, adds them
over the ranks with one ``all_reduce`` (a [1, 2, 1 + 4 G] float64 tensor, about 4 KiB), so every rank
uses the alpha of the union of the ranks' current micro-batches. The group is the default (world)
group unless :func:`set_stats_process_group` names another one (Megatron: the data-parallel group
of the last pipeline stage). Ranks that hold copies of the same sequences (Ulysses or tensor
parallel) change nothing: alpha depends on the sums only through ratios that a uniform duplication
leaves unchanged. Every rank must make the same number of loss calls per step (verl's default
fixed micro-batches do; with ``use_dynamic_bsz`` the micro-batch counts must be equal across
ranks). verl calls the loss once per micro-batch with no access to the others, so with gradient
accumulation (``ppo_micro_batch_size_per_gpu`` < the per-rank mini-batch) the statistics are those
of one micro-step across ranks, not of the whole mini-batch: set the micro-batch to the per-rank
mini-batch for exact mini-batch statistics. ``VESPO_ADAPTIVE_STATS=local`` turns the all-reduce off.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from vespo.integrations import flat_metric_name, is_sign_quantile, loss_diagnostics
from vespo.losses import build_loss_batch, compute_loss_terms, get_loss_spec, loss_specs
from vespo.losses.vespo_adaptive import adaptive_seq_log_w, vespo_adaptive_batch_stats

#: verl versions this adapter was tested with, and the range it accepts.
TESTED_VERL_VERSIONS: tuple[str, ...] = ("0.9.1",)
SUPPORTED_VERL = "verl>=0.9,<0.10 (tested: 0.9.1)"

_INSTALL_HINT = "install verl next to vespo: `pip install -c constraints.txt vespo verl==0.9.1` (docs/integrations.md)"


def _incompatible(problem: str, version: str) -> ImportError:
    return ImportError(
        f"vespo.integrations.verl supports {SUPPORTED_VERL}; the installed verl {version} "
        f"has a different policy-loss interface: {problem}"
    )


try:
    import verl
    from verl.trainer.ppo import core_algos as _core_algos
    from verl.workers.config import PolicyLossConfig as _PolicyLossConfig
except ImportError as exc:  # verl missing, or a version without these modules
    raise ImportError(
        f"vespo.integrations.verl needs {SUPPORTED_VERL} with the modules "
        f"verl.trainer.ppo.core_algos and verl.workers.config ({exc}); {_INSTALL_HINT}"
    ) from exc

VERL_VERSION: str = str(getattr(verl, "__version__", "unknown"))

#: verl's policy-loss call, keyword by keyword (``verl.trainer.ppo.core_algos.PolicyLossFn``).
_LOSS_ARGS = (
    "old_log_prob",
    "log_prob",
    "advantages",
    "response_mask",
    "loss_agg_mode",
    "config",
    "rollout_is_weights",
)
_AGG_ARGS = ("loss_mat", "loss_mask", "loss_agg_mode")
_GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


def _check_interface() -> None:
    """Raise ImportError naming the supported versions if verl's loss API is not the one we use."""
    for attr in ("register_policy_loss", "get_policy_loss_fn", "agg_loss", "POLICY_LOSS_REGISTRY"):
        if not hasattr(_core_algos, attr):
            raise _incompatible(f"verl.trainer.ppo.core_algos has no {attr}", VERL_VERSION)
    agg_params = inspect.signature(_core_algos.agg_loss).parameters
    missing = [p for p in (*_AGG_ARGS, *_GLOBAL_BATCH_KEYS) if p not in agg_params]
    if missing:
        raise _incompatible(f"agg_loss() lacks the argument(s) {', '.join(missing)}", VERL_VERSION)
    vanilla = _core_algos.POLICY_LOSS_REGISTRY.get("vanilla")
    if vanilla is None:
        raise _incompatible("the built-in 'vanilla' policy loss is not registered", VERL_VERSION)
    names = tuple(inspect.signature(vanilla).parameters)
    if names != _LOSS_ARGS:
        raise _incompatible(
            f"policy losses take ({', '.join(names)}), expected ({', '.join(_LOSS_ARGS)})", VERL_VERSION
        )
    if not dataclasses.is_dataclass(_PolicyLossConfig):
        raise _incompatible("verl.workers.config.PolicyLossConfig is not a dataclass", VERL_VERSION)
    if VERL_VERSION not in TESTED_VERL_VERSIONS:
        warnings.warn(
            f"vespo.integrations.verl was tested with verl {', '.join(TESTED_VERL_VERSIONS)}; "
            f"verl {VERL_VERSION} has the same policy-loss interface, so it is used as is",
            stacklevel=3,
        )


_check_interface()

#: Loss parameters that verl already configures with its standard actor keys. Each value is the
#: list of keys tried in order (verl falls back from clip_ratio_low/high to clip_ratio).
VERL_STANDARD_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "grpo": {
        "eps_low": ("clip_ratio_low", "clip_ratio"),
        "eps_high": ("clip_ratio_high", "clip_ratio"),
        "clip_c": ("clip_ratio_c",),
    },
    "gspo": {"eps_low": ("clip_ratio_low", "clip_ratio"), "eps_high": ("clip_ratio_high", "clip_ratio")},
    "cispo": {"eps_low": ("clip_ratio_low", "clip_ratio"), "eps_high": ("clip_ratio_high", "clip_ratio")},
    "gmpo": {"clip_low": ("clip_ratio_low", "clip_ratio"), "clip_high": ("clip_ratio_high", "clip_ratio")},
    "sapo": {"tau_pos": ("tau_pos",), "tau_neg": ("tau_neg",)},
}

REPLACE_BUILTIN_ENV = "VESPO_VERL_REPLACE_BUILTIN"
METRIC_PREFIX = "actor/vespo/"


def verl_loss_name(name: str) -> str:
    """verl ``loss_mode`` of vespo loss ``name``: ``vespo_<name>`` (``vespo_vespo`` for VESPO)."""
    return f"vespo_{name}"


def config_node_name(name: str) -> str:
    """Key under ``actor.policy_loss`` that holds loss ``name``'s parameters."""
    return "vespo" if name == "vespo" else verl_loss_name(name)


def _lookup(obj: Any, key: str) -> Any:
    """``obj[key]`` for dicts, DictConfigs and verl's BaseConfig dataclasses; None when absent."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):  # DictConfig.get returns None for unknown keys, even in struct mode
        return obj.get(key)
    return getattr(obj, key, None)


def _plain(node: Any, where: str) -> dict[str, Any]:
    if node is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - verl requires omegaconf
        pass
    if not isinstance(node, Mapping):
        raise ValueError(f"{where} must be a mapping of parameter names to values, got {node!r}")
    return dict(node)


def loss_params(name: str, config: Any) -> dict[str, Any]:
    """The parameters loss ``name`` runs with under verl actor ``config`` (None allowed).

    ``config`` may be verl's ``ActorConfig`` dataclass, an OmegaConf ``DictConfig``, a dict or None.
    Unknown parameter names or invalid values raise ValueError.
    """
    spec = get_loss_spec(name)
    params: dict[str, Any] = {}
    for param, keys in VERL_STANDARD_KEYS.get(name, {}).items():
        for key in keys:
            value = _lookup(config, key)
            if value is not None:
                params[param] = float(value)
                break
    node = config_node_name(name)
    params.update(_plain(_lookup(_lookup(config, "policy_loss"), node), f"actor.policy_loss.{node}"))
    return spec.resolve(params)


def global_batch_info(config: Any) -> dict[str, Any]:
    """``config.global_batch_info`` restricted to the keys ``agg_loss`` takes ({} if absent)."""
    info = _lookup(config, "global_batch_info")
    if not info:
        return {}
    return {key: info[key] for key in _GLOBAL_BATCH_KEYS if key in info}


def verl_metrics(diagnostics: dict[str, float]) -> dict[str, float]:
    """verl-style metric names: ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/vespo/...``.

    The per-sign quantiles are left out: verl averages each key over micro-batches and ranks and
    needs the same keys on every call, and those exist only when a sign is present.
    """
    metrics = {
        "actor/pg_clipfrac": diagnostics.get("loss/clip_frac", 0.0),
        "actor/pg_clipfrac_lower": diagnostics.get("loss/clip_frac_lower", 0.0),
        "actor/ppo_kl": diagnostics["is/token_kl"],
    }
    for key, value in diagnostics.items():
        if not is_sign_quantile(key):
            metrics[METRIC_PREFIX + flat_metric_name(key)] = value
    return metrics


PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]

ADAPTIVE_STATS_ENV = "VESPO_ADAPTIVE_STATS"
_STATS_GROUP: Any = None


def set_stats_process_group(group: Any) -> None:
    """Process group over which ``vespo_adaptive`` adds its batch statistics (None: world)."""
    global _STATS_GROUP
    _STATS_GROUP = group


def adaptive_stats_across_ranks(batch: Any, params: dict[str, Any]) -> Any:
    """``vespo_adaptive`` statistics of this call's batch, summed over the data-parallel ranks.

    Returns :class:`vespo.losses.AdaptiveStats`; the all-reduce runs only when torch.distributed is
    initialised with world size > 1 and ``VESPO_ADAPTIVE_STATS`` is not ``local``.
    """
    kernel_params = {k: v for k, v in params.items() if k != "batch_stats"}
    stats = vespo_adaptive_batch_stats(
        adaptive_seq_log_w(batch, params["is_mode"], params["alpha_min"]),
        batch.seq_advantages,
        batch.lengths > 0,
        **kernel_params,
    )
    dist = torch.distributed
    if (
        os.environ.get(ADAPTIVE_STATS_ENV, "dp") != "local"
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size(_STATS_GROUP) > 1
    ):
        sums = stats.sums
        if dist.get_backend(_STATS_GROUP) == "nccl" and torch.cuda.is_available():
            sums = sums.cuda()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=_STATS_GROUP)
        stats = type(stats)(sums.to(stats.sums.device), stats.key, None)
    return stats


def make_verl_policy_loss(name: str) -> PolicyLossFn:
    """A verl policy-loss function that runs vespo loss ``name`` (see the module docstring)."""
    get_loss_spec(name)  # unknown names fail here

    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        params = loss_params(name, config)
        batch = build_loss_batch(
            log_prob=log_prob,
            old_log_prob=old_log_prob,
            advantages=advantages,
            response_mask=response_mask,
            rollout_is_weights=rollout_is_weights,
        )
        if name == "vespo_adaptive" and params.get("batch_stats") is None:
            params = {**params, "batch_stats": adaptive_stats_across_ranks(batch, params)}
        out = compute_loss_terms(name, batch, **params)
        loss = _core_algos.agg_loss(
            loss_mat=out.loss_mat,
            loss_mask=response_mask,
            loss_agg_mode=loss_agg_mode,
            **global_batch_info(config),
        )
        return loss, verl_metrics(loss_diagnostics(batch, out))

    policy_loss.__name__ = policy_loss.__qualname__ = f"vespo_policy_loss_{name}"
    policy_loss.__doc__ = f"vespo loss '{name}' ({get_loss_spec(name).summary}) with verl's signature."
    policy_loss._vespo_loss_name = name  # type: ignore[attr-defined]
    return policy_loss


def _is_ours(fn: Any) -> bool:
    return getattr(fn, "_vespo_loss_name", None) is not None


def register_verl_losses() -> dict[str, str]:
    """Register every vespo loss in verl's registry; returns {verl loss_mode: vespo loss name}.

    Idempotent. A prefixed name held by something else is an error; a ``vespo`` built into verl
    is kept unless ``VESPO_VERL_REPLACE_BUILTIN=1``.
    """
    registry = _core_algos.POLICY_LOSS_REGISTRY
    registered: dict[str, str] = {}
    for spec in loss_specs():
        mode = verl_loss_name(spec.name)
        if mode in registry and not _is_ours(registry[mode]):
            raise RuntimeError(
                f"verl already has a policy loss named '{mode}' that is not vespo's; "
                "vespo.integrations.verl cannot register its own under that name"
            )
        _core_algos.register_policy_loss(mode)(make_verl_policy_loss(spec.name))
        registered[mode] = spec.name
    builtin = registry.get("vespo")
    if builtin is None or _is_ours(builtin) or os.environ.get(REPLACE_BUILTIN_ENV) == "1":
        _core_algos.register_policy_loss("vespo")(make_verl_policy_loss("vespo"))
        registered["vespo"] = "vespo"
    else:
        warnings.warn(
            f"verl {VERL_VERSION} has its own 'vespo' policy loss; it is kept under loss_mode=vespo and "
            f"vespo's implementation is loss_mode=vespo_vespo (set {REPLACE_BUILTIN_ENV}=1 to replace it)",
            stacklevel=2,
        )
    return registered


def _loss_config_fields() -> list[tuple[str, Any, Any]]:
    return [
        (config_node_name(spec.name), dict[str, Any], dataclasses.field(default_factory=dict)) for spec in loss_specs()
    ]


#: verl's ``PolicyLossConfig`` plus one dict per vespo loss (``vespo``, ``vespo_grpo``, ...), so that
#: ``+actor_rollout_ref.actor.policy_loss.vespo.k_pos=2.0`` is accepted by verl's strict config.
VespoPolicyLossConfig = dataclasses.make_dataclass(
    "VespoPolicyLossConfig",
    _loss_config_fields(),
    bases=(_PolicyLossConfig,),
    namespace={
        "__doc__": "verl PolicyLossConfig with a parameter dict per vespo loss; use it as the "
        "_target_ of actor_rollout_ref.actor.policy_loss (importing it registers the losses).",
        "__module__": __name__,
    },
)

REGISTERED: dict[str, str] = register_verl_losses()

__all__ = [
    "REGISTERED",
    "SUPPORTED_VERL",
    "TESTED_VERL_VERSIONS",
    "VERL_STANDARD_KEYS",
    "VespoPolicyLossConfig",
    "adaptive_stats_across_ranks",
    "config_node_name",
    "global_batch_info",
    "loss_params",
    "make_verl_policy_loss",
    "register_verl_losses",
    "set_stats_process_group",
    "verl_loss_name",
    "verl_metrics",
]
