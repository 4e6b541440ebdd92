"""Build a task from a config dict (what ``vespo.train.config.TaskConfig.spec()`` produces)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vespo.tasks.base import RewardFnTask, Task
from vespo.tasks.code_tasks import CODE_TASK_NAMES, CodeTask
from vespo.tasks.reasoning_gym_tasks import ReasoningGymTask
from vespo.tasks.rewards import load_reward_function, normalize_reward_spec
from vespo.tasks.verl_files import VerlFileTask

_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (required keys, optional keys)
    "reasoning_gym": (("name",), ("params", "prompt_style", "eval_fraction", "partial_credit")),
    "verl_file": (
        ("train_path",),
        ("eval_path", "eval_fraction", "overlap", "name", "partial_credit", "sandbox", "sandbox_workers"),
    ),
    "code": ((), ("name", "params", "prompt_style", "eval_fraction", "partial_credit")),
}
#: vespo's own procedural tasks, selected by ``name`` like reasoning-gym datasets
#: (``task.name=code_functions`` in the trainer config)
VESPO_TASK_NAMES: tuple[str, ...] = CODE_TASK_NAMES
TASK_KINDS: tuple[str, ...] = tuple(_KINDS)


def build_task(spec: dict[str, Any]) -> Task:
    """A :class:`Task` from a spec dict.

    Examples::

        {"kind": "reasoning_gym", "name": "chain_sum", "params": {"min_terms": 2, "max_terms": 3},
         "prompt_style": "plain"}
        {"kind": "verl_file", "train_path": "dapo_math.parquet", "eval_path": "aime24.parquet"}
        {"kind": "reasoning_gym", "name": "code_functions", "params": {"num_tests": 10}}  # = kind "code"

    Every kind also accepts ``"reward_fn"``: a ``"module:function"`` string (see
    :func:`~vespo.tasks.rewards.load_reward_function`) or a callable ``fn(response, example)``
    that replaces the task's scorer. Unknown kinds or keys raise ValueError listing the valid ones.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"task spec must be a dict, got {type(spec).__name__}")
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"task spec needs 'kind' = one of {', '.join(TASK_KINDS)}; got {kind!r}")
    reward_fn = spec.pop("reward_fn", None)
    required, optional = _KINDS[kind]
    missing = [k for k in required if spec.get(k) in (None, "")]
    if missing:
        raise ValueError(f"task kind {kind!r} needs {', '.join(missing)}")
    unknown = sorted(k for k in spec if k not in required + optional)
    if unknown:
        valid = ", ".join(("kind",) + required + optional + ("reward_fn",))
        raise ValueError(f"task kind {kind!r} does not take {', '.join(unknown)}; valid keys: {valid}")
    spec = {k: v for k, v in spec.items() if v is not None}

    task: Task
    if kind == "code" or (kind == "reasoning_gym" and spec.get("name") in CODE_TASK_NAMES):
        spec.setdefault("prompt_style", "instruct")
        task = CodeTask(spec.pop("name", "code_functions"), spec.pop("params", None), **spec)
    elif kind == "reasoning_gym":
        task = ReasoningGymTask(spec.pop("name"), spec.pop("params", None), **spec)
    else:
        task = VerlFileTask(spec.pop("train_path"), spec.pop("eval_path", None), **spec)

    if reward_fn is not None and reward_fn != "":
        fn: Callable[..., Any]
        reward_spec = None
        if isinstance(reward_fn, str):
            reward_spec = normalize_reward_spec(reward_fn)
            fn = load_reward_function(reward_spec)
            name = reward_fn
        elif callable(reward_fn):
            fn, name = reward_fn, getattr(reward_fn, "__qualname__", None) or type(reward_fn).__name__
        else:
            raise ValueError(
                f"reward_fn must be a 'module:function' string or a callable, got {type(reward_fn).__name__}"
            )
        task = RewardFnTask(task, fn, name, reward_spec=reward_spec)
    return task
