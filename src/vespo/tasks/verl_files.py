"""Tasks from verl-style data files (parquet or jsonl), scored with math-verify.

Row schema (the one verl's preprocessing scripts write for DAPO-Math, AIME, AMC, MATH-500)::

    {
      "data_source": "math_dapo",
      "prompt": [{"role": "user", "content": "... put your final answer within \\\\boxed{}."}],
      "reward_model": {"ground_truth": "34", "style": "rule"},
      "extra_info": {"index": 0, ...}            # optional
      ...                                        # other columns (e.g. "ability") are kept in metadata
    }

``prompt`` may also be a plain string. A response is scored 1.0 when the content of its last
``\\boxed{...}`` equals ``ground_truth`` according to math-verify, else 0.0.

Code rows (Eurus-2-RL-Data, PRIME, APPS/TACO style) are recognised per row, by ``ability ==
"code"`` or a ``ground_truth`` that is a JSON object (or a JSON string of one) with ``inputs`` and
``outputs`` lists, plus ``fn_name`` for call-based problems; they are scored by running the
response's last fenced Python block against those tests in the sandbox
(:func:`vespo.tasks.code_tasks.score_code`), 1.0 when every test passes (or the passed fraction
with ``partial_credit``). Math and code rows may share one file.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from vespo.tasks.base import Example, Task, in_eval_partition, prompt_key
from vespo.tasks.rewards import math_verify_score

REQUIRED_COLUMNS: tuple[str, ...] = ("data_source", "prompt", "reward_model")
EXTENSIONS: tuple[str, ...] = (".parquet", ".jsonl")


class DataFileError(ValueError):
    """A data file that cannot be used; the message names the file, the row and the problem.

    Attributes:
        path: the file.
        row: 0-based data row (None for file-level problems).
        line: 1-based line number (jsonl only).
    """

    def __init__(self, path: str | Path, problem: str, row: int | None = None, line: int | None = None):
        self.path = str(path)
        self.row = row
        self.line = line
        self.problem = problem
        where = self.path
        if line is not None:
            where += f", line {line} (row {row})"
        elif row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.problem, self.row, self.line))


# --------------------------------------------------------------------------- reading


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataFileError(path, f"unknown extension {suffix or '(none)'!r}; expected one of {', '.join(EXTENSIONS)}")
    return suffix[1:]


def _read_jsonl(path: Path) -> list[tuple[dict[str, Any], int, int | None]]:
    rows: list[tuple[dict[str, Any], int, int | None]] = []
    with path.open("r", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row_index = len(rows)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", row_index, line_no) from exc
            if not isinstance(obj, dict):
                raise DataFileError(path, f"expected a JSON object, got {type(obj).__name__}", row_index, line_no)
            rows.append((obj, row_index, line_no))
    return rows


def _read_parquet(path: Path) -> list[tuple[dict[str, Any], int, int | None]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataFileError(path, "reading parquet needs pyarrow (pip install 'vespo[data]')") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
        raise DataFileError(path, f"cannot read parquet: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataFileError(
            path, f"missing column(s) {', '.join(missing)}; found columns: {', '.join(table.column_names) or 'none'}"
        )
    return [(row, i, None) for i, row in enumerate(table.to_pylist())]


def _fail(path: Path, row: int, line: int | None, problem: str) -> DataFileError:
    return DataFileError(path, problem, row=row, line=line)


def _parse_prompt(value: Any, path: Path, row: int, line: int | None) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise _fail(path, row, line, "'prompt' is an empty string")
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(path, row, line, f"'prompt' must be a non-empty list of chat messages, got {type(value).__name__}")
    messages = []
    for k, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise _fail(path, row, line, f"prompt message {k} must be an object, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise _fail(path, row, line, f"prompt message {k} needs string 'role' and 'content'")
        messages.append({"role": role, "content": content})
    return messages


def _parse_row(raw: dict[str, Any], path: Path, row: int, line: int | None, split: str) -> Example:
    missing = [c for c in REQUIRED_COLUMNS if c not in raw]
    if missing:
        raise _fail(path, row, line, f"missing {', '.join(repr(c) for c in missing)}")
    prompt = _parse_prompt(raw["prompt"], path, row, line)
    reward_model = raw["reward_model"]
    if not isinstance(reward_model, dict):
        raise _fail(path, row, line, f"'reward_model' must be an object, got {type(reward_model).__name__}")
    gt = reward_model.get("ground_truth")
    if gt is None:
        raise _fail(path, row, line, "'reward_model' has no 'ground_truth'")
    if isinstance(gt, dict) and "inputs" in gt:  # code tests given as an object rather than a string
        gt = json.dumps(gt)
    if isinstance(gt, bool) or not isinstance(gt, (str, int, float)):
        raise _fail(path, row, line, f"'reward_model.ground_truth' must be a string or number, got {type(gt).__name__}")
    gt = str(gt).strip()
    if not gt:
        raise _fail(path, row, line, "'reward_model.ground_truth' is empty")
    data_source = raw["data_source"]
    if not isinstance(data_source, str) or not data_source:
        raise _fail(path, row, line, "'data_source' must be a non-empty string")
    extra_info = raw.get("extra_info")
    if extra_info is not None and not isinstance(extra_info, dict):
        raise _fail(path, row, line, f"'extra_info' must be an object, got {type(extra_info).__name__}")
    metadata = {k: v for k, v in raw.items() if k not in ("prompt", "reward_model", "data_source")}
    metadata.update(
        extra_info=extra_info or {},
        reward_style=reward_model.get("style"),
        source_file=str(path),
        row=row,
        split=split,
    )
    return Example(prompt=prompt, ground_truth=gt, data_source=data_source, metadata=metadata, uid=f"{path.name}:{row}")


def read_verl_file(path: str | Path, split: str = "train") -> list[Example]:
    """Read and validate a verl-style ``.parquet`` or ``.jsonl`` file.

    Raises:
        DataFileError: the file is missing, empty, has an unknown extension, lacks a column,
            or has a malformed row (the message names the file, the row and the problem).
    """
    path = Path(path)
    kind = _file_kind(path)
    if not path.is_file():
        raise DataFileError(path, "file does not exist")
    rows = _read_jsonl(path) if kind == "jsonl" else _read_parquet(path)
    if not rows:
        raise DataFileError(path, "file has no rows")
    return [_parse_row(raw, path, row, line, split) for raw, row, line in rows]


# --------------------------------------------------------------------------- writing


def example_to_verl_row(
    example: Example,
    *,
    index: int | None = None,
    split: str | None = None,
    prompt_suffix: str = "",
    demonstration: str | None = None,
    ability: str = "math",
) -> dict[str, Any]:
    """An :class:`Example` as a verl row (e.g. reasoning-gym data for verl or :class:`VerlFileTask`).

    ``prompt_suffix`` is appended to the last message, e.g. ``" Please reason step by step, and put
    your final answer within \\\\boxed{}."`` so that math-verify scoring finds a box.
    ``demonstration`` is stored in ``extra_info`` and used by :meth:`VerlFileTask.demonstration`.
    """
    messages = example.messages()
    if prompt_suffix:
        messages[-1]["content"] += prompt_suffix
    extra: dict[str, Any] = {"index": index, "split": split, "uid": example.uid}
    if demonstration is not None:
        extra["demonstration"] = demonstration
    return {
        "data_source": example.data_source,
        "prompt": messages,
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": example.ground_truth},
        "extra_info": extra,
    }


def _as_rows(rows: Iterable[dict[str, Any] | Example]) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(rows):
        out.append(example_to_verl_row(r, index=i) if isinstance(r, Example) else dict(r))
    return out


def write_verl_jsonl(path: str | Path, rows: Iterable[dict[str, Any] | Example]) -> Path:
    """Write verl rows (dicts written as given, Examples converted) as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in _as_rows(rows):
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return path


