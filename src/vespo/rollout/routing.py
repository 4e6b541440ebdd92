"""MoE routing: record each token's selected experts in one forward pass, replay them in another.

Routing replay (Ma et al. 2510.11370; verl ``router_replay``; method.md §1, §3) removes the part of
the train/inference mismatch that comes from top-k routing decisions: two forward passes of the same
tokens (a bf16 sampler and the fp32 trainer, or pi_old and pi_theta) may pick different experts for
a token, and one flipped expert changes the token's hidden state in every later layer.

* **R2**: the trainer's pi_old pass records its routing; the pi_theta passes replay it.
* **R3**: the sampler records its routing while it generates (prefill and every decode step); the
  trainer's pi_old and pi_theta passes replay it.

How it hooks in (no copy of transformers' model code): every recognised router module (the ``gate``
of a transformers sparse-MoE block, a ``*TopKRouter`` returning ``(router_logits, routing_weights,
selected_experts)``) gets a forward hook. Recording reads ``selected_experts``. Replaying replaces
``selected_experts`` by the given indices and recomputes ``routing_weights`` from the *current*
``router_logits`` at those indices with the router's own formula (:data:`ROUTERS`):

* ``softmax_topk`` (Qwen3-MoE, Qwen2-MoE, OLMoE, Qwen3-Next, FlexOlmo; ``norm_topk_prob`` decides the
  renormalisation) and ``softmax_topk_norm`` (Mixtral, MiniMax, Qwen3-VL-MoE, Qwen3.5-MoE; always
  renormalised): ``p = softmax(router_logits)`` over all E experts (float32), ``w_j = p[e_j]`` at
  the replayed experts ``e_1..e_k``, then ``w_j / sum_i w_i`` when renormalised. Renormalised, this
  is ``w_j = exp(l_{e_j}) / sum_i exp(l_{e_i})``: the gradient reaches the router logits of the k
  replayed experts only (the full softmax's denominator cancels). Not renormalised
  (``norm_topk_prob=False``), the denominator is over all E experts, so every expert's logit gets a
  gradient.
* ``topk_softmax`` (GPT-OSS, Aria, GraniteMoE, GraniteMoE-shared): ``w = softmax(router_logits[e])``
  over the k replayed logits.

The weights are cast to the dtype the router returned. Gradients flow exactly as without replay
through ``w`` into the router weight (``gate.weight``) and, through the logits, into the hidden
states; the expert choice itself is discrete and carries no gradient with or without replay. A
position whose replayed entry is :func:`unknown_index` (padding, a token the sampler never fed
forward) keeps the router's own choice and weights. On its first call each hooked router is
checked once: the weights recomputed at its *own* choice must equal what it returned, so a router
whose formula changed in a new transformers release fails loudly instead of replaying wrongly.

Storage: ``selected_experts`` per position as ``[positions, moe_layers, k]`` uint8 (int16 with more
than 255 experts), i.e. ``moe_layers * k`` bytes a token (8 for the tiny 4-layer top-2 models, 384
for a 48-layer top-8 Qwen3-30B-A3B). The sentinel for "not recorded" is 255 (uint8) or -1 (int16).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "MODES",
    "ROUTERS",
    "RoutingRecorder",
    "RoutingReplayError",
    "SamplerRouting",
    "TrainerRouting",
    "config_error",
    "find_routers",
    "record_routing",
    "replay_routing",
    "routing_dtype",
    "unknown_index",
]

MODES = ("none", "r2", "r3")

#: router class name -> how its weights are computed from the logits at the chosen experts.
ROUTERS: dict[str, str] = {
    **dict.fromkeys(
        ("Qwen3MoeTopKRouter", "Qwen2MoeTopKRouter", "OlmoeTopKRouter", "Qwen3NextTopKRouter", "FlexOlmoTopKRouter"),
        "softmax_topk",
    ),
    **dict.fromkeys(
        ("MixtralTopKRouter", "MiniMaxTopKRouter", "Qwen3VLMoeTextTopKRouter", "Qwen3_5MoeTopKRouter"),
        "softmax_topk_norm",
    ),
    **dict.fromkeys(
        ("GptOssTopKRouter", "AriaTextTopKRouter", "GraniteMoeTopKRouter", "GraniteMoeSharedTopKRouter"),
        "topk_softmax",
    ),
}


class RoutingReplayError(ValueError):
    """Routing cannot be recorded or replayed for this model or input (one line for the user)."""


def routing_dtype(num_experts: int) -> torch.dtype:
    return torch.uint8 if num_experts < 255 else torch.int16


def unknown_index(dtype: torch.dtype) -> int:
    """The "not recorded" sentinel of a stored routing tensor."""
    return 255 if dtype == torch.uint8 else -1


def config_error(*, mode: str, kind: str, arch: str, engine: str, old_log_prob: str) -> str | None:
    """The one-line reason a configuration cannot use ``algorithm.routing_replay=mode`` (None: it can)."""
    if mode not in MODES:
        return f"algorithm.routing_replay must be one of {', '.join(MODES)} (got {mode!r})"
    if mode == "none":
        return None
    if kind == "tiny" and arch not in ("qwen3_moe", "mixtral"):
        return (
            f"algorithm.routing_replay={mode} needs a mixture-of-experts policy "
            f"(model.arch=qwen3_moe or mixtral), but model.arch={arch} is dense"
        )
    if kind == "smollm2":
        return f"algorithm.routing_replay={mode} needs a mixture-of-experts policy; SmolLM2 is dense"
    if mode == "r2" and old_log_prob != "recompute":
        return (
            "algorithm.routing_replay=r2 replays the routing of the trainer's pi_old pass, "
            "so it needs algorithm.old_log_prob=recompute"
        )
    if mode == "r3" and engine != "hf":
        return (
            f"algorithm.routing_replay=r3 needs the sampler's routing, which only sampling.engine=hf "
            f"records (sampling.engine={engine} does not); use r2 or engine=hf"
        )
    return None


# --------------------------------------------------------------------------------------------------
# Routers
# --------------------------------------------------------------------------------------------------


@dataclass
class _Router:
    layer: int
    name: str
    module: nn.Module
    kind: str
    top_k: int
    num_experts: int
    checked: bool = False

    @property
    def renormalize(self) -> bool:
        if self.kind == "softmax_topk":
            return bool(getattr(self.module, "norm_topk_prob", False))
        return self.kind == "softmax_topk_norm"

    def weights(self, logits: Tensor, experts: Tensor, like: Tensor) -> Tensor:
        """Routing weights at ``experts [N, k]`` from ``logits [N, E]`` (the router's formula)."""
        if self.kind == "topk_softmax":
            w = torch.softmax(logits.gather(-1, experts).float(), dim=-1)
        else:
            w = torch.softmax(logits, dim=-1, dtype=torch.float).gather(-1, experts)
            if self.renormalize:
                w = w / w.sum(dim=-1, keepdim=True)
        return w.to(like.dtype)


def find_routers(model: nn.Module) -> list[_Router]:
    """The recognised router modules of ``model``, in layer order; a clear error when there are none."""
    routers: list[_Router] = []
    unknown: set[str] = set()
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in ROUTERS:
            top_k = int(getattr(module, "top_k", 0) or 0)
            experts = int(
                getattr(module, "num_experts", 0) or getattr(getattr(module, "weight", None), "shape", [0])[0]
            )
            routers.append(_Router(len(routers), name, module, ROUTERS[cls], top_k, experts))
        elif cls.endswith(("Router", "TopKRouter")) or (name.endswith(".gate") and "Moe" in type(module).__name__):
            unknown.add(cls)
    if routers:
        return routers
    config = getattr(model, "config", None)
    moe = bool(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None))
    model_name = type(model).__name__
    if unknown or moe:
        found = f" (its routers: {', '.join(sorted(unknown))})" if unknown else ""
        raise RoutingReplayError(
            f"routing replay does not recognise the router of {model_name}{found}; recognised: "
            f"{', '.join(sorted(ROUTERS))} (transformers >= 5 TopKRouter modules)"
        )
    raise RoutingReplayError(f"routing replay needs a mixture-of-experts model; {model_name} has no expert router")


