"""Core types of the task layer: :class:`Example`, the :class:`Task` interface and split helpers."""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, str]]
Prompt = str | Messages

#: Signature of a reward function: ``fn(response, example) -> float`` in [0, 1].
RewardFn = Callable[[str, "Example"], float]


@dataclass
class Example:
    """One prompt with what is needed to score a response to it.

    Attributes:
        prompt: plain text (fed to the model as is) or chat messages
            ``[{"role": "user", "content": ...}, ...]`` (rendered with the tokenizer's chat template).
        ground_truth: the reference answer, as a string.
        data_source: where the example comes from, e.g. ``"reasoning_gym/chain_sum"`` or a verl
            ``data_source`` such as ``"math_dapo"``.
        metadata: task-specific data the scorer needs (never shown to the model).
        uid: stable identifier of the underlying item (same item -> same uid across runs).
    """

    prompt: Prompt
    ground_truth: str
    data_source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    uid: str = ""

    def messages(self) -> Messages:
        """The prompt as chat messages (a plain prompt becomes one user message)."""
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [dict(m) for m in self.prompt]

    def prompt_text(self) -> str:
        """The prompt as one string (chat messages joined by newlines, for logs and hashing)."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in self.prompt)


class Task(abc.ABC):
    """A source of train/eval examples with a scorer.

    Subclasses provide :meth:`train_examples`, :meth:`eval_examples` and :meth:`score`;
    :meth:`demonstration` is optional (used for a supervised warm-up of models that start
    from random weights).
    """

    name: str = "task"
    #: True if :meth:`score` is trusted, fast, pure Python and contains anything dangerous itself,
    #: so :class:`~vespo.tasks.rewards.RewardRunner` may call it in the trainer process
    score_in_process: bool = False

    @abc.abstractmethod
    def train_examples(self, n: int, seed: int = 0) -> list[Example]:
        """``n`` training examples, deterministic in ``(n, seed)``."""

    @abc.abstractmethod
    def eval_examples(self, n: int, seed: int = 0) -> list[Example]:
        """Up to ``n`` evaluation examples, disjoint from every training example."""

    @abc.abstractmethod
    def score(self, response: str, example: Example) -> float:
        """Reward in [0, 1] of ``response`` (the generated continuation only) for ``example``."""

    def demonstration(self, example: Example) -> str | None:
        """A reference response that scores 1.0, or None if the task has none."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _rebuild_reward_fn_task(task: Task, reward_spec: str) -> RewardFnTask:
    from vespo.tasks.rewards import load_reward_function

    return RewardFnTask(task, load_reward_function(reward_spec), reward_spec, reward_spec=reward_spec)


class RewardFnTask(Task):
    """A task whose scorer is replaced by a user reward function; everything else is delegated.

    With ``reward_spec`` (the ``"module:function"`` it was loaded from) the task pickles as that
    spec, so another process (a reward worker, a Ray actor) re-imports the function, even from a
    ``.py`` file that is not on its import path.
    """

    def __init__(
        self, task: Task, reward_fn: RewardFn, reward_fn_name: str | None = None, *, reward_spec: str | None = None
    ):
        self.task = task
        self.reward_fn = reward_fn
        self.reward_fn_name = reward_fn_name or getattr(reward_fn, "__qualname__", None) or type(reward_fn).__name__
        self.reward_spec = reward_spec
        self.name = task.name

    def __reduce_ex__(self, protocol):  # noqa: ANN001, ANN204
        if self.reward_spec:
            return (_rebuild_reward_fn_task, (self.task, self.reward_spec))
        return super().__reduce_ex__(protocol)

    def train_examples(self, n: int, seed: int = 0) -> list[Example]:
        return self.task.train_examples(n, seed)

    def eval_examples(self, n: int, seed: int = 0) -> list[Example]:
        return self.task.eval_examples(n, seed)

    def score(self, response: str, example: Example) -> float:
        return self.reward_fn(response, example)

    def demonstration(self, example: Example) -> str | None:
        return self.task.demonstration(example)

    def __repr__(self) -> str:
        return f"RewardFnTask({self.task!r}, reward_fn={self.reward_fn_name})"


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that does not change between processes (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def in_eval_partition(key: str, eval_fraction: float) -> bool:
    """Deterministically assign ``key`` to the eval partition with probability ``eval_fraction``."""
    return stable_hash("vespo-split:" + key) < eval_fraction * 2**64


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed derived from ``parts`` (e.g. ``("train", 0)``), stable across processes."""
    return stable_hash(json.dumps([str(p) for p in parts])) % (2**31 - 1)


def prompt_key(prompt: Prompt) -> str:
    """A canonical string for a prompt, used to compare train and eval sets."""
    if isinstance(prompt, str):
        return prompt.strip()
    return json.dumps([[m.get("role"), m.get("content")] for m in prompt], ensure_ascii=False)


def check_disjoint(
    train: Iterable[Example], eval_: Iterable[Example], key: Callable[[Example], str] | None = None
) -> None:
    """Raise ValueError if any eval example's prompt (or ``key``) also occurs in ``train``."""
    key = key or (lambda ex: prompt_key(ex.prompt))
    seen = {key(ex) for ex in train}
    overlap = [ex for ex in eval_ if key(ex) in seen]
    if overlap:
        raise ValueError(
            f"{len(overlap)} eval example(s) also occur in the train set, e.g. uid={overlap[0].uid!r}: "
            f"{prompt_key(overlap[0].prompt)[:80]!r}"
        )


def examples_summary(examples: Sequence[Example]) -> dict[str, float]:
    """Count and mean prompt length in characters (handy in logs)."""
    if not examples:
        return {"count": 0.0, "prompt_chars_mean": 0.0}
    return {
        "count": float(len(examples)),
        "prompt_chars_mean": sum(len(ex.prompt_text()) for ex in examples) / len(examples),
    }
