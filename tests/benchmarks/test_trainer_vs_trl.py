"""benchmarks/trainer_vs_trl.py: both models' configs are what the benchmark says it times."""

from __future__ import annotations

import pytest

from benchmarks import trainer_vs_trl as bench


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_config_puts_every_response_of_a_step_in_one_pass(tmp_path, model):
    spec = {"threads": 1, "staleness": 1, "steps": 4, "max_new_tokens": 64, "model": model, "prompts": 2}
    cfg = bench._config(spec, str(tmp_path))
    alg = cfg.algorithm
    assert cfg.model.kind == model and alg.mini_batch_prompts == 2 and alg.staleness == 1
    assert alg.old_log_prob == "sampler"  # N = 1: no pi_old forward, as TRL skips it
    assert cfg.run.total_steps == 5 and cfg.sampling.max_new_tokens == 64 and cfg.sampling.group_size == 8
    if model == "smollm2":  # the real-LM config: LoRA, one forward/backward per step, fp32 unless asked
        assert cfg.model.lora is not None and alg.micro_batch_size == 16
        assert cfg.model.autocast == "none" and cfg.sampling.sampler_dtype == "float32"
        bf16 = bench._config({**spec, "precision": "bf16"}, str(tmp_path))
        assert bf16.model.autocast == "bfloat16" and bf16.sampling.sampler_dtype == "bfloat16"
    else:
        assert cfg.model.lora is None and cfg.model.autocast == "none"


def test_engine_and_packing_options_reach_only_our_config(tmp_path):
    spec = {"threads": 1, "staleness": 1, "steps": 2, "max_new_tokens": 16, "model": "smollm2", "prompts": 1}
    cfg = bench._config({**spec, "engine": "vllm", "packing": True, "skip_zero_advantage": True}, str(tmp_path))
    assert cfg.sampling.engine == "vllm" and cfg.algorithm.packing and cfg.algorithm.skip_zero_advantage
    assert cfg.run.time_limit_minutes is None  # the config's time limit never cuts a timed window short
    plain = bench._config(spec, str(tmp_path))
    assert plain.sampling.engine == "hf" and not plain.algorithm.packing
    assert not plain.algorithm.skip_zero_advantage  # off unless asked for, although the config turns it on
    assert bench._children_cpu_s() >= 0.0


def test_init_from_reaches_both_sides_config(tmp_path):
    spec = {"threads": 1, "staleness": 1, "steps": 2, "max_new_tokens": 16, "model": "smollm2", "prompts": 1}
    weights = tmp_path / "best" / "model.safetensors"
    cfg = bench._config({**spec, "init_from": str(weights), "temperature": 0.7}, str(tmp_path))
    assert cfg.model.init_from == str(weights) and cfg.sampling.temperature == 0.7
    default = bench._config(spec, str(tmp_path))
    assert default.model.init_from is None and default.sampling.temperature == 1.0