def _check_formula(router: _Router, logits: Tensor, scores: Tensor, chosen: Tensor) -> None:
    """Once per router: its own choice, re-weighted by :meth:`_Router.weights`, must give its own weights."""
    if router.checked:
        return
    router.checked = True
    with torch.no_grad():
        again = router.weights(logits.detach(), chosen, scores)
        if again.shape != scores.shape or not torch.allclose(
            again.float(), scores.detach().float(), rtol=1e-3, atol=1e-5
        ):
            raise RoutingReplayError(
                f"router {router.name} ({type(router.module).__name__}) does not compute its weights the way "
                "routing replay expects (transformers changed it?); replay would be wrong, so it is refused"
            )


# --------------------------------------------------------------------------------------------------
# Record
# --------------------------------------------------------------------------------------------------


class RoutingRecorder:
    """Collects the experts every router selected, one entry per router call (see :func:`record_routing`)."""

    def __init__(self, routers: list[_Router]):
        self.routers = routers
        self.calls: list[list[Tensor]] = [[] for _ in routers]
        self.dtype = routing_dtype(max(r.num_experts for r in routers))

    def _hook(self, router: _Router, output: Any) -> None:
        self.calls[router.layer].append(output[2].detach().to(device="cpu", dtype=self.dtype))

    def pop(self) -> Tensor:
        """``[N, L, k]``: the first pending call of every router (one forward pass), removed."""
        if any(not c for c in self.calls):
            raise RoutingReplayError("routing was not recorded for every MoE layer in this forward pass")
        return torch.stack([c.pop(0) for c in self.calls], dim=1)

    def take_all(self) -> Tensor:
        """``[N, L, k]``: every pending call, concatenated along tokens (one or more forward passes)."""
        out = torch.stack([torch.cat(c) for c in self.calls], dim=1)
        self.calls = [[] for _ in self.routers]
        return out


