"""VespoGRPOTrainer: vespo's losses inside TRL's GRPOTrainer, on a tiny random Llama on CPU.

CI installs trl==1.16.0 with `pip install -c constraints.txt --no-deps -r requirements-integrations.txt`.
"""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch

pytest.importorskip("trl", reason="trl is installed by requirements-integrations.txt")

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

import vespo.integrations.trl as vtrl
from vespo.integrations.trl import VespoGRPOConfig, VespoGRPOTrainer

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "one", "two", "three", "four", "five", "plus", "minus", "is"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_model(tok: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(config)


def dataset() -> Dataset:
    prompts = [
        "one plus two is",
        "three minus one is",
        "a b c",
        "four plus four is",
        "d e f",
        "five minus two is",
        "g h a",
        "two plus three is",
    ]
    return Dataset.from_list([{"prompt": p} for p in prompts])


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def common_args(tmp_path, **kw) -> dict:
    args = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 8,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
        "bf16": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    args.update(kw)
    return args


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def test_training_steps_with_staleness_change_params_and_log_diagnostics(tmp_path, tok):
    model = make_model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # steps_per_generation=2 > gradient_accumulation_steps=1: the second step trains on a batch
    # generated before the first update, so TRL fills old_per_token_logps and W != 1.
    args = VespoGRPOConfig(
        **common_args(tmp_path, steps_per_generation=2, max_steps=2, learning_rate=3e-2),
        vespo_loss="vespo",
        vespo_loss_params={"k_pos": 2.0, "lambda_pos": 3.0},
    )
    trainer = VespoGRPOTrainer(
        model=model, reward_funcs=length_reward, args=args, train_dataset=dataset(), processing_class=tok
    )
    assert trainer.vespo_loss_params["k_neg"] == 3.0  # from GRPOConfig.vespo_k_neg
    trainer.train()
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no parameter changed"
    logs = [entry for entry in trainer.state.log_history if "vespo/phi_mean" in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in ("vespo/phi_mean", "vespo/is_ess", "vespo/is_log_w_mean", "vespo/phi_frac_below_0.01", "entropy"):
            assert key in entry and math.isfinite(entry[key]), key
    # step 1 is on-policy (W = 1 up to float noise); step 2 is one update stale
    assert logs[0]["vespo/is_abs_log_w_mean"] < 1e-3
    assert logs[1]["vespo/is_abs_log_w_mean"] > 10 * max(logs[0]["vespo/is_abs_log_w_mean"], 1e-6)


def _prepared_inputs(trainer, tok, seed: int = 0) -> dict:
    """A batch shaped like TRL's _generate_and_score_completions output, off-policy, with vLLM-style IS."""
    g = torch.Generator().manual_seed(seed)
    b, p, c = 6, 4, 7
    prompt_ids = torch.randint(3, len(tok), (b, p), generator=g)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[0, 0] = 0  # left padding
    prompt_ids[0, 0] = tok.pad_token_id
    lengths = torch.tensor([7, 3, 5, 1, 7, 4])
    completion_mask = (torch.arange(c)[None, :] < lengths[:, None]).long()
    completion_ids = torch.where(
        completion_mask.bool(), torch.randint(3, len(tok), (b, c), generator=g), torch.full((b, c), tok.pad_token_id)
    )
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), c
        )
    old = logps + 0.15 * torch.randn(b, c, generator=g)  # a stale behaviour policy
    is_ratio = torch.exp(0.2 * torch.randn(b, c, generator=g)) * completion_mask + (1 - completion_mask)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(b, generator=g),
        "old_per_token_logps": old,
        "importance_sampling_ratio": is_ratio,
        "num_items_in_batch": completion_mask.sum().float(),
    }


