"""benchmarks/adaptive_probe.py: the probe kernels against independent formulas, and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.adaptive_probe import PULLS, VARIANTS, config, register_probe_losses, render, run
from vespo.losses import compute_policy_loss
from vespo.losses.registry import _REGISTRY


@pytest.fixture(autouse=True, scope="module")
def probe_losses():
    """The probe kernels exist only while this module's tests run: registered at collection time,
    they would join the tests that are parametrised over every registered loss."""
    before = set(_REGISTRY)
    register_probe_losses()
    yield
    for name in set(_REGISTRY) - before:
        del _REGISTRY[name]


def _batch(scale: float, seed: int = 0, b: int = 12, t: int = 6, shift: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    return dict(
        log_prob=(old + shift + scale * torch.randn(b, t, generator=g, dtype=torch.float64)).requires_grad_(True),
        old_log_prob=old,
        advantages=torch.randn(b, generator=g, dtype=torch.float64),
        response_mask=torch.ones(b, t, dtype=torch.bool),
    )


def _coeff(loss: str, inputs: dict[str, torch.Tensor], **params: object) -> tuple[torch.Tensor, dict[str, float]]:
    """d loss / d log_prob, scaled back to the per-token coefficient (token-mean over B * T)."""
    out = compute_policy_loss(loss, loss_agg_mode="token-mean", **inputs, **params)
    (grad,) = torch.autograd.grad(out.loss, inputs["log_prob"])
    return grad * inputs["log_prob"].numel(), out.metrics


def _phi(log_v: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    c1 = torch.where(positive, 2.0, 3.0).to(log_v.dtype)
    c2 = torch.where(positive, 3.0, 2.0).to(log_v.dtype)
    return torch.exp(c1 * log_v + c2 * (1 - torch.exp(log_v)))


@pytest.mark.parametrize("loss", ["probe_token_bridge", *PULLS])
def test_probe_kernels_change_nothing_on_policy(loss: str):
    inputs = _batch(0.0)
    ref, _ = _coeff("vespo_adaptive", inputs)
    got, _ = _coeff(loss, inputs)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_token_bridge_matches_its_formula_when_alpha_is_below_one():
    inputs = _batch(1.5)
    got, metrics = _coeff("probe_token_bridge", inputs)
    alpha = metrics["vespo_adaptive/alpha_pos"]
    assert alpha < 0.9  # the adaptation acts on this batch
    log_rho = (inputs["log_prob"] - inputs["old_log_prob"]).detach()
    log_v = alpha * log_rho.sum(-1, keepdim=True) + (1 - alpha) * log_rho
    adv = inputs["advantages"][:, None]
    expected = -_phi(log_v, adv >= 0) * adv  # d(-phi A log pi)/d log pi per token
    torch.testing.assert_close(got, expected.expand_as(got), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", list(PULLS))
def test_pull_moves_each_signs_mean_weight_towards_one(loss: str):
    inputs = _batch(0.5, seed=3, shift=-0.4)  # stale: log W ~ -2.4, most weights W < 1
    adv = inputs["advantages"]
    base, _ = _coeff("vespo_adaptive", inputs, remainder="none")  # the first version the probes vary
    got, _ = _coeff(loss, inputs)
    phi, weight = (-base[:, 0] / adv), (-got[:, 0] / adv)  # per-sequence weights
    means = [float(phi[side].mean()) for side in (adv >= 0, adv < 0)]
    assert means[0] > means[1] + 0.05  # the kernel's sign asymmetry on stale data
    for side, m in zip((adv >= 0, adv < 0), means):
        assert math.isclose(float(weight[side].mean()), m ** PULLS[loss], rel_tol=1e-9)
        torch.testing.assert_close(weight[side] / phi[side], torch.full_like(phi[side], m ** (PULLS[loss] - 1)))


def test_quick_run_resumes_and_renders(tmp_path: Path):
    out = tmp_path / "probe.json"
    cfg = config(quick=True)
    first = run(cfg, out)
    assert len(first["runs"]) == len(cfg["t_values"]) * len(cfg["ns"]) * len(VARIANTS)
    cut = dict(first, runs=first["runs"][:5])
    out.write_text(json.dumps(cut))
    again = run(cfg, out)
    assert [r["final"] for r in again["runs"]] == [r["final"] for r in first["runs"]]
    text = render(again)
    assert "| token bridge |" in text and "N=4 / N=1" in text


def test_a_json_of_another_configuration_is_refused_not_overwritten(tmp_path: Path):
    out = tmp_path / "probe.json"
    other = {"config": dict(config(quick=True), steps=999), "runs": [{"label": "default", "T": 16, "N": 1}]}
    out.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="another configuration"):
        run(config(quick=True), out)
    assert json.loads(out.read_text()) == other


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_file_that_is_not_a_results_json_is_refused_in_one_line(tmp_path: Path, content: str):
    out = tmp_path / "probe.json"
    out.write_text(content)
    with pytest.raises(SystemExit, match="another|not a results JSON"):
        run(config(quick=True), out)
    assert out.read_text() == content