def write_verl_parquet(path: str | Path, rows: Iterable[dict[str, Any] | Example]) -> Path:
    """Write verl rows (dicts written as given, Examples converted) as a parquet file (needs pyarrow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(_as_rows(rows)), path)
    return path


# --------------------------------------------------------------------------- task


class VerlFileTask(Task):
    """Train/eval examples from verl-style files, scored by math-verify on the last ``\\boxed{}``.

    Args:
        train_path: ``.parquet`` or ``.jsonl`` training file (e.g. DAPO-Math).
        eval_path: evaluation file (e.g. AIME/AMC/MATH-500). If None, a deterministic
            ``eval_fraction`` of the train file's prompts (chosen by prompt hash) is held out.
        eval_fraction: held-out share when ``eval_path`` is None.
        overlap: what to do when an eval prompt also occurs in the train file:
            ``"warn"`` (default), ``"error"`` or ``"ignore"``.
        name: task name (default: the train file's stem).
        partial_credit: code rows score the passed fraction of their tests (default: 1.0 only
            when all pass).
        sandbox: :class:`~vespo.tasks.sandbox.SandboxLimits` fields for code rows, e.g.
            ``{"case_timeout_s": 2.0, "memory_mb": 512}``.
        sandbox_workers: sandbox supervisor processes (code rows of a batch run that many at once).
    """

    def __init__(
        self,
        train_path: str | Path,
        eval_path: str | Path | None = None,
        *,
        eval_fraction: float = 0.1,
        overlap: Literal["warn", "error", "ignore"] = "warn",
        name: str | None = None,
        partial_credit: bool = False,
        sandbox: dict[str, Any] | None = None,
        sandbox_workers: int = 2,
    ):
        from vespo.tasks.sandbox import SandboxLimits

        self.partial_credit = bool(partial_credit)
        self.limits = SandboxLimits(**(sandbox or {}))
        self.sandbox_workers = int(sandbox_workers)
        if overlap not in ("warn", "error", "ignore"):
            raise ValueError(f"overlap must be one of warn, error, ignore; got {overlap!r}")
        if eval_path is None and not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
        self.train_path = Path(train_path)
        self.eval_path = Path(eval_path) if eval_path is not None else None
        self.eval_fraction = float(eval_fraction)
        self.name = name or self.train_path.stem
        train_rows = read_verl_file(self.train_path, "train")
        if self.eval_path is None:
            keyed = [(prompt_key(ex.prompt), ex) for ex in train_rows]
            self._train = [ex for k, ex in keyed if not in_eval_partition(k, self.eval_fraction)]
            self._eval = [ex for k, ex in keyed if in_eval_partition(k, self.eval_fraction)]
            for ex in self._eval:
                ex.metadata["split"] = "eval"
            if not self._train:
                raise DataFileError(self.train_path, "no training rows left after holding out the eval split")
            if not self._eval:
                warnings.warn(f"{self.train_path}: no rows fell into the held-out eval split", stacklevel=2)
        else:
            self._train = train_rows
            self._eval = read_verl_file(self.eval_path, "eval")
            if overlap != "ignore":
                train_keys = {prompt_key(ex.prompt) for ex in self._train}
                shared = sum(prompt_key(ex.prompt) in train_keys for ex in self._eval)
                if shared:
                    if overlap == "error":
                        raise DataFileError(self.eval_path, f"{shared} eval prompt(s) also occur in {self.train_path}")
                    warnings.warn(
                        f"{self.eval_path}: {shared} of {len(self._eval)} eval prompts also occur in {self.train_path}",
                        stacklevel=2,
                    )

    def __repr__(self) -> str:
        return f"VerlFileTask({str(self.train_path)!r}, {str(self.eval_path) if self.eval_path else None!r})"

    @property
    def num_train(self) -> int:
        return len(self._train)

    @property
    def num_eval(self) -> int:
        return len(self._eval)

    def train_examples(self, n: int, seed: int = 0) -> list[Example]:
        """``n`` rows in a seeded random order; beyond one pass, further reshuffled passes follow."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        rng = random.Random(seed)
        out: list[Example] = []
        while len(out) < n:
            order = list(range(len(self._train)))
            rng.shuffle(order)
            out.extend(self._train[i] for i in order[: n - len(out)])
        return out

    def eval_examples(self, n: int, seed: int = 0) -> list[Example]:
        """All eval rows in file order if ``n >= num_eval``, else a seeded sample of ``n`` (file order)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if n >= len(self._eval):
            return list(self._eval)
        chosen = sorted(random.Random(seed).sample(range(len(self._eval)), n))
        return [self._eval[i] for i in chosen]

    def score(self, response: str, example: Example) -> float:
        """math-verify on the last ``\\boxed{}``, or the sandboxed tests of a code row."""
        return self.score_many([response], [example])[0]

    def score_many(self, responses: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """Scores of a batch; its code rows are evaluated ``sandbox_workers`` at a time."""
        from vespo.tasks.code_tasks import is_code_example, score_code

        scores = [0.0] * len(responses)
        code = [k for k, ex in enumerate(examples) if is_code_example(ex)]
        code_set = set(code)
        for k, (response, example) in enumerate(zip(responses, examples, strict=True)):
            if k not in code_set:
                scores[k] = math_verify_score(response, example.ground_truth)
        if code:
            from vespo.tasks.sandbox import shared_sandbox

            box = shared_sandbox(self.limits, self.sandbox_workers)
            values = score_code([responses[k] for k in code], [examples[k] for k in code], box, self.partial_credit)
            for k, v in zip(code, values):
                scores[k] = v
        return scores

    def demonstration(self, example: Example) -> str | None:
        """``extra_info["demonstration"]`` if the file has one, else ``"\\boxed{<ground truth>}"``
        (None for code rows without one)."""
        demo = (example.metadata.get("extra_info") or {}).get("demonstration")
        if isinstance(demo, str) and demo.strip():
            return demo
        from vespo.tasks.code_tasks import is_code_example

        if is_code_example(example):
            return None
        return f"\\boxed{{{example.ground_truth}}}"


def examples_to_rows(examples: Sequence[Example], **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`example_to_verl_row` over a list, with ``index`` set to the position."""
    return [example_to_verl_row(ex, index=i, **kwargs) for i, ex in enumerate(examples)]
