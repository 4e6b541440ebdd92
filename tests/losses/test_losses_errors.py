"""Bad inputs give one ValueError whose message names the problem."""

from __future__ import annotations

import pytest
import torch

from vespo.losses import aggregate_loss, compute_policy_loss, get_loss_spec, rollout_correction

B, T = 2, 3


def inputs(**over):
    kw = dict(
        log_prob=-torch.rand(B, T, requires_grad=True),
        old_log_prob=-torch.rand(B, T),
        advantages=torch.tensor([1.0, -1.0]),
        response_mask=torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool),
    )
    kw.update(over)
    return kw


def call(name="vespo", **over):
    params = {k: over.pop(k) for k in list(over) if k not in inputs()}
    return compute_policy_loss(name, **inputs(**over), **params)


def test_valid_call_works():
    assert torch.isfinite(call().loss)


def test_unknown_loss_name_lists_registered_losses():
    with pytest.raises(ValueError, match=r"unknown policy loss 'vespa'.*registered losses:.*vespo"):
        call("vespa")


def test_unknown_parameter_lists_known_ones():
    with pytest.raises(ValueError, match=r"loss 'vespo' has no parameter 'k_plus'.*k_pos"):
        call(k_plus=2.0)
    with pytest.raises(ValueError, match=r"loss 'reinforce' has no parameter 'clip'.*none"):
        call("reinforce", clip=1.0)


@pytest.mark.parametrize("key", ["lambda_pos", "lambda_neg"])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_lambda_must_be_positive(key, value):
    with pytest.raises(ValueError, match=rf"loss 'vespo': {key}=-?\d+ is out of range \(0, inf\)"):
        call(**{key: value})


@pytest.mark.parametrize("key", ["k_pos", "k_neg"])
def test_k_below_one_mentions_the_variance_bound(key):
    with pytest.raises(ValueError, match=rf"{key}=0.5 is out of range \[1, inf\).*variance bound.*c1 >= 1"):
        call(**{key: 0.5})


