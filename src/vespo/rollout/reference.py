"""The trainer's precision under the sampling weights: what engine mismatch is measured against.

A :class:`ReferencePolicy` holds the sampling weights in the trainer's dtype (loaded at every sync,
like the engine). For each generated segment it records the log-probs of the new tokens
(``Rollout.reference_log_probs``), so that

    log W = sum_t (log pi_theta - log mu)
          = sum_t (log pi_theta - log pi_ref)   staleness: the trainer moved since the tokens were drawn
          + sum_t (log pi_ref   - log mu)       engine mismatch: same weights, another engine/precision

and, for MoE policies sampled by the ``hf`` engine, the share of (token, layer) routings whose
top-k experts differ between the engine's precision and the trainer's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from vespo.rollout.batch import Rollout
from vespo.rollout.log_probs import position_ids_from_mask, sequence_log_probs
from vespo.rollout.routing import replay_routing

__all__ = ["ReferencePolicy", "is_moe"]


def is_moe(model: nn.Module) -> bool:
    """A transformers mixture-of-experts model (Qwen3-MoE, Mixtral, ...)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None))


class ReferencePolicy:
    """A frozen trainer-precision copy of the sampling weights (see the module docstring).

    ``engine_model``: the engine's own transformers module, when it has one (the ``hf`` engine);
    routing flips are measured only then. ``temperature``: the sampling temperature, so that the
    reference scores the same tempered distribution the engine sampled from (and the trainer optimises).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        dtype: torch.dtype,
        pad_id: int,
        engine_model: nn.Module | None = None,
        temperature: float = 1.0,
    ):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 for reference log-probs, got {temperature}")
        self.model = copy.deepcopy(model).to(dtype=dtype).eval().requires_grad_(False)
        self.pad_id = pad_id
        self.temperature = float(temperature)
        self.engine_model = engine_model if is_moe(self.model) else None
        self.top_k = int(getattr(self.model.config, "num_experts_per_tok", 1) or 1) if self.engine_model else 1

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            self.model.load_state_dict(dict(state_dict), strict=False)

    @torch.no_grad()
    def score_segment(self, rollout: Rollout, before: list[int], out: list[list[float]]) -> list[float]:
        """Append to ``out[i]`` the reference log-probs of the tokens sequence ``i`` gained since it held
        ``before[i]`` tokens; returns the routing-flip fraction of this segment (empty if not measured)."""
        rows = [i for i in range(len(rollout)) if len(rollout.response_ids[i]) > before[i]]
        if not rows:
            return []
        batch = rollout.select(rows).to_batch(self.pad_id)
        with replay_routing(self.model, batch.routed_experts) if batch.routed_experts is not None else nullcontext():
            logp = sequence_log_probs(
                self.model, batch.input_ids, batch.attention_mask, batch.response_length, temperature=self.temperature
            )
        for j, i in enumerate(rows):
            out[i].extend(logp[j, before[i] : len(rollout.response_ids[i])].tolist())
        if self.engine_model is None:
            return []
        try:
            return [
                self._routing_flips(
                    batch.input_ids, batch.attention_mask, batch.prompt_length, [before[i] for i in rows]
                )
            ]
        except (AttributeError, TypeError):  # pragma: no cover - a model without router outputs
            self.engine_model = None
            return []

    def _routing_flips(self, ids: Tensor, mask: Tensor, prompt_length: int, starts: list[int]) -> float:
        """Fraction of (new token, layer) pairs whose top-k experts differ between the engine's
        precision and the trainer's, on the same inputs (full forward passes)."""
        kwargs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": position_ids_from_mask(mask),
            "output_router_logits": True,
            "use_cache": False,
        }
        routed_ref = self.model(**kwargs).router_logits
        routed_eng = self.engine_model(**kwargs).router_logits
        b, width = ids.shape
        new = torch.zeros((b, width), dtype=torch.bool)
        for j, s in enumerate(starts):  # this segment's tokens start at prompt_length + starts[j]
            new[j, prompt_length + s :] = True
        selected = (new & mask.bool()).reshape(-1)
        if not selected.any():
            return 0.0
        total = flipped = 0.0
        for r_ref, r_eng in zip(routed_ref, routed_eng):
            a = r_ref.float().reshape(b * width, -1)[selected].topk(self.top_k, -1).indices.sort(-1).values
            c = r_eng.float().reshape(b * width, -1)[selected].topk(self.top_k, -1).indices.sort(-1).values
            flipped += float((a != c).any(-1).sum())
            total += float(a.shape[0])
        return flipped / max(total, 1.0)