@contextlib.contextmanager
def _hooks(routers: list[_Router], fn) -> Iterator[None]:
    handles = [r.module.register_forward_hook(lambda m, a, out, r=r: fn(r, out)) for r in routers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecorder]:
    """Record the experts each token is routed to, per MoE layer, during the forward passes inside."""
    routers = find_routers(model)
    recorder = RoutingRecorder(routers)
    with _hooks(routers, recorder._hook):
        yield recorder


# --------------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------------


@dataclass
class ReplayStats:
    """Counts over the (position, layer) pairs in ``count_mask`` whose routing was replayed."""

    pairs: float = 0.0
    natural_flips: float = 0.0  # the router's own top-k set differs from the replayed one (before replay)
    used_flips: float = 0.0  # the experts actually used differ from the replayed ones (after replay: 0)
    positions: float = 0.0  # counted positions (replayed or not), per layer
    used: list[Tensor] = field(default_factory=list)  # per layer, the experts used (when keep_used)

    def add(self, other: ReplayStats) -> None:
        self.pairs += other.pairs
        self.natural_flips += other.natural_flips
        self.used_flips += other.used_flips
        self.positions += other.positions


@contextlib.contextmanager
def replay_routing(
    model: nn.Module, experts: Tensor, *, count_mask: Tensor | None = None, keep_used: bool = False
) -> Iterator[ReplayStats]:
    """Replay ``experts [b, S, L, k]`` (as stored, :func:`unknown_index` = the router chooses) in the
    forward passes inside, over inputs of ``b x S`` tokens. See the module docstring for the weights.

    The yielded :class:`ReplayStats` counts flips on the positions of ``count_mask [b, S]`` (all
    positions when None); ``keep_used`` also keeps the experts each layer used, ``[b*S, k]``.
    """
    routers = find_routers(model)
    b, s, n_layers, k = experts.shape
    if n_layers != len(routers) or any(r.top_k not in (0, k) for r in routers):
        raise RoutingReplayError(
            f"stored routing has {n_layers} layers x top-{k}, the model has {len(routers)} MoE layers x "
            f"top-{routers[0].top_k}"
        )
    sentinel = unknown_index(experts.dtype)
    flat = experts.reshape(b * s, n_layers, k)
    known = (flat[:, :, 0] != sentinel) if flat.numel() else torch.zeros((b * s, n_layers), dtype=torch.bool)
    counted = torch.ones(b * s, dtype=torch.bool) if count_mask is None else count_mask.reshape(-1).bool().cpu()
    stats = ReplayStats()
    replayed_idx = flat.long().clamp_min(0)
    cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def hook(router: _Router, output: Any) -> Any:
        logits, scores, chosen = output
        if logits.shape[0] != b * s:
            raise RoutingReplayError(
                f"router {router.name} saw {logits.shape[0]} tokens, the replayed routing covers {b}x{s}"
            )
        _check_formula(router, logits, scores, chosen)
        dev = chosen.device
        if dev not in cache:
            cache[dev] = (replayed_idx.to(dev), known.to(dev))
        idx_all, known_all = cache[dev]
        rep, ok = idx_all[:, router.layer], known_all[:, router.layer]
        new_idx = torch.where(ok[:, None], rep.to(chosen.dtype), chosen)
        new_w = torch.where(ok[:, None], router.weights(logits, new_idx, scores), scores)
        with torch.no_grad():
            sel = counted.to(dev) & ok
            if bool(sel.any()):
                natural = chosen[sel].sort(-1).values
                target = rep[sel].sort(-1).values
                used = new_idx[sel].sort(-1).values
                stats.pairs += float(sel.sum())
                stats.natural_flips += float((natural != target).any(-1).sum())
                stats.used_flips += float((used != target).any(-1).sum())
            stats.positions += float(counted.sum())
            if keep_used:
                stats.used.append(new_idx.detach().cpu())
        return logits, new_w, new_idx

    with _hooks(routers, hook):
        yield stats