@pytest.mark.parametrize(
    "name, params, pattern",
    [
        ("grpo", {"eps_low": 1.5}, r"eps_low=1.5 is out of range \[0, 1\]"),
        ("grpo", {"clip_c": 1.0}, r"clip_c=1 is out of range \(1, inf\)"),
        ("gspo", {"eps_high": -1e-4}, r"eps_high=-0.0001 is out of range"),
        ("sapo", {"tau_neg": 0.0}, r"tau_neg=0 is out of range"),
        ("cispo", {"eps_high": -1.0}, r"eps_high=-1 is out of range"),
        ("seq_clip", {"clip": 0.0}, r"clip=0 is out of range"),
        ("topr", {"clip": -2.0}, r"clip=-2 is out of range"),
        ("gmpo", {"clip_low": -0.1}, r"clip_low=-0.1 is out of range"),
        ("vespo", {"is_mode": "both"}, r"is_mode='both' is not one of joint, factorised"),
        ("vespo", {"length_norm": "T"}, r"length_norm='T' is not one of none, sqrt, linear"),
        ("vespo", {"k_pos": "2"}, r"k_pos must be a number"),
        ("vespo", {"k_pos": True}, r"k_pos must be a number"),
        ("vespo", {"lambda_pos": float("nan")}, r"lambda_pos must be finite"),
        ("vespo", {"is_clip": 0.0}, r"is_clip=0 is out of range"),
    ],
)
def test_out_of_range_parameters(name, params, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(name, **params)


def test_parameters_are_checked_before_tensors():
    # a bad parameter is reported even when the tensors are also bad
    with pytest.raises(ValueError, match="k_neg"):
        compute_policy_loss("vespo", log_prob=None, old_log_prob=None, advantages=None, response_mask=None, k_neg=0.0)


@pytest.mark.parametrize(
    "over, pattern",
    [
        ({"old_log_prob": torch.zeros(B, T + 1)}, r"old_log_prob has shape \(2, 4\) but log_prob has shape \(2, 3\)"),
        ({"response_mask": torch.ones(B + 1, T)}, r"response_mask has shape \(3, 3\) but log_prob"),
        ({"log_prob": torch.zeros(T)}, r"log_prob must have shape \[batch, response_length\], got \(3,\)"),
        ({"log_prob": [[0.0] * T] * B}, r"log_prob must be a torch.Tensor, got list"),
        ({"advantages": torch.zeros(B + 1)}, r"advantages must have shape \[2, 3\] \(per token\) or \[2\]"),
        ({"advantages": torch.zeros(B, T, 1)}, r"advantages must have shape .* got \(2, 3, 1\)"),
        ({"advantages": 1.0}, r"advantages must be a torch.Tensor"),
    ],
)
def test_shape_errors(over, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(**over)


def test_mask_without_valid_token():
    with pytest.raises(ValueError, match="response_mask has no valid token"):
        call(response_mask=torch.zeros(B, T, dtype=torch.bool))


@pytest.mark.parametrize("key", ["log_prob", "old_log_prob", "advantages"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_on_valid_tokens(key, bad):
    x = inputs()[key].detach().clone()
    x.view(-1)[0] = bad  # position (0, 0) is valid
    with pytest.raises(ValueError, match=rf"{key} has NaN or Inf on valid \(unmasked\) tokens"):
        call(**{key: x})


def test_nan_on_masked_tokens_is_fine():
    x = inputs()["log_prob"].detach().clone()
    x[0, 2] = float("nan")  # masked
    assert torch.isfinite(call(log_prob=x).loss)


def test_bad_aggregation_mode():
    with pytest.raises(ValueError, match=r"unknown loss_agg_mode 'mean'; use one of token-mean"):
        call(loss_agg_mode="mean")
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'seq-mean'"):
        aggregate_loss(torch.zeros(B, T), torch.ones(B, T), "seq-mean")


@pytest.mark.parametrize("key", ["global_num_tokens", "global_num_seqs"])
def test_global_counts_must_be_positive(key):
    with pytest.raises(ValueError, match=rf"{key} must be positive, got 0"):
        call(**{key: 0})


def test_correction_without_rollout_log_prob():
    with pytest.raises(ValueError, match=r"correction='token_tis' needs rollout_log_prob"):
        call(correction="token_tis")


def test_correction_errors():
    mu = -torch.rand(B, T)
    with pytest.raises(ValueError, match=r"unknown correction 'tis'; use one of none, token_tis"):
        call(correction="tis", rollout_log_prob=mu)
    with pytest.raises(ValueError, match="give either rollout_is_weights or rollout_log_prob, not both"):
        call(correction="token_tis", rollout_log_prob=mu, rollout_is_weights=torch.ones(B, T))
    with pytest.raises(ValueError, match="correction_high/correction_low need correction= and rollout_log_prob="):
        call(correction_high=2.0)
    with pytest.raises(ValueError, match="correction_high must be a positive number"):
        call(correction="token_tis", rollout_log_prob=mu, correction_high=0.0)
    with pytest.raises(ValueError, match=r"correction_low must satisfy 0 <= low < high=2"):
        call(correction="token_mis", rollout_log_prob=mu, correction_low=3.0)
    with pytest.raises(ValueError, match=r"rollout_log_prob has shape \(2, 4\) but log_prob"):
        call(correction="token_tis", rollout_log_prob=torch.zeros(B, T + 1))
    bad = mu.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="rollout_log_prob has NaN or Inf on valid"):
        call(correction="token_tis", rollout_log_prob=bad)
    with pytest.raises(ValueError, match="unknown correction 'x'"):
        rollout_correction(mu, mu, torch.ones(B, T), "x")


def test_correction_that_rejects_everything():
    old = torch.zeros(B, T)
    mu = torch.full((B, T), -5.0)  # r = e^5 > 2 on every token
    with pytest.raises(ValueError, match="correction 'token_mis' rejected every token of the batch"):
        call(old_log_prob=old, correction="token_mis", rollout_log_prob=mu)


@pytest.mark.parametrize(
    "weights, pattern",
    [
        (torch.ones(B, T + 1), r"rollout_is_weights must have shape \[2, 3\] \(per token\) or \[2\]"),
        (torch.tensor([[1.0, -0.5, 1.0], [1.0, 1.0, 1.0]]), "rollout_is_weights must be finite and non-negative"),
        (torch.tensor([[float("nan"), 1.0, 1.0], [1.0, 1.0, 1.0]]), "finite and non-negative on valid tokens"),
        (torch.tensor([1.0, float("inf")]), "rollout_is_weights must be finite and non-negative"),
        ([1.0, 1.0], "rollout_is_weights must be a torch.Tensor"),
    ],
)
def test_rollout_weight_errors(weights, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(rollout_is_weights=weights)


def test_get_loss_spec_unknown():
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'"):
        get_loss_spec("ppo")
