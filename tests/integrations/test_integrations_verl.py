"""vespo's losses registered in verl's policy-loss registry (CPU, verl 0.9.1 loss API only).

CI installs verl with `pip install -c constraints.txt --no-deps -r requirements-integrations.txt`.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is installed by requirements-integrations.txt")

from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos
from verl.workers.config import ActorConfig

import vespo.integrations.verl as vverl

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
OUR_NAMES = (
    "vespo",
    "vespo_vespo",
    "vespo_grpo",
    "vespo_gspo",
    "vespo_sapo",
    "vespo_cispo",
    "vespo_gmpo",
    "vespo_topr",
    "vespo_seq_clip",
    "vespo_reinforce",
    "vespo_vespo_adaptive",
)


def make_batch(seed: int = 0, b: int = 8, t: int = 12, dtype: torch.dtype = torch.float64, extreme: bool = True):
    """Right-padded verl-style batch: per-token advantages (0 on padding), mixed staleness."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]
    old = -torch.rand(b, t, generator=g, dtype=dtype) * 3.0
    drift = torch.randn(b, t, generator=g, dtype=dtype) * 0.08
    if extreme:
        drift[1, :3] = 50.0  # W = e^20 after clamping: phi ~ 0
        drift[2, :3] = -50.0  # W = e^-20: phi ~ 0
        drift[3, 0] = 50.0
        drift[3, 1] = -50.0  # cancels: a moderate W from huge token ratios
    log_prob = (old + drift).clone().requires_grad_(True)
    seq_adv = torch.randn(b, generator=g, dtype=dtype)
    seq_adv[4] = 0.0  # A = 0 takes the positive branch
    advantages = seq_adv[:, None] * mask.to(dtype)
    is_w = torch.exp(torch.randn(b, t, generator=g, dtype=dtype) * 0.3)
    is_w[5, 0] = 0.0  # a rejected token (masked IS)
    is_w = torch.where(mask, is_w, torch.ones((), dtype=dtype))
    return old, log_prob, advantages, mask, is_w


def recipe_vespo_loss(
    old,
    log_prob,
    advantages,
    mask,
    k_pos=2.0,
    lambda_pos=3.0,
    k_neg=3.0,
    lambda_neg=2.0,
    rollout_is_weights=None,
    num_tokens=None,
    dp_size=1,
):
    """The released recipe's formula, written from method.md §2.7 steps 1-7 (token-mean)."""
    m = mask.to(log_prob.dtype)
    log_ratio = torch.clamp(log_prob - old, -20.0, 20.0)  # 1
    seq_log_ratio = (log_ratio * m).sum(-1)
    if rollout_is_weights is not None:  # 2
        log_tis = torch.clamp(torch.log(rollout_is_weights.clamp(min=1e-8)), -20.0, 20.0)
        seq_log_ratio = seq_log_ratio + (log_tis * m).sum(-1)
    w_seq = torch.exp(torch.clamp(seq_log_ratio, -20.0, 20.0)).detach()  # 3
    seq_adv = advantages[:, 0]  # 4
    pos = seq_adv >= 0
    k = torch.where(pos, torch.tensor(k_pos, dtype=w_seq.dtype), torch.tensor(k_neg, dtype=w_seq.dtype))
    lam = torch.where(pos, torch.tensor(lambda_pos, dtype=w_seq.dtype), torch.tensor(lambda_neg, dtype=w_seq.dtype))
    lam = lam.clamp(min=1e-4)  # 5
    log_w = torch.log(w_seq.clamp(min=1e-8))
    phi = torch.exp(lam + k * log_w - lam * w_seq).detach().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    loss_mat = -phi[:, None] * advantages * log_prob  # 6
    denom = m.sum() if num_tokens is None else num_tokens  # 7: token-mean
    return (loss_mat * m).sum() / denom * dp_size, phi


def actor_config(**kwargs) -> ActorConfig:
    base = {"strategy": "fsdp", "rollout_n": 1, "ppo_micro_batch_size_per_gpu": 1}
    base.update(kwargs)
    return ActorConfig(**base)


def test_all_losses_registered_with_verl_signature():
    registry = core_algos.POLICY_LOSS_REGISTRY
    for name in OUR_NAMES:
        assert name in registry, name
        assert core_algos.get_policy_loss_fn(name) is registry[name]
    assert "vanilla" in registry and not hasattr(registry["vanilla"], "_vespo_loss_name")
    assert vverl.REGISTERED["vespo"] == "vespo"


