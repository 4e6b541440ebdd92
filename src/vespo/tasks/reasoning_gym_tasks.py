"""Procedural tasks from reasoning-gym (offline, verifiable), with prompts for tiny and instruct models.

Prompt styles
-------------
``"plain"`` (tiny character-level models): the arithmetic datasets ``chain_sum``,
``basic_arithmetic`` and ``products`` become the bare expression, e.g. ``"12+7+30="``; any other
dataset becomes its question followed by a newline. The expected response is
``"<worked steps> Answer: <x>"``, e.g. ``"12+7=19,19+30=49. Answer: 49"``.

``"instruct"`` (chat models such as SmolLM2-135M-Instruct): one user message with the dataset's
question and :data:`INSTRUCT_SUFFIX`, which asks for a last line ``Answer: <x>``.

Scoring extracts the answer after the last ``Answer:`` (see :func:`~vespo.tasks.rewards.extract_answer`)
and scores it with the dataset's own ``score_answer``; by default the reward is binary
(1.0 only when ``score_answer`` gives full credit).

Train/eval split
----------------
Each question is assigned to the train or the eval partition by a hash of its text (of its
compact expression for the arithmetic datasets; ``eval_fraction`` of the question space goes to
eval), and the two splits are generated from different seeds. No eval question can therefore
appear in any train set, whatever the seeds and sizes. Eval questions are also unique within the
eval set. Items whose own reference answer does not get full credit from ``score_answer`` are
skipped (e.g. gsm_symbolic's scorer cannot read negative answers), so every example is solvable.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from typing import Any, Literal

from vespo.tasks.arithmetic import compact, render_solution, worked_steps
from vespo.tasks.base import Example, Task, derive_seed, in_eval_partition
from vespo.tasks.rewards import extract_answer

PromptStyle = Literal["plain", "instruct"]
PROMPT_STYLES: tuple[str, ...] = ("plain", "instruct")

#: datasets whose plain prompt is the compact expression; value: expand products digit by digit
ARITHMETIC_DATASETS: dict[str, bool] = {"chain_sum": False, "basic_arithmetic": False, "products": True}

INSTRUCT_SUFFIX = (
    '\n\nWork it out step by step, then give the final answer on the last line in the form "Answer: <answer>".'
)

_CHUNK = 1024  # items per reasoning-gym dataset object; seeds advance by _CHUNK per chunk


def _registry() -> dict[str, tuple[type, type]]:
    from reasoning_gym.factory import DATASETS

    return DATASETS


def reasoning_gym_names() -> list[str]:
    """All dataset names reasoning-gym can generate."""
    return sorted(_registry())


def _check_name(name: str) -> None:
    names = reasoning_gym_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown reasoning-gym dataset {name!r}.{hint} Valid names: {', '.join(names)}")


def _check_params(name: str, params: dict[str, Any]) -> None:
    _, config_cls = _registry()[name]
    valid = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size")]
    reserved = sorted(k for k in params if k in ("seed", "size"))
    if reserved:
        raise ValueError(
            f"reasoning-gym dataset {name!r}: {', '.join(reserved)} cannot be set in params "
            f"(vespo sets them per split); valid params: {', '.join(valid)}"
        )
    unknown = sorted(k for k in params if k not in valid)
    if unknown:
        raise ValueError(
            f"reasoning-gym dataset {name!r} has no parameter(s) {', '.join(unknown)}; valid params: {', '.join(valid)}"
        )


class ReasoningGymTask(Task):
    """Any reasoning-gym dataset by name, scored by its own ``score_answer``.

    Args:
        name: a reasoning-gym dataset name, e.g. ``"chain_sum"`` (see :func:`reasoning_gym_names`).
        params: the dataset's config fields, e.g. ``{"min_terms": 2, "max_terms": 3, "max_digits": 2}``
            (``seed`` and ``size`` are set per split by this class).
        prompt_style: ``"plain"`` for tiny character-level models, ``"instruct"`` for chat models.
        eval_fraction: share of the question space held out for evaluation (by question hash).
        partial_credit: if False (default) the reward is 1.0 when ``score_answer`` gives full credit
            and 0.0 otherwise; if True, ``score_answer``'s value (clipped to [0, 1]) is returned.
    """

    #: reasoning-gym's scorers are pure Python and take ~10 us; a worker round trip costs ~130 us
    score_in_process = True

    def __init__(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        *,
        prompt_style: PromptStyle = "plain",
        eval_fraction: float = 0.1,
        partial_credit: bool = False,
    ):
        params = dict(params or {})
        _check_name(name)
        _check_params(name, params)
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {prompt_style!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
        self.name = name
        self.params = params
        self.prompt_style: PromptStyle = prompt_style
        self.eval_fraction = float(eval_fraction)
        self.partial_credit = bool(partial_credit)
        self.data_source = f"reasoning_gym/{name}"
        # also validates the parameter values; this instance is used for scoring
        self._scorer = self._create(seed=0, size=1)

    def __repr__(self) -> str:
        return f"ReasoningGymTask({self.name!r}, {self.params!r}, prompt_style={self.prompt_style!r})"

    @property
    def spec(self) -> dict[str, Any]:
        """The :func:`~vespo.tasks.build_task` spec that rebuilds this task."""
        return {
            "kind": "reasoning_gym",
            "name": self.name,
            "params": dict(self.params),
            "prompt_style": self.prompt_style,
            "eval_fraction": self.eval_fraction,
            "partial_credit": self.partial_credit,
        }

    def _create(self, seed: int, size: int):
        import reasoning_gym

        try:
            return reasoning_gym.create_dataset(self.name, seed=seed, size=size, **self.params)
        except (AssertionError, TypeError, ValueError) as exc:
            _, config_cls = _registry()[self.name]
            valid = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size")]
            raise ValueError(
                f"invalid params {self.params!r} for reasoning-gym dataset {self.name!r}: "
                f"{exc or type(exc).__name__}; valid params: {', '.join(valid)}"
            ) from exc

    # ------------------------------------------------------------------ examples

    def _split_key(self, question: str, metadata: dict[str, Any]) -> str:
        """What must not repeat between train and eval: the expression for arithmetic, else the question."""
        expression = metadata.get("expression")
        if self.name in ARITHMETIC_DATASETS and isinstance(expression, str):
            return compact(expression)
        return question.strip()

    def _prompt(self, question: str, metadata: dict[str, Any]):
        if self.prompt_style == "instruct":
            return [{"role": "user", "content": question.strip() + INSTRUCT_SUFFIX}]
        expression = metadata.get("expression")
        if self.name in ARITHMETIC_DATASETS and isinstance(expression, str):
            return compact(expression) + "="
        return question.strip() + "\n"

    def _example(self, entry: dict[str, Any], split: str, seed: int, index: int) -> Example:
        question = str(entry["question"])
        rg_meta = dict(entry.get("metadata") or {})
        answer = entry.get("answer")
        return Example(
            prompt=self._prompt(question, rg_meta),
            ground_truth="" if answer is None else str(answer),
            data_source=self.data_source,
            metadata={
                "question": question,
                "answer": answer,
                "rg_metadata": rg_meta,
                "split": split,
                "seed": seed,
                "index": index,
            },
            uid=f"{self.name}/{split}/{seed}/{index}",
        )

    def _collect(self, split: str, n: int, seed: int) -> list[Example]:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        want_eval = split == "eval"
        share = self.eval_fraction if want_eval else 1.0 - self.eval_fraction
        base = derive_seed("reasoning_gym", self.name, split, seed)
        # stop when the question space looks exhausted (eval) or after a generous budget (train)
        patience = int(max(5000, 50 / share))
        budget = int(n / share * 10) + patience
        out: list[Example] = []
        seen: set[str] = set()
        index = 0
        last_new = 0
        unscorable = 0
        dataset = None
        while len(out) < n and index < budget and index - last_new < patience:
            if index % _CHUNK == 0:
                dataset = self._create(seed=base + index, size=_CHUNK)
            entry = dataset[index % _CHUNK]
            key = self._split_key(str(entry["question"]), entry.get("metadata") or {})
            if in_eval_partition(key, self.eval_fraction) == want_eval and not (want_eval and key in seen):
                example = self._example(entry, split, seed, index)
                gold = example.ground_truth
                if example.metadata["answer"] is None or self.score(f"Answer: {gold}", example) >= 1.0:
                    seen.add(key)
                    out.append(example)
                    last_new = index
                else:
                    unscorable += 1
            index += 1
        if len(out) < n:
            if unscorable > len(out):
                raise ValueError(
                    f"reasoning-gym {self.name!r}: {unscorable} of {unscorable + len(out)} generated {split} items "
                    "were skipped because their own reference answer does not score 1.0 when given as "
                    "'Answer: <x>'; this dataset is not supported"
                )
            message = (
                f"reasoning-gym {self.name!r}: only {len(out)} unique {split} questions found for n={n} "
                f"(the question space of params {self.params} is small; raise eval_fraction or the difficulty)"
            )
            if want_eval:
                warnings.warn(message, stacklevel=3)
            else:
                raise ValueError(message)
        return out

    def train_examples(self, n: int, seed: int = 0) -> list[Example]:
        """``n`` training examples (questions may repeat); a prefix of any longer list with the same seed."""
        return self._collect("train", n, seed)

    def eval_examples(self, n: int, seed: int = 0) -> list[Example]:
        """Up to ``n`` unique eval questions (fewer, with a warning, if the question space is exhausted)."""
        return self._collect("eval", n, seed)

    # ------------------------------------------------------------------ scoring

    def score(self, response: str, example: Example) -> float:
        """Dataset ``score_answer`` of the extracted answer; binary unless ``partial_credit``."""
        meta = example.metadata
        answer = extract_answer(response, multiline="\n" in example.ground_truth)
        if answer is None:
            return 0.0
        entry = {
            "question": meta.get("question", ""),
            "answer": meta.get("answer", example.ground_truth),
            "metadata": meta.get("rg_metadata", {}),
        }
        try:
            value = float(self._scorer.score_answer(answer=answer, entry=entry))
        except Exception:  # noqa: BLE001 - a malformed answer must not crash training
            return 0.0
        if not math.isfinite(value):
            return 0.0
        value = min(max(value, 0.0), 1.0)
        if self.partial_credit:
            return value
        return 1.0 if value >= 1.0 - 1e-9 else 0.0

    def demonstration(self, example: Example) -> str | None:
        """A worked solution ending in ``Answer: <x>``, or None if it would not score 1.0.

        Arithmetic datasets get step-by-step working (``"12+7=19,19+30=49. Answer: 49"``,
        one step per line for the instruct style); datasets whose metadata carries
        ``answer_cot`` (gsm_symbolic) use it; any other dataset gets ``"Answer: <x>"``.
        """
        answer = example.ground_truth
        if not answer:
            return None
        rg_meta = example.metadata.get("rg_metadata", {})
        spaced = self.prompt_style == "instruct"
        demo: str | None = None
        expression = rg_meta.get("expression")
        if self.name in ARITHMETIC_DATASETS and isinstance(expression, str):
            steps = worked_steps(expression, answer, expand_products=ARITHMETIC_DATASETS[self.name])
            if steps is not None:
                demo = render_solution(steps, answer, spaced=spaced)
        if demo is None and isinstance(rg_meta.get("answer_cot"), str) and rg_meta["answer_cot"].strip():
            lines = [ln for ln in rg_meta["answer_cot"].strip().splitlines() if not ln.lstrip().startswith("####")]
            demo = "\n".join(lines).strip() + f"\nAnswer: {answer}"
        if demo is None:
            demo = f"Answer:\n{answer}" if "\n" in answer else f"Answer: {answer}"
        return demo if self.score(demo, example) >= 1.0 else None
