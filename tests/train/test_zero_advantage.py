"""algorithm.skip_zero_advantage: no forward for A = 0 sequences, and the same update as without."""

from __future__ import annotations

import json

import pytest
import torch

from vespo.losses import KernelOutput, register_policy_loss
from vespo.losses.aggregation import AGGREGATION_MODES
from vespo.losses.registry import _REGISTRY, loss_specs
from vespo.train.zero_advantage import check_zero_advantage_skip, rows_with_gradient


def test_rows_with_gradient_per_sequence_and_per_token():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert rows_with_gradient(torch.tensor([0.5, 0.0, 1.0, -0.0]), mask).tolist() == [0]  # row 2 has no tokens
    assert rows_with_gradient(torch.tensor([0.0, float("nan"), 0.0, -1e-30]), mask).tolist() == [1, 3]
    token_adv = torch.tensor([[0.0, 0.0, 7.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.3]])
    assert rows_with_gradient(token_adv, mask).tolist() == [3]  # nonzero only where the mask is off for 0, 1


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("loss", [s.name for s in loss_specs()])
def test_every_builtin_loss_gives_no_gradient_to_zero_advantage_rows(loss, mode):
    check_zero_advantage_skip(loss, {}, mode)  # raises if skipping would change the gradient


def test_a_loss_with_a_term_independent_of_the_advantage_is_refused():
    from vespo.train.config import ConfigError, load_config

    @register_policy_loss("test_entropy_bonus", summary="REINFORCE minus an entropy-like term (test only)")
    def entropy_bonus(batch) -> KernelOutput:
        weight = torch.ones_like(batch.seq_advantages)
        loss_mat = -(batch.seq_advantages[:, None] + 0.1) * batch.log_prob
        return KernelOutput(loss_mat=loss_mat, logp_coeff=None, seq_log_w=batch.seq_log_ratio, seq_weight=weight)

    try:
        with pytest.raises(ValueError, match="gives gradient to sequences with zero advantage"):
            check_zero_advantage_skip("test_entropy_bonus", {}, "token-mean")
        with pytest.raises(ConfigError, match="skip_zero_advantage"):
            load_config(None, ["algorithm.loss=test_entropy_bonus", "algorithm.skip_zero_advantage=true"])
        load_config(None, ["algorithm.loss=test_entropy_bonus"])  # without the option it is a valid loss
    finally:
        _REGISTRY.pop("test_entropy_bonus", None)


@pytest.mark.parametrize(
    "loss, micro",
    [("vespo", "3"), ("vespo_adaptive", "3"), ("vespo_adaptive", "null")],  # null: one pass, alpha from a pre-pass
)
def test_a_run_that_skips_zero_advantage_rows_trains_like_one_that_does_not(tmp_path, loss, micro):
    from tiny_run import TINY_RUN

    from vespo.train.checkpoint import load_checkpoint
    from vespo.train.config import load_config
    from vespo.train.trainer import build_policy, train

    base = [*TINY_RUN, "logging.progress=false", "warmup.steps=0", "run.threads=1", "run.total_steps=4"]
    base += ["algorithm.staleness=2", f"algorithm.micro_batch_size={micro}", "eval.every=1000", "optim.lr=0.01"]
    base += ["task.reward_fn=tiny_run:rare_hash_reward", f"algorithm.loss={loss}", "checkpoint.every=4"]
    if loss == "vespo_adaptive":  # a target that makes alpha < 1, so the A = 0 rows' share of the ESS matters
        base += ["algorithm.loss_params={tau: 0.999}"]
    rows, weights = {}, {}
    for skip in ("false", "true"):
        out = tmp_path / skip
        cfg = load_config(None, [*base, f"run.out_dir={out}", f"algorithm.skip_zero_advantage={skip}"])
        train(cfg)
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rows[skip] = [r for r in lines if "grad/norm" in r]
        model, _ = build_policy(cfg)
        load_checkpoint(out, model=model)
        weights[skip] = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(rows["true"]) == len(rows["false"]) == 4
    skipped = [r["perf/skipped_seq_frac"] for r in rows["true"]]
    assert any(0 < s < 1 for s in skipped), skipped  # the run did skip some rows and kept others
    if loss == "vespo_adaptive":
        assert min(r["vespo_adaptive/alpha_pos"] for r in rows["false"]) < 1.0
    for plain, skipping in zip(rows["false"], rows["true"]):
        assert skipping["grad/norm"] == pytest.approx(plain["grad/norm"], rel=1e-4, abs=1e-7)
        assert skipping["reward/mean"] == plain["reward/mean"]  # the same rollouts: the same weights sampled
    for key, value in weights["false"].items():  # the same updates, so the same weights after 4 steps
        torch.testing.assert_close(weights["true"][key], value, rtol=1e-4, atol=1e-6)


def test_a_step_with_every_sequence_skipped_logs_a_zero_loss_and_leaves_the_weights(tmp_path):
    from tiny_run import TINY_RUN

    from vespo.train.checkpoint import load_checkpoint
    from vespo.train.config import load_config
    from vespo.train.trainer import build_policy, train

    base = [*TINY_RUN, "logging.progress=false", "warmup.steps=0", "run.threads=1", "run.total_steps=2"]
    base += ["task.reward_fn=tiny_run:zero_reward", "algorithm.skip_zero_advantage=true", "eval.every=1000"]
    base += ["checkpoint.every=2", "eval.at_start=false", "optim.weight_decay=0", f"run.out_dir={tmp_path}"]
    cfg = load_config(None, base)
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "grad/norm" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["perf/skipped_seq_frac"] == 1.0 and r["loss/value"] == 0.0 and r["grad/norm"] == 0.0
    initial, _ = build_policy(cfg)  # the same seed builds the same initial weights
    trained, _ = build_policy(cfg)
    load_checkpoint(tmp_path, model=trained)
    for (name, a), b in zip(initial.state_dict().items(), trained.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # AdamW, zero gradients, no decay: no move