@pytest.mark.parametrize("with_is", [False, True])
def test_vespo_matches_released_recipe(with_is):
    old, log_prob, adv, mask, is_w = make_batch(seed=1)
    is_w = is_w if with_is else None
    ref, phi = recipe_vespo_loss(old, log_prob, adv, mask, rollout_is_weights=is_w)
    assert (phi > 1e-3).sum() >= 3 and phi[1] < 1e-12 and phi[2] < 1e-12  # both regimes are exercised
    (g_ref,) = torch.autograd.grad(ref, log_prob)
    fn = core_algos.get_policy_loss_fn("vespo")
    loss, metrics = fn(
        old_log_prob=old,
        log_prob=log_prob,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode="token-mean",
        config=None,
        rollout_is_weights=is_w,
    )
    (g,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)
    assert metrics["actor/vespo/phi_mean"] == pytest.approx(phi.mean().item(), rel=1e-6, abs=1e-9)


def _config_forms(params: dict, info: dict):
    """The same actor settings as a verl dataclass, an OmegaConf DictConfig and a dict."""
    dc = actor_config(policy_loss=vverl.VespoPolicyLossConfig(loss_mode="vespo", vespo=dict(params)))
    dc.global_batch_info.update(info)
    plain = {"policy_loss": {"loss_mode": "vespo", "vespo": dict(params)}, "global_batch_info": dict(info)}
    return {"dataclass": dc, "dictconfig": OmegaConf.create(plain), "dict": plain}


@pytest.mark.parametrize("form", ["dataclass", "dictconfig", "dict"])
def test_vespo_reads_recipe_config_keys_and_global_batch_info(form):
    params = {"k_pos": 2.5, "lambda_pos": 2.0, "k_neg": 4.0, "lambda_neg": 2.5}
    info = {"dp_size": 2, "batch_num_tokens": 150, "global_batch_size": 16, "loss_scale_factor": None}
    config = _config_forms(params, info)[form]
    old, log_prob, adv, mask, is_w = make_batch(seed=2)
    ref, _ = recipe_vespo_loss(old, log_prob, adv, mask, **params, rollout_is_weights=is_w, num_tokens=150, dp_size=2)
    loss, _ = core_algos.get_policy_loss_fn("vespo")(old, log_prob, adv, mask, "token-mean", config, is_w)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


def test_vespo_float32_and_defaults_match_recipe():
    old, log_prob, adv, mask, is_w = make_batch(seed=3, dtype=torch.float32)
    ref, _ = recipe_vespo_loss(old, log_prob, adv, mask, rollout_is_weights=is_w)
    loss, _ = core_algos.get_policy_loss_fn("vespo")(old, log_prob, adv, mask, "token-mean", actor_config(), is_w)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert vverl.loss_params("vespo", None) == vverl.loss_params("vespo", actor_config())
    assert {k: vverl.loss_params("vespo", None)[k] for k in ("k_pos", "lambda_pos", "k_neg", "lambda_neg")} == {
        "k_pos": 2.0,
        "lambda_pos": 3.0,
        "k_neg": 3.0,
        "lambda_neg": 2.0,
    }


def _vanilla_configs(info: dict):
    kw = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}
    dc = actor_config(**kw)
    dc.global_batch_info.update(info)
    dcfg = OmegaConf.create({**kw, "policy_loss": {"loss_mode": "vanilla"}, "global_batch_info": dict(info)})
    return [dc, dcfg]


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("with_is", [False, True])
def test_vespo_grpo_equals_verl_vanilla(agg, with_is):
    old, log_prob, adv, mask, is_w = make_batch(seed=4)
    is_w = is_w if with_is else None
    info = {"dp_size": 2, "batch_num_tokens": 123, "global_batch_size": 20, "loss_scale_factor": 16}
    for config in _vanilla_configs(info):
        ref, ref_m = core_algos.get_policy_loss_fn("vanilla")(old, log_prob, adv, mask, agg, config, is_w)
        (g_ref,) = torch.autograd.grad(ref, log_prob)
        loss, metrics = core_algos.get_policy_loss_fn("vespo_grpo")(old, log_prob, adv, mask, agg, config, is_w)
        (g,) = torch.autograd.grad(loss, log_prob)
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)
        for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
            assert metrics[key] == pytest.approx(ref_m[key], rel=1e-6, abs=1e-9), key
    assert vverl.loss_params("grpo", _vanilla_configs({})[0]) == {"eps_low": 0.2, "eps_high": 0.28, "clip_c": 3.0}