def _loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad()
    if not hasattr(trainer, "current_gradient_accumulation_steps"):
        trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("ours", "trl_kwargs"),
    [
        ({"vespo_loss": "vespo"}, {"loss_type": "vespo"}),
        # our PPO clip without dual clip is TRL's dapo (token-level clip, global token mean)
        ({"vespo_loss": "grpo", "vespo_loss_params": {"clip_c": 1e9}}, {"loss_type": "dapo", "epsilon_high": 0.28}),
    ],
)
def test_one_batch_matches_trl_builtin(tmp_path, tok, ours, trl_kwargs):
    model = make_model(tok, seed=1)
    base = common_args(tmp_path, steps_per_generation=2, gradient_accumulation_steps=2, max_steps=1)
    builtin = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=GRPOConfig(**base, **trl_kwargs),
        train_dataset=dataset(),
        processing_class=tok,
    )
    ours_args = VespoGRPOConfig(**base, **ours, epsilon_high=trl_kwargs.get("epsilon_high"))
    adapter = VespoGRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=length_reward,
        args=ours_args,
        train_dataset=dataset(),
        processing_class=tok,
    )
    inputs = _prepared_inputs(builtin, tok)
    if trl_kwargs["loss_type"] != "vespo":  # TRL applies the vLLM ratio to dapo only when use_vllm=True
        del inputs["importance_sampling_ratio"]
    for trainer in (builtin, adapter):
        trainer.current_gradient_accumulation_steps = 2
    loss_ref, grads_ref = _loss_and_grads(builtin, inputs)
    loss, grads = _loss_and_grads(adapter, inputs)
    assert loss_ref.abs() > 1e-4
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    logged = adapter._metrics["train"]
    assert logged["vespo/phi_mean"] and logged["vespo/is_abs_log_w_mean"][0] > 0
    if ours["vespo_loss"] == "vespo":
        assert logged["vespo/is_log_w_mismatch_abs_mean"][0] > 0
        assert logged["vespo/phi_mean"][0] == pytest.approx(
            builtin._metrics["train"]["vespo/phi_seq_mean"][0], rel=1e-5
        )


def test_aggregation_modes_follow_trl_normalisers(tmp_path, tok):
    base = common_args(tmp_path, steps_per_generation=2, gradient_accumulation_steps=2, max_steps=1)
    trainer = VespoGRPOTrainer(
        model=make_model(tok, seed=2),
        reward_funcs=length_reward,
        args=VespoGRPOConfig(**base, vespo_loss="reinforce"),
        train_dataset=dataset(),
        processing_class=tok,
    )
    inputs = _prepared_inputs(trainer, tok, seed=3)
    trainer.current_gradient_accumulation_steps = 2
    mask = inputs["completion_mask"].float()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            mask.size(1),
        )
    per_token = -inputs["advantages"][:, None] * logps * inputs["importance_sampling_ratio"] * mask
    b = mask.size(0)
    expected = {
        # dapo: tokens of the generation batch / steps_per_generation * accumulation steps
        "token-mean": per_token.sum() / (mask.sum() * 2 / 2),
        "seq-mean-token-mean": (per_token.sum(-1) / mask.sum(-1)).mean() / 2,  # grpo
        "token-sum-norm": per_token.sum() / (b * 8) / 2,  # dr_grpo, max_completion_length=8
        "seq-mean-token-sum": per_token.sum(-1).mean() / 2,
        "token-sum": per_token.sum(),
    }
    trainer.model.train()
    for mode, value in expected.items():
        trainer.vespo_loss_agg_mode = mode
        with torch.no_grad():
            loss = trainer._compute_loss(trainer.model, inputs)
        torch.testing.assert_close(loss, value, rtol=1e-5, atol=1e-6, msg=mode)


def test_fully_masked_micro_batch_gives_zero_loss_and_grad(tmp_path, tok):
    base = common_args(tmp_path, max_steps=1)
    trainer = VespoGRPOTrainer(
        model=make_model(tok, seed=4),
        reward_funcs=length_reward,
        args=VespoGRPOConfig(**base),
        train_dataset=dataset(),
        processing_class=tok,
    )
    inputs = _prepared_inputs(trainer, tok, seed=5)
    inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
    loss, grads = _loss_and_grads(trainer, inputs)
    assert loss.item() == 0.0 and all((g == 0).all() for g in grads.values())
    assert math.isnan(trainer._metrics["train"]["vespo/phi_mean"][-1])


