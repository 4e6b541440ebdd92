"""Configuration: defaults, overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from vespo.train.config import ConfigError, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]


def test_packaged_default_equals_code_defaults():
    """configs/default.yaml documents the defaults; they must not drift apart."""
    assert load_config(REPO / "configs" / "default.yaml").to_dict() == load_config(None).to_dict()


@pytest.mark.parametrize("name", ["default.yaml", "smollm2.yaml", "paper_qwen3_dapo.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.algorithm.loss == "vespo"


def test_paper_template_numbers():
    cfg = load_config(REPO / "configs" / "paper_qwen3_dapo.yaml")
    assert cfg.algorithm.staleness == 8 and cfg.run.total_steps == 1500
    assert cfg.optim.lr == 1e-6 and cfg.sampling.group_size == 8
    assert cfg.rollout_prompts == 2048  # gbs = N x mbs = 8 x 256 prompts


def test_overrides_are_typed_and_nested():
    tree = parse_overrides(["a.b=1", "a.c=true", "d=[1, 2]", "e={x: 1}", "f=text"])
    assert tree == {"a": {"b": 1, "c": True}, "d": [1, 2], "e": {"x": 1}, "f": "text"}
    cfg = load_config(None, ["algorithm.loss=grpo", "algorithm.loss_params={eps_high: 0.3}"])
    assert cfg.algorithm.loss == "grpo" and cfg.algorithm.loss_params == {"eps_high": 0.3}


def test_task_params_override_replaces_the_mapping():
    cfg = load_config(None, ["task.params={min_terms: 2, max_terms: 2}"])
    assert cfg.task.params == {"min_terms": 2, "max_terms": 2}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.lossx=1"], "unknown config key 'algorithm.lossx'"),
        (["nosection.key=1"], "unknown config key 'nosection'"),
        (["algorithm.loss=foo"], "unknown policy loss 'foo'"),
        (["algorithm.loss_params={lambda_pos: 0}"], "lambda_pos"),
        (["algorithm.loss=grpo", "algorithm.loss_params={k_pos: 2}"], "has no parameter 'k_pos'"),
        (["algorithm.staleness=0"], "algorithm.staleness"),
        (["optim.lr=-1"], "optim.lr"),
        (["model.kind=pretrained"], "needs model.name_or_path"),
        (["model.hidden_size=30", "model.num_heads=4"], "not divisible"),
        (["algorithm.correction=token_tis", "algorithm.old_log_prob=sampler"], "old_log_prob=recompute"),
        (["algorithm.loss_agg_mode=mean"], "loss_agg_mode"),
        (["task.kind=verl_file"], "task.train_path"),
        (["sampling.top_p=1.5"], "sampling.top_p"),
        (["justakey"], "key=value"),
    ],
)
def test_bad_values_raise_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


@pytest.mark.parametrize("name", ["smollm2.yaml", "paper_qwen3_dapo.yaml"])
def test_pretrained_configs_skip_the_warm_up(name):
    assert load_config(REPO / "configs" / name).warmup.steps == 0


def test_eval_fraction_reaches_the_task_and_is_validated():
    cfg = load_config(None, ["task.eval_fraction=0.2"])
    assert cfg.task.spec()["eval_fraction"] == 0.2
    with pytest.raises(ConfigError):
        load_config(None, ["task.eval_fraction=1.5"])


def test_exponent_floats_are_numbers_in_overrides_and_files(tmp_path):
    cfg = load_config(None, ["algorithm.loss_params={lambda_pos: 1e-1}", "optim.lr=1e-4"])
    assert cfg.algorithm.loss_params == {"lambda_pos": 0.1} and cfg.optim.lr == 1e-4
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  loss: vespo\n  loss_params: {k_pos: 2, lambda_pos: 3e0}\n")
    assert load_config(path).algorithm.loss_params == {"k_pos": 2, "lambda_pos": 3.0}
    assert parse_overrides(["task.name=x1e5"])["task"]["name"] == "x1e5"


# ------------------------------------------------------------------ reliability (issue 12)
def test_binary_config_file_names_the_file(tmp_path):
    """Defect 8: a binary config gave a bare 'utf-8' codec error without the file."""
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "UTF-8" in str(info.value) and "\n" not in str(info.value)


def test_config_path_that_is_a_directory_says_so(tmp_path):
    """Defect 8: a directory given as config file was reported as 'does not exist'."""
    with pytest.raises(ConfigError, match="is a directory") as info:
        load_config(tmp_path)
    assert "does not exist" not in str(info.value)


def test_dotted_override_then_mapping_does_not_silently_drop_the_first():
    """Defect 9: 'loss_params.k_pos=3' then 'loss_params={k_neg: 2}' used to drop k_pos."""
    with pytest.raises(ConfigError, match="would erase the earlier override 'algorithm.loss_params.k_pos=3'"):
        load_config(None, ["algorithm.loss_params.k_pos=3", "algorithm.loss_params={k_neg: 2}"])
    with pytest.raises(ConfigError, match="would erase"):  # the same through a section mapping
        load_config(None, ["algorithm.loss_params.k_pos=3", "algorithm={loss_params: {k_neg: 2}}"])


def test_mapping_then_dotted_override_merges():
    cfg = load_config(None, ["algorithm.loss_params={k_neg: 2}", "algorithm.loss_params.k_pos=3"])
    assert cfg.algorithm.loss_params == {"k_neg": 2, "k_pos": 3}


def test_dotted_override_keeps_the_files_other_entries(tmp_path):
    """A dotted key sets one entry of a mapping from the file; it used to replace the whole mapping."""
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  loss_params: {k_neg: 2, lambda_neg: 3}\n")
    assert load_config(path, ["algorithm.loss_params.k_pos=3"]).algorithm.loss_params == {
        "k_neg": 2,
        "lambda_neg": 3,
        "k_pos": 3,
    }
    # a whole mapping replaces the file's mapping (documented: the mapping is the value)
    assert load_config(path, ["algorithm.loss_params={k_pos: 3}"]).algorithm.loss_params == {"k_pos": 3}


def test_same_key_twice_last_wins_and_section_mappings_merge():
    cfg = load_config(None, ["optim.lr=1e-3", "optim.lr=5e-4", "optim={weight_decay: 0.0}"])
    assert cfg.optim.lr == 5e-4 and cfg.optim.weight_decay == 0.0
    cfg = load_config(None, ["optim.lr=1e-3", "optim={lr: 2e-3}"])  # a section mapping sets its keys one by one
    assert cfg.optim.lr == 2e-3


def test_dotted_key_into_a_scalar_is_refused():
    with pytest.raises(ConfigError, match="conflicts"):
        load_config(None, ["algorithm.loss=vespo", "algorithm.loss.k=1"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.overlong=truncate"], "task.overlong"),
        (["async.worker_resources={node_b: -1}"], "async.worker_resources"),
        (["async.worker_resources={node_b: x}"], "async.worker_resources"),
        (["async.worker_resources={CPU: 1}"], "worker_cpus"),
        (["run.out_dir="], "run.out_dir"),
        (["checkpoint.verify=maybe"], "checkpoint.verify"),
    ],
)
def test_new_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_new_keys_defaults():
    cfg = load_config(None)
    assert cfg.task.overlong == "error" and cfg.async_.worker_resources == {} and cfg.checkpoint.verify is True
    assert load_config(None, ["async.worker_resources={node_b: 1}"]).async_.worker_resources == {"node_b": 1.0}
