"""Typed, validated training configuration (pydantic), loaded from YAML plus ``key=value`` overrides.

An unknown key, a value of the wrong type or an impossible combination raises :class:`ConfigError`
with one line that names the key; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, reported as one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    out_dir: str = Field("runs/default", min_length=1)
    seed: int = 0
    total_steps: int = Field(160, ge=1, description="optimizer steps, the same for every N")
    time_limit_minutes: float | None = Field(
        None,
        gt=0,
        description="stop before a step that would end past this much wall clock (evals included, summed over "
        "resumes; a step is predicted to take as long as the longest so far); the final eval and checkpoint follow",
    )
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's choice)")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:1, ...")
    mode: Literal["sync", "async"] = "sync"


class LoraSettings(_Section):
    """LoRA adapters (peft) on the policy (docs/real_lm.md); the engines get merged weights."""

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="names of the linear layers to adapt, or all-linear",
    )


class ModelConfig(_Section):
    kind: Literal["tiny", "pretrained", "smollm2"] = "tiny"
    name_or_path: str | None = None
    gguf_file: str | None = None
    arch: Literal["llama", "qwen2", "qwen3_moe", "mixtral"] = "llama"
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=8)
    num_experts: int = Field(4, ge=2)
    num_experts_per_tok: int = Field(2, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    init_from: str | None = Field(None, description="start from these weights: a .safetensors file or a run directory")
    autocast: Literal["none", "bfloat16", "auto"] = Field(
        "none",
        description="trainer forward/backward under bf16 autocast; fp32 master weights and AdamW state "
        "(auto: bfloat16 where the device has native bf16 matmuls, else none)",
    )
    gradient_checkpointing: bool = Field(False, description="recompute layer activations in the backward pass")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters instead of all weights (needs peft)")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.autocast == "bfloat16" and self.dtype != "float32":
            raise ValueError(f"model.autocast={self.autocast} needs model.dtype=float32 (the fp32 master weights)")
        if self.kind == "pretrained" and not self.name_or_path:
            raise ValueError("model.kind=pretrained needs model.name_or_path (a hub id or local path)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("model.num_experts_per_tok cannot exceed model.num_experts")
        return self


class TaskConfig(_Section):
    kind: Literal["reasoning_gym", "verl_file"] = "reasoning_gym"
    name: str = "chain_sum"
    params: dict[str, Any] = Field(
        default_factory=lambda: {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}
    )
    prompt_style: Literal["plain", "instruct"] = "plain"
    train_path: str | None = None
    eval_path: str | None = None
    train_size: int = Field(20000, ge=1)
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of the question space (or of the train file) held out for eval"
    )
    reward_fn: str | None = Field(None, description="module:function overriding the task's scorer")
    reward_timeout_s: float = Field(5.0, gt=0)
    reward_workers: int = Field(2, ge=1, description="reward worker processes (user rewards run there, isolated)")
    reward_isolation: Literal["auto", "process", "inline"] = Field(
        "auto", description="auto: built-in pure-Python scorers in-process, everything else in worker processes"
    )
    overlong: Literal["error", "skip"] = Field(
        "error",
        description="a prompt whose tokens + sampling.max_new_tokens exceed the model's context: "
        "error (one line at load time, before any work) or skip (dropped, counted, one line on stderr)",
    )

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.kind == "verl_file" and not self.train_path:
            raise ValueError("task.kind=verl_file needs task.train_path (a .parquet or .jsonl file)")
        return self

    def spec(self) -> dict[str, Any]:
        """The dict :func:`vespo.tasks.build_task` takes."""
        spec: dict[str, Any] = {"kind": self.kind}
        if self.kind == "reasoning_gym":
            spec.update(name=self.name, params=dict(self.params), prompt_style=self.prompt_style)
        else:
            spec.update(train_path=self.train_path, eval_path=self.eval_path)
        spec["eval_fraction"] = self.eval_fraction
        if self.reward_fn:
            spec["reward_fn"] = self.reward_fn
        return spec


class SamplingConfig(_Section):
    group_size: int = Field(8, ge=2, description="G responses per prompt")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    sampler_dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="sampler precision (auto: bfloat16 where the device has native bf16 matmuls)"
    )
    engine: Literal["hf", "vllm"] = Field("hf", description="sampler engine: the project's own HF sampler or vLLM")
    engine_options: dict[str, Any] = Field(default_factory=dict, description="options passed to the engine")


class AlgorithmConfig(_Section):
    loss: str = "vespo"
    loss_params: dict[str, Any] = Field(default_factory=dict)
    loss_agg_mode: str = "token-mean"
    staleness: int = Field(8, ge=1, description="N: mini-batches per rollout batch")
    mini_batch_prompts: int = Field(16, ge=1, description="prompts per optimizer step")
    micro_batch_size: int | None = Field(None, ge=1, description="sequences per forward pass")
    normalize_adv_std: bool = True
    packing: bool = Field(
        False,
        description="padding-free training forward: each micro-batch's sequences packed into rows, "
        "first-fit decreasing (docs/real_lm.md)",
    )
    skip_zero_advantage: bool = Field(
        False,
        description="no forward/backward for sequences with zero advantage (all-equal groups): the same "
        "gradient, the diagnostics then cover the sequences that carry gradient (vespo/train/zero_advantage.py)",
    )
    old_log_prob: Literal["recompute", "sampler"] = "recompute"
    measure_mismatch: bool = Field(
        False,
        description="sync mode with old_log_prob=sampler: also run the trainer-precision pi_old forward, "
        "for the engine-mismatch metrics and the log W split only (the loss still uses mu)",
    )
    correction: Literal["none", "token_tis", "seq_tis", "token_mis", "seq_mis", "icepop"] = "none"
    correction_high: float | None = Field(None, gt=0)
    correction_low: float | None = Field(None, ge=0)
    routing_replay: Literal["none", "r2", "r3"] = Field(
        "none",
        description="MoE routing replay: r2 replays pi_old's routing in pi_theta, r3 the sampler's "
        "in pi_old and pi_theta (docs/routing_replay.md)",
    )

    @model_validator(mode="after")
    def _check(self) -> AlgorithmConfig:
        from vespo.losses import get_loss_spec
        from vespo.losses.aggregation import normalize_agg_mode

        spec = get_loss_spec(self.loss)
        spec.resolve(self.loss_params)
        normalize_agg_mode(self.loss_agg_mode)
        if self.correction != "none" and self.old_log_prob != "recompute":
            raise ValueError(
                "algorithm.correction needs algorithm.old_log_prob=recompute "
                "(with old_log_prob=sampler, pi_old is mu and there is no mismatch to correct)"
            )
        if self.packing and self.routing_replay != "none":
            raise ValueError("algorithm.packing does not combine with algorithm.routing_replay (padded layout only)")
        if self.skip_zero_advantage:
            from vespo.train.zero_advantage import check_zero_advantage_skip

            check_zero_advantage_skip(self.loss, self.loss_params, self.loss_agg_mode)
        return self


class OptimConfig(_Section):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)


class WarmupConfig(_Section):
    """Supervised warm-up on task demonstrations, for models that start from random weights."""

    steps: int = Field(600, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    checkpoint_every: int = Field(
        100, ge=1, description="warm-up steps between warm-up checkpoints (a resumed run continues from the last)"
    )


class EvalConfig(_Section):
    every: int = Field(40, ge=1, description="evaluate every K optimizer steps (and at the end)")
    num_prompts: int = Field(256, ge=1)
    avg_k: int = Field(4, ge=1, description="samples per prompt for avg@k (temperature sampling)")
    at_start: bool = True


class CheckpointConfig(_Section):
    every: int = Field(20, ge=1)
    keep_last: int = Field(2, ge=1)
    verify: bool = Field(
        True, description="check sizes and sha256 of a checkpoint's files (manifest.json) before loading it"
    )


class LoggingConfig(_Section):
    tensorboard: bool = True
    progress: bool = True


class AsyncConfig(_Section):
    num_workers: int = Field(1, ge=1)
    sync_every: int = Field(4, ge=1, description="optimizer steps between weight pushes")
    staleness_threshold: float = Field(1.0, ge=0)
    partial_rollout: bool = True
    queue_size: int = Field(64, ge=1, description="prompt groups in flight or waiting (>= mini_batch_prompts)")
    ray_address: str | None = None
    worker_timeout_s: float = Field(300.0, gt=0)
    chunk_prompts: int | None = Field(None, ge=1, description="prompts per worker request (default m / workers)")
    max_worker_restarts: int = Field(3, ge=0, description="dead workers replaced before the run stops")
    worker_threads: int = Field(1, ge=1, description="torch threads per rollout worker")
    worker_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per rollout worker")
    measure_mismatch: bool = Field(True, description="trainer-precision log-probs of sampled tokens (metrics)")
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each rollout worker requires, e.g. {node_b: 1} to place the "
        "workers on the nodes started with --resources='{\"node_b\": N}' (Ray actor option 'resources')",
    )

    @model_validator(mode="after")
    def _check(self) -> AsyncConfig:
        for name, amount in self.worker_resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(
                    f"async.worker_resources: '{name}' is not a custom resource (CPUs per worker: async.worker_cpus)"
                )
            if not name or not amount > 0 or amount != amount or amount == float("inf"):
                raise ValueError(f"async.worker_resources: '{name}' needs a finite amount > 0 (got {amount!r})")
        return self


class TrainConfig(_Section):
    """Every setting of a run. The field defaults are the offline default, configs/default.yaml."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    async_: AsyncConfig = Field(default_factory=AsyncConfig, alias="async")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _check_async(self) -> TrainConfig:
        m = self.algorithm.mini_batch_prompts
        if self.run.mode == "async" and self.async_.queue_size < m:
            raise ValueError(
                f"async.queue_size={self.async_.queue_size} must be >= algorithm.mini_batch_prompts={m} "
                "(one optimizer step needs that many completed groups)"
            )
        return self

    @model_validator(mode="after")
    def _check_routing(self) -> TrainConfig:
        from vespo.rollout.routing import config_error

        error = config_error(
            mode=self.algorithm.routing_replay,
            kind=self.model.kind,
            arch=self.model.arch,
            engine=self.sampling.engine,
            old_log_prob=self.algorithm.old_log_prob,
        )
        if error:
            raise ValueError(error)
        return self

    @property
    def rollout_prompts(self) -> int:
        """Prompts per rollout batch: N x mini-batch (the paper's gbs = N * mbs)."""
        return self.algorithm.staleness * self.algorithm.mini_batch_prompts

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{loc}'"
    value = first.get("input")
    shown = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
    return f"{loc}: {msg}{shown}" if loc else msg


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but with YAML 1.2 floats: ``1e-6`` is a number, not the string '1e-6'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text (configs and override values) with YAML 1.2 float syntax."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def _split_override(item: str) -> tuple[tuple[str, ...], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return tuple(key.split(".")), value