def _rows(inputs: dict, sl: slice) -> dict:
    return {k: (v[sl] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in inputs.items()}


def test_vespo_adaptive_statistics_span_the_accumulation_window(tmp_path, tok):
    base = common_args(tmp_path, steps_per_generation=2, gradient_accumulation_steps=2, max_steps=1)
    trainer = VespoGRPOTrainer(
        model=make_model(tok, seed=6),
        reward_funcs=length_reward,
        args=VespoGRPOConfig(**base, vespo_loss="vespo_adaptive"),
        train_dataset=dataset(),
        processing_class=tok,
    )
    inputs = _prepared_inputs(trainer, tok, seed=7)
    inputs["old_per_token_logps"] = inputs["old_per_token_logps"] + 0.3 * torch.randn(
        inputs["old_per_token_logps"].shape, generator=torch.Generator().manual_seed(8)
    )  # staler
    halves = [_rows(inputs, slice(0, 3)), _rows(inputs, slice(3, 6))]
    trainer.current_gradient_accumulation_steps = 2

    # reference: the whole window in one call (its own statistics are the window's)
    trainer._buffered_inputs = None
    with pytest.warns(UserWarning, match="own statistics"):
        loss_ref, grads_ref = _loss_and_grads(trainer, inputs)
    alpha = trainer._metrics["train"]["vespo/vespo_adaptive_alpha_pos"][-1]
    assert alpha < 1.0  # the adaptation is active

    # the same window as two accumulation steps: the pre-pass gives both the window's statistics
    trainer._buffered_inputs = halves
    trainer._adaptive_window = None
    trainer.model.zero_grad()
    total = 0.0
    for step, half in enumerate(halves):
        trainer._step = step
        loss = trainer._compute_loss(trainer.model, half)
        loss.backward()
        total = total + loss.detach()
        assert trainer._metrics["train"]["vespo/vespo_adaptive_alpha_pos"][-1] == pytest.approx(alpha, rel=1e-6)
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(total, loss_ref, rtol=1e-5, atol=1e-7)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)

    # without the window's statistics each half tempers by itself, and the sum differs
    trainer._buffered_inputs = None
    with torch.no_grad():
        naive = sum(trainer._compute_loss(trainer.model, half) for half in halves)
    assert naive.item() != pytest.approx(loss_ref.item(), rel=1e-3)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown policy loss 'vesp'"):
        VespoGRPOConfig(**common_args(tmp_path), vespo_loss="vesp")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        VespoGRPOConfig(**common_args(tmp_path), vespo_loss_agg_mode="mean")
    args = VespoGRPOConfig(**common_args(tmp_path), vespo_loss="sapo", vespo_loss_params='{"tau_neg": 1.2}')
    assert vtrl.loss_params("sapo", args) == {"tau_pos": 1.0, "tau_neg": 1.2}
    adaptive = VespoGRPOConfig(**common_args(tmp_path), vespo_loss="vespo_adaptive", vespo_k_neg=4.0)
    assert vtrl.loss_params("vespo_adaptive", adaptive)["k_neg"] == 4.0  # TRL's vespo_* fields apply
    with pytest.raises(ValueError, match="no parameter 'tau'"):
        vtrl.loss_params("sapo", VespoGRPOConfig(**common_args(tmp_path), vespo_loss_params={"tau": 1.0}))


def test_incompatible_trl_fails_at_import(monkeypatch):
    def old_signature(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None):
        raise AssertionError

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", old_signature)
    with pytest.raises(ImportError, match=r"trl>=1\.16,<1\.17 \(tested: 1\.16\.0\).*compute_entropy"):
        importlib.reload(vtrl)
    monkeypatch.undo()
    importlib.reload(vtrl)