# --------------------------------------------------------------------------------------------------
# Sampler side (the hf engine's decode loop)
# --------------------------------------------------------------------------------------------------


class SamplerRouting:
    """The hf sampler's routing for the rows of one ``generate`` call: recorded at the prefill and at
    every decode step (:meth:`collect`), assembled per sequence at the end (:meth:`finish`).

    A row's routing covers prompt + response, position by position (the routing of each token when
    it was fed forward). Resuming a partial rollout prefills prompt + partial response again under
    the new weights and records that routing for those positions (the last forward wins). The last
    token of a response is never fed forward, so its entry is the "not recorded" sentinel; the
    trainer's router chooses for it (it affects no log-prob).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._ctx = record_routing(model)
        self.recorder: RoutingRecorder | None = None
        self._started: set[int] = set()

    def __enter__(self) -> SamplerRouting:
        self.recorder = self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)

    def collect(self, rows: Sequence[Any], live: Sequence[int], mask: Tensor | None) -> None:
        """After one forward pass over batch rows ``live`` (``rows[live[j]]`` is batch row j): append
        each row's new positions to ``rows[...].routing`` (the prefill's real tokens, or one token)."""
        exp = self.recorder.pop()  # [b*s, L, k]
        b = len(live)
        s = exp.shape[0] // b
        exp = exp.reshape(b, s, *exp.shape[1:])
        for j, r in enumerate(live):
            n = s if mask is None or s == 1 else int(mask[j].sum())
            chunk = exp[j, s - min(n, s) :]
            if r not in self._started:
                self._started.add(r)
                rows[r].routing = [chunk]
            else:
                rows[r].routing.append(chunk)

    def finish(self, prompts: Sequence[Sequence[int]], rows: Sequence[Any]) -> list[Tensor]:
        """Per sequence ``[len(prompt) + len(response), L, k]``, padded with the sentinel where unknown."""
        dtype, n_layers = self.recorder.dtype, len(self.recorder.routers)
        k = self.recorder.routers[0].top_k
        out = []
        for p, row in zip(prompts, rows):
            length = len(p) + len(row.tokens)
            have = row.routing
            if isinstance(have, list):
                have = torch.cat(have) if have else None
            full = torch.full((length, n_layers, k), unknown_index(dtype), dtype=dtype)
            if have is not None:
                n = min(length, have.shape[0])
                full[:n] = have[:n]
            out.append(full)
        return out


# --------------------------------------------------------------------------------------------------
# Trainer side
# --------------------------------------------------------------------------------------------------


class TrainerRouting:
    """``algorithm.routing_replay`` in the trainer: wraps its pi_old and pi_theta forward passes.

    * ``r2``: the pi_old pass records (``batch.routed_experts`` = pi_old's routing); pi_theta replays.
    * ``r3``: ``batch.routed_experts`` arrives from the sampler; pi_old and pi_theta replay it.
    * ``none``: nothing (the context managers are no-ops).

    :meth:`metrics` gives the step's ``routing/*`` entries: stored bytes, and the flip fractions
    before (the trainer's own top-k vs the replayed routing) and after replay (0 when it works).
    """

    def __init__(self, mode: str, model: nn.Module):
        if mode not in MODES:
            raise RoutingReplayError(f"algorithm.routing_replay must be one of {', '.join(MODES)} (got {mode!r})")
        self.mode = mode
        self.model = model
        if mode != "none":
            find_routers(model)  # a clear error now for a dense or unrecognised model
        self._old: dict[int, ReplayStats] = {}
        self._theta = ReplayStats()
        self._recording: RoutingRecorder | None = None
        self._old_target: ReplayStats | None = None

    @contextlib.contextmanager
    def old_pass(self, batch: Any) -> Iterator[None]:
        """Around the pi_old recompute of a whole mini-batch (its micro-batches inside)."""
        if self.mode == "r2":
            with record_routing(self.model) as rec:
                self._recording = rec
                try:
                    yield
                finally:
                    self._recording = None
            batch.routed_experts = _as_batch(rec, batch)
        else:
            self._old[id(batch)] = ReplayStats()
            self._old_target = self._old[id(batch)]
            try:
                yield
            finally:
                self._old_target = None

    @contextlib.contextmanager
    def forward(self, micro: Any) -> Iterator[None]:
        """Around one forward pass over a (micro-)batch: replay its routing when there is one."""
        experts = getattr(micro, "routed_experts", None)
        if self.mode == "none" or self._recording is not None or experts is None:
            yield
            return
        count = torch.zeros(micro.input_ids.shape, dtype=torch.bool)
        count[:, micro.prompt_length :] = micro.response_mask.cpu()
        target = self._old_target if self._old_target is not None else self._theta
        with replay_routing(self.model, experts, count_mask=count) as stats:
            yield
        target.add(stats)

    def metrics(self, batch: Any) -> dict[str, float]:
        """The ``routing/*`` metrics of a trained mini-batch (pops its pi_old statistics)."""
        if self.mode == "none":
            return {}
        out: dict[str, float] = {}
        experts = getattr(batch, "routed_experts", None)
        if experts is not None:
            out["routing/stored_bytes"] = float(experts.numel() * experts.element_size())
            out["routing/bytes_per_token"] = float(experts.shape[-1] * experts.shape[-2] * experts.element_size())
        old, theta = self._old.pop(id(batch), None), self._theta
        self._theta = ReplayStats()
        if old is not None and old.pairs:
            out["routing/old_flip_frac"] = old.natural_flips / old.pairs
            out["routing/old_replayed_flip_frac"] = old.used_flips / old.pairs
        if theta.pairs:
            out["routing/flip_frac"] = theta.natural_flips / theta.pairs
            out["routing/replayed_flip_frac"] = theta.used_flips / theta.pairs
            out["routing/replayed_frac"] = theta.pairs / max(theta.positions, 1.0)
        return out


def _as_batch(rec: RoutingRecorder, batch: Any) -> Tensor:
    """The recorded routing of a batch's forward passes (micro-batches in order) as ``[b, S, L, k]``."""
    flat = rec.take_all()
    b, s = batch.input_ids.shape
    if flat.shape[0] != b * s:
        raise RoutingReplayError(f"recorded routing covers {flat.shape[0]} tokens, the batch has {b}x{s}")
    return flat.reshape(b, s, *flat.shape[1:])