def _is_section(parts: tuple[str, ...]) -> bool:
    """True when ``parts`` names a config section (a pydantic model), e.g. ``("algorithm",)``."""
    model: type[BaseModel] = TrainConfig
    for part in parts:
        fields = {}
        for name, field in model.model_fields.items():
            fields[name] = field
            if field.alias:
                fields[field.alias] = field
        annotation = fields[part].annotation if part in fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    return True


def _assignments(items: list[str]) -> list[tuple[tuple[str, ...], Any, str]]:
    """Every override as (path, value, text); a mapping on a section becomes one assignment per key."""
    out: list[tuple[tuple[str, ...], Any, str]] = []

    def expand(parts: tuple[str, ...], value: Any, item: str) -> None:
        if isinstance(value, dict) and _is_section(parts):
            for k, v in value.items():
                expand((*parts, str(k)), v, item)
        else:
            out.append((parts, value, item))

    for item in items:
        parts, value = _split_override(item)
        expand(parts, value, item)
    return out


def apply_overrides(data: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``data`` (a config file's mapping) with the ``key=value`` overrides applied, left to right.

    The rule (docs/training.md, "Overrides"):

    * a dotted key sets exactly that entry; the entries around it (from the file, the defaults or
      earlier overrides) stay, also inside mappings such as ``algorithm.loss_params``;
    * the same key given twice: the last one wins (a sweep cell's value beats a common override);
    * a mapping on a *section* (``optim={lr: 1e-3}``) is the same as one dotted key per entry;
    * a mapping on a mapping-valued setting (``algorithm.loss_params={k_neg: 2}``) replaces the
      file's mapping, but an override may not erase what an earlier override set inside it
      (``algorithm.loss_params.k_pos=3`` then ``algorithm.loss_params={k_neg: 2}`` is refused:
      give the mapping first, or put both entries in it);
    * a dotted key into a value that is not a mapping (``algorithm.loss.x=1``) is refused.
    """
    out = copy.deepcopy(data)
    given: dict[tuple[str, ...], str] = {}  # path -> the override that set it
    for parts, value, item in _assignments(items):
        for path, earlier in given.items():
            if len(path) > len(parts) and path[: len(parts)] == parts and earlier != item:
                key = ".".join(parts)
                raise ConfigError(
                    f"override '{item}' would erase the earlier override '{earlier}' (a mapping replaces all "
                    f"of {key}); give the mapping first, or put both entries in one mapping"
                )
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override '{item}' conflicts with {where}={child!r}, which is not a mapping")
            node = child
        node[parts[-1]] = copy.deepcopy(value)
        given = {p: t for p, t in given.items() if p[: len(parts)] != parts}
        given[parts] = item
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict; values parsed as YAML scalars, lists or mappings."""
    return apply_overrides({}, items)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (:func:`apply_overrides`); validated."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {p} is a directory, not a YAML file")
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {p} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                "is it a YAML file?"
            ) from None
        except OSError as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
        try:
            loaded = load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Validate a nested dict into a :class:`TrainConfig`."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    except ValueError as err:  # raised by the loss registry inside a validator
        raise ConfigError(str(err)) from None


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
