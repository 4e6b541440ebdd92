"""Tasks, data and rewards for the trainer.

* :class:`Example` / :class:`Task`: prompts with ground truth, train/eval splits, a scorer and
  optional demonstrations (reference responses for a supervised warm-up).
* :class:`ReasoningGymTask`: procedural reasoning-gym datasets (offline), with a short "plain"
  prompt format for tiny character-level models and an "instruct" format for chat models.
* :class:`VerlFileTask`: verl-style parquet/jsonl files (DAPO-Math, AIME, AMC, MATH-500) scored
  with math-verify on the last ``\\boxed{}``.
* :func:`load_reward_function`, :class:`RewardRunner`: user reward functions and fault-tolerant,
  time-limited batch scoring in worker processes (:class:`ProcessPool`).
* :class:`CodeTask` (``task.name=code_functions``): procedural function-writing problems with
  hidden tests, scored in the :class:`Sandbox` (jailed processes); verl/Eurus code rows too;
  :func:`pass_at_k`, :func:`evaluate_pass_at_k`.
* :func:`build_task`: a task from a config dict.
"""

from vespo.tasks.base import Example, RewardFn, RewardFnTask, Task, check_disjoint
from vespo.tasks.build import TASK_KINDS, VESPO_TASK_NAMES, build_task
from vespo.tasks.code_tasks import TEMPLATE_KEYS, CodeTask, evaluate_pass_at_k, extract_code, pass_at_k
from vespo.tasks.procpool import CallResult, ProcessPool
from vespo.tasks.reasoning_gym_tasks import INSTRUCT_SUFFIX, ReasoningGymTask, reasoning_gym_names
from vespo.tasks.rewards import (
    RewardRunner,
    extract_answer,
    extract_last_boxed,
    load_reward_function,
    math_verify_equal,
    math_verify_score,
)
from vespo.tasks.sandbox import CodeTests, Sandbox, SandboxLimits, SandboxResult
from vespo.tasks.verl_files import (
    DataFileError,
    VerlFileTask,
    example_to_verl_row,
    read_verl_file,
    write_verl_jsonl,
    write_verl_parquet,
)

__all__ = [
    "Example",
    "Task",
    "RewardFn",
    "RewardFnTask",
    "check_disjoint",
    "TASK_KINDS",
    "VESPO_TASK_NAMES",
    "build_task",
    "CodeTask",
    "TEMPLATE_KEYS",
    "extract_code",
    "pass_at_k",
    "evaluate_pass_at_k",
    "Sandbox",
    "SandboxLimits",
    "SandboxResult",
    "CodeTests",
    "ReasoningGymTask",
    "INSTRUCT_SUFFIX",
    "reasoning_gym_names",
    "VerlFileTask",
    "DataFileError",
    "read_verl_file",
    "example_to_verl_row",
    "write_verl_jsonl",
    "write_verl_parquet",
    "RewardRunner",
    "ProcessPool",
    "CallResult",
    "load_reward_function",
    "extract_answer",
    "extract_last_boxed",
    "math_verify_equal",
    "math_verify_score",
]