def test_without_global_batch_info_uses_local_counts():
    old, log_prob, adv, mask, _ = make_batch(seed=5)
    config = OmegaConf.create(
        {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0, "global_batch_info": {}}
    )
    ref, _ = core_algos.get_policy_loss_fn("vanilla")(old, log_prob, adv, mask, "seq-mean-token-mean", config, None)
    loss, _ = core_algos.get_policy_loss_fn("vespo_grpo")(old, log_prob, adv, mask, "seq-mean-token-mean", config, None)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", OUR_NAMES)
def test_every_loss_runs_and_reports_fixed_metric_keys(name):
    fn = core_algos.get_policy_loss_fn(name)
    config = actor_config()
    keys = None
    for seed, flip in ((6, False), (7, True)):
        old, log_prob, adv, mask, is_w = make_batch(seed=seed)
        if flip:
            adv = adv.abs()  # only positive advantages: the per-sign keys must not change the key set
        loss, metrics = fn(old, log_prob, adv, mask, "token-mean", config, is_w)
        assert torch.isfinite(loss) and loss.requires_grad
        loss.backward()
        assert torch.isfinite(log_prob.grad).all()
        for key in (
            "actor/pg_clipfrac",
            "actor/pg_clipfrac_lower",
            "actor/ppo_kl",
            "actor/vespo/phi_mean",
            "actor/vespo/is_ess",
            "actor/vespo/is_log_w_mean",
            "actor/vespo/is_log_w_mismatch_mean",
        ):
            assert key in metrics, (name, key)
        assert all(isinstance(v, float) for v in metrics.values())
        assert keys is None or set(metrics) == keys
        keys = set(metrics)


def test_bad_parameters_fail_with_a_clear_message():
    old, log_prob, adv, mask, _ = make_batch(seed=8)
    config = {"policy_loss": {"vespo": {"k_pos": 2.0, "kpos": 1.0}}}
    with pytest.raises(ValueError, match="no parameter 'kpos'"):
        core_algos.get_policy_loss_fn("vespo")(old, log_prob, adv, mask, "token-mean", config, None)
    config = {"policy_loss": {"vespo_sapo": {"tau_pos": -1.0}}}
    with pytest.raises(ValueError, match="tau_pos"):
        core_algos.get_policy_loss_fn("vespo_sapo")(old, log_prob, adv, mask, "token-mean", config, None)


def test_policy_loss_config_accepts_recipe_keys_through_omegaconf():
    structured = OmegaConf.structured(vverl.VespoPolicyLossConfig)
    merged = OmegaConf.merge(structured, {"loss_mode": "vespo", "vespo": {"k_pos": 1.5}, "vespo_grpo": {"clip_c": 5}})
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, vverl.VespoPolicyLossConfig) and obj.vespo == {"k_pos": 1.5}
    assert vverl.loss_params("vespo", actor_config(policy_loss=obj))["k_pos"] == 1.5
    assert vverl.loss_params("grpo", actor_config(policy_loss=obj))["clip_c"] == 5.0


def test_builtin_vespo_is_kept_unless_replacement_is_requested(monkeypatch):
    registry = core_algos.POLICY_LOSS_REGISTRY
    ours = registry["vespo"]

    def builtin(*args, **kwargs):  # stands in for a future verl-native 'vespo'
        raise AssertionError

    try:
        registry["vespo"] = builtin
        with pytest.warns(UserWarning, match="vespo_vespo"):
            vverl.register_verl_losses()
        assert registry["vespo"] is builtin and vverl.REGISTERED["vespo"] == "vespo"
        monkeypatch.setenv(vverl.REPLACE_BUILTIN_ENV, "1")
        vverl.register_verl_losses()
        assert getattr(registry["vespo"], "_vespo_loss_name", None) == "vespo"
    finally:
        registry["vespo"] = ours


def test_incompatible_verl_fails_at_import(monkeypatch):
    def old_agg_loss(loss_mat, loss_mask, loss_agg_mode):  # a pre-0.6 style agg_loss
        raise AssertionError

    monkeypatch.setattr(core_algos, "agg_loss", old_agg_loss)
    with pytest.raises(ImportError, match=r"verl>=0\.9,<0\.10 \(tested: 0\.9\.1\).*dp_size"):
        importlib.reload(vverl)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tested version must import without a warning
        importlib.reload(vverl)


def test_verl_external_modules_env_registers_in_a_fresh_process():
    """The worker-side mechanism: verl/__init__.py imports VERL_USE_EXTERNAL_MODULES on `import verl`."""
    code = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R\n"
        "assert 'vespo' in R and 'vespo_grpo' in R, sorted(R)\n"
    )
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "vespo.integrations.verl"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ---------------------------------------------------------------------------------------------
# vespo_adaptive: batch statistics all-reduced across data-parallel ranks (2-process gloo, CPU)
# ---------------------------------------------------------------------------------------------

DP_WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def batch():
    g = torch.Generator().manual_seed(0)
    b, t = 16, 24
    lengths = torch.randint(4, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    lp = old + 0.45 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)[:, None] * mask
    return old, lp, adv, mask


def worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from verl.trainer.ppo import core_algos
    import vespo.integrations.verl  # noqa: F401  (registers the losses)
    from vespo.losses import (compute_policy_loss, merge_adaptive_stats, vespo_adaptive_batch_stats,
                              vespo_adaptive_seq_inputs)

    old, lp, adv, mask = batch()
    sl = slice(8 * rank, 8 * rank + 8)  # this rank's half
    fn = core_algos.get_policy_loss_fn("vespo_vespo_adaptive")
    x = lp[sl].clone().requires_grad_()
    loss, metrics = fn(old[sl], x, adv[sl], mask[sl], "token-mean", None, None)
    loss.backward()

    # reference, no communication: the statistics of the whole 16-sequence batch
    stats = vespo_adaptive_batch_stats(*vespo_adaptive_seq_inputs(
        log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask))
    y = lp[sl].clone().requires_grad_()
    ref = compute_policy_loss("vespo_adaptive", log_prob=y, old_log_prob=old[sl], advantages=adv[sl],
                              response_mask=mask[sl], batch_stats=stats)
    ref.loss.backward()
    full = compute_policy_loss("vespo_adaptive", log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask)
    local = compute_policy_loss("vespo_adaptive", log_prob=lp[sl], old_log_prob=old[sl], advantages=adv[sl],
                                response_mask=mask[sl])
    json.dump({
        "loss": loss.item(), "ref_loss": ref.loss.item(), "local_loss": local.loss.item(),
        "grad_err": (x.grad - y.grad).abs().max().item(), "grad_norm": y.grad.abs().sum().item(),
        "alpha_neg": metrics["actor/vespo/vespo_adaptive_alpha_neg"],
        "alpha_pos": metrics["actor/vespo/vespo_adaptive_alpha_pos"],
        "full_alpha_neg": full.metrics["vespo_adaptive/alpha_neg"],
        "full_alpha_pos": full.metrics["vespo_adaptive/alpha_pos"],
        "local_alpha_neg": local.metrics["vespo_adaptive/alpha_neg"],
    }, open(os.path.join(out_dir, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2, join=True)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vespo_adaptive_all_reduces_statistics_across_two_gloo_ranks(tmp_path):
    import json

    script = tmp_path / "dp_worker.py"
    script.write_text(DP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(vverl.ADAPTIVE_STATS_ENV, None)
    proc = subprocess.run(
        [sys.executable, str(script), str(_free_port()), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        # each rank's loss and gradient are those of its half under the whole batch's statistics
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-12, abs=1e-15)
        assert r["grad_err"] <= 1e-13 * max(1.0, r["grad_norm"])
        assert r["alpha_neg"] == pytest.approx(r["full_alpha_neg"], rel=1e-12)
        assert r["alpha_pos"] == pytest.approx(r["full_alpha_pos"], rel=1e-12)
    assert ranks[0]["full_alpha_neg"] < 1.0  # the adaptation is active on this batch
    # and the all-reduce matters: a rank alone would temper differently
    assert any(r["local_alpha_neg"] != pytest.approx(r["full_alpha_neg"], rel=1e-6) for r in ranks)
    assert any(r["local_loss"] != pytest.approx(r["ref_loss"], rel=1e-6) for r in ranks)


def test_vespo_adaptive_runs_single_process_with_local_statistics():
    from vespo.losses import compute_policy_loss

    fn = core_algos.get_policy_loss_fn("vespo_vespo_adaptive")
    old, log_prob, adv, mask, is_w = make_batch(seed=3, b=16, t=30, extreme=False)
    loss, metrics = fn(old, log_prob, adv, mask, "token-mean", actor_config(), is_w)
    ref = compute_policy_loss(
        "vespo_adaptive",
        log_prob=log_prob,
        old_log_prob=old,
        advantages=adv,
        response_mask=mask,
        rollout_is_weights=is_w,
    )
    assert loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
    assert metrics["actor/vespo/vespo_adaptive_alpha_pos"] == ref.metrics["vespo_adaptive/alpha_pos"]
