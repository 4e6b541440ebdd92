"""Code tasks: procedurally generated function-writing problems with hidden tests, and pass@k.

:class:`CodeTask` (``task.name=code_functions``) generates small problems offline, each from
one of :data:`TEMPLATES` with random constants (``"return the sum of the elements of xs that are
divisible by 7"``), ten test cases computed by the template's reference solution, and the first
``visible_examples`` of them shown in the prompt; the rest are hidden.

What a response must contain to score: a fenced code block (```` ```python ```` or a bare
```` ``` ````) that defines the named function at top level. The last block that contains
``def <name>`` is used (else the last block); a response without a closed fence scores 0.
The code runs in the :mod:`~vespo.tasks.sandbox`; the reward is 1.0 when every test passes
(or the passed fraction with ``partial_credit``).

The same scoring serves verl/Eurus-style files whose rows carry test cases
(:class:`~vespo.tasks.verl_files.VerlFileTask` detects them), and :func:`pass_at_k` /
:func:`evaluate_pass_at_k` give the unbiased pass@k estimate of Chen et al. (2021).
"""

from __future__ import annotations

import json
import math
import random
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vespo.tasks.base import Example, Task, derive_seed, in_eval_partition
from vespo.tasks.sandbox import CodeTests, Sandbox, SandboxLimits, shared_sandbox

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)
CODE_LANGS = ("", "python", "py", "python3")
ANSWER_FORMAT = "Reply with the complete function in a single ```python code block."


def extract_code(response: str, fn_name: str | None = None) -> str | None:
    """The code of the last fenced Python block (the last one defining ``fn_name`` if any does)."""
    blocks = [body for lang, body in _FENCE_RE.findall(response) if lang.lower() in CODE_LANGS]
    if not blocks:
        return None
    if fn_name:
        defining = [b for b in blocks if re.search(rf"^\s*def\s+{re.escape(fn_name)}\s*\(", b, re.M)]
        if defining:
            return defining[-1]
    return blocks[-1]


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    """One family of problems.

    ``params(rng)`` draws the constants, ``describe(p)`` says what the function returns,
    ``solution(p)`` is the reference source, ``inputs(rng, p)`` draws argument lists.
    """

    key: str
    fn_name: str
    signature: str
    params: Callable[[random.Random], dict[str, Any]]
    describe: Callable[[dict[str, Any]], str]
    solution: Callable[[dict[str, Any]], str]
    inputs: Callable[[random.Random, dict[str, Any]], list[Any]]


def _ints(rng: random.Random, lo: int = -20, hi: int = 20, n_max: int = 10) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(0, n_max))]


def _word(rng: random.Random, letters: str = "abcdefghij", n_max: int = 8) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(1, n_max)))


def _text(rng: random.Random) -> str:
    return " ".join(_word(rng, "abcdeiouxyz") for _ in range(rng.randint(0, 6)))


def _src(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


TEMPLATES: tuple[Template, ...] = (
    Template(
        "sum_multiples",
        "sum_multiples",
        "sum_multiples(xs: list[int]) -> int",
        lambda r: {"k": r.randint(2, 9)},
        lambda p: f"returns the sum of the elements of `xs` that are divisible by {p['k']}",
        lambda p: _src(f"""
            def sum_multiples(xs):
                return sum(x for x in xs if x % {p["k"]} == 0)
            """),
        lambda r, p: [_ints(r)],
    ),
    Template(
        "count_char",
        "count_char",
        "count_char(s: str) -> int",
        lambda r: {"c": r.choice("abcdefghij")},
        lambda p: f"returns how many times the character {p['c']!r} occurs in `s`",
        lambda p: _src(f"""
            def count_char(s):
                return s.count({p["c"]!r})
            """),
        lambda r, p: [_word(r, n_max=15)],
    ),
    Template(
        "shift_letters",
        "shift_letters",
        "shift_letters(s: str) -> str",
        lambda r: {"k": r.randint(1, 25)},
        lambda p: (
            f"returns `s` with every lowercase letter a-z shifted {p['k']} places forward in the "
            "alphabet, wrapping from z to a; other characters are unchanged"
        ),
        lambda p: _src(f"""
            def shift_letters(s):
                out = []
                for ch in s:
                    if "a" <= ch <= "z":
                        out.append(chr((ord(ch) - 97 + {p["k"]}) % 26 + 97))
                    else:
                        out.append(ch)
                return "".join(out)
            """),
        lambda r, p: [_text(r)],
    ),
    Template(
        "nth_term",
        "nth_term",
        "nth_term(n: int) -> int",
        lambda r: {"a": r.randint(0, 5), "m": r.randint(1, 3), "d": r.randint(-3, 5)},
        lambda p: (
            f"returns term `n` (counting from 0) of the sequence with t(0) = {p['a']} and "
            f"t(i + 1) = {p['m']} * t(i) + {p['d']}"
        ),
        lambda p: _src(f"""
            def nth_term(n):
                t = {p["a"]}
                for _ in range(n):
                    t = {p["m"]} * t + {p["d"]}
                return t
            """),
        lambda r, p: [r.randint(0, 12)],
    ),
    Template(
        "every_kth",
        "every_kth",
        "every_kth(xs: list[int]) -> list[int]",
        lambda r: {"k": r.randint(2, 5), "o": r.randint(0, 1)},
        lambda p: f"returns the elements of `xs` whose index i (from 0) satisfies i % {p['k']} == {p['o']}, in order",
        lambda p: _src(f"""
            def every_kth(xs):
                return [x for i, x in enumerate(xs) if i % {p["k"]} == {p["o"]}]
            """),
        lambda r, p: [_ints(r, n_max=14)],
    ),
    Template(
        "clamp_all",
        "clamp_all",
        "clamp_all(xs: list[int]) -> list[int]",
        lambda r: (lambda lo: {"lo": lo, "hi": lo + r.randint(1, 15)})(r.randint(-10, 5)),
        lambda p: f"returns `xs` with every element clamped to the range [{p['lo']}, {p['hi']}]",
        lambda p: _src(f"""
            def clamp_all(xs):
                return [min(max(x, {p["lo"]}), {p["hi"]}) for x in xs]
            """),
        lambda r, p: [_ints(r)],
    ),
    Template(
        "count_longer",
        "count_longer",
        "count_longer(words: list[str]) -> int",
        lambda r: {"k": r.randint(1, 6)},
        lambda p: f"returns how many strings in `words` are longer than {p['k']} characters",
        lambda p: _src(f"""
            def count_longer(words):
                return sum(len(w) > {p["k"]} for w in words)
            """),
        lambda r, p: [[_word(r) for _ in range(r.randint(0, 7))]],
    ),
    Template(
        "digit_power_sum",
        "digit_power_sum",
        "digit_power_sum(n: int) -> int",
        lambda r: {"p": r.randint(1, 4)},
        lambda p: (
            f"returns the sum of the decimal digits of the non-negative integer `n`, each raised to the power {p['p']}"
        ),
        lambda p: _src(f"""
            def digit_power_sum(n):
                return sum(int(d) ** {p["p"]} for d in str(n))
            """),
        lambda r, p: [r.randint(0, 10**6)],
    ),
    Template(
        "rotate_left",
        "rotate_left",
        "rotate_left(xs: list[int]) -> list[int]",
        lambda r: {"k": r.randint(1, 9)},
        lambda p: (
            f"returns `xs` rotated left by {p['k']} positions (element {p['k']} first; rotations wrap "
            "around for short lists; an empty list stays empty)"
        ),
        lambda p: _src(f"""
            def rotate_left(xs):
                if not xs:
                    return []
                k = {p["k"]} % len(xs)
                return xs[k:] + xs[:k]
            """),
        lambda r, p: [_ints(r)],
    ),
    Template(
        "run_length",
        "run_length",
        "run_length(s: str) -> str",
        lambda r: {"sep": r.choice(["", "-", ":"])},
        lambda p: (
            "returns the run-length encoding of `s`: each maximal run of one character becomes the "
            f"character followed by{' ' + repr(p['sep']) + ' and' if p['sep'] else ''} the run's length, "
            f"e.g. 'aab' -> {'a' + p['sep'] + '2b' + p['sep'] + '1'!r}"
        ),
        lambda p: _src(f"""
            def run_length(s):
                out = []
                i = 0
                while i < len(s):
                    j = i
                    while j < len(s) and s[j] == s[i]:
                        j += 1
                    out.append(s[i] + {p["sep"]!r} + str(j - i))
                    i = j
                return "".join(out)
            """),
        lambda r, p: [_word(r, "aab", n_max=12) if r.random() < 0.9 else ""],
    ),
    Template(
        "pairs_with_sum",
        "pairs_with_sum",
        "pairs_with_sum(xs: list[int]) -> int",
        lambda r: {"t": r.randint(-5, 15)},
        lambda p: f"returns the number of index pairs i < j with xs[i] + xs[j] == {p['t']}",
        lambda p: _src(f"""
            def pairs_with_sum(xs):
                return sum(
                    1 for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[i] + xs[j] == {p["t"]}
                )
            """),
        lambda r, p: [_ints(r, -5, 15)],
    ),
    Template(
        "max_window_sum",
        "max_window_sum",
        "max_window_sum(xs: list[int]) -> int",
        lambda r: {"k": r.randint(2, 4)},
        lambda p: (
            f"returns the largest sum of {p['k']} consecutive elements of `xs`, or 0 if `xs` has fewer "
            f"than {p['k']} elements"
        ),
        lambda p: _src(f"""
            def max_window_sum(xs):
                if len(xs) < {p["k"]}:
                    return 0
                return max(sum(xs[i:i + {p["k"]}]) for i in range(len(xs) - {p["k"]} + 1))
            """),
        lambda r, p: [_ints(r)],
    ),
    Template(
        "first_unique",
        "first_unique",
        "first_unique(xs: list[int]) -> list[int]",
        lambda r: {"k": r.randint(2, 6)},
        lambda p: (
            "returns the distinct values of `xs` in order of first occurrence, keeping at most the "
            f"first {p['k']} of them"
        ),
        lambda p: _src(f"""
            def first_unique(xs):
                seen = []
                for x in xs:
                    if x not in seen:
                        seen.append(x)
                return seen[:{p["k"]}]
            """),
        lambda r, p: [_ints(r, 0, 6, 12)],
    ),
    Template(
        "steps_to_zero",
        "steps_to_zero",
        "steps_to_zero(n: int) -> int",
        lambda r: {"k": r.randint(2, 5)},
        lambda p: (
            "returns how many steps take the non-negative integer `n` to 0, where a step divides n by "
            f"{p['k']} if n is divisible by {p['k']} and otherwise subtracts 1"
        ),
        lambda p: _src(f"""
            def steps_to_zero(n):
                steps = 0
                while n > 0:
                    n = n // {p["k"]} if n % {p["k"]} == 0 else n - 1
                    steps += 1
                return steps
            """),
        lambda r, p: [r.randint(0, 500)],
    ),
    Template(
        "to_base",
        "to_base",
        "to_base(n: int) -> str",
        lambda r: {"b": r.randint(2, 9)},
        lambda p: f"returns the non-negative integer `n` written in base {p['b']} as a string of digits ('0' for 0)",
        lambda p: _src(f"""
            def to_base(n):
                if n == 0:
                    return "0"
                digits = []
                while n:
                    digits.append(str(n % {p["b"]}))
                    n //= {p["b"]}
                return "".join(reversed(digits))
            """),
        lambda r, p: [r.randint(0, 5000)],
    ),
    Template(
        "weighted_sum",
        "weighted_sum",
        "weighted_sum(xs: list[int]) -> int",
        lambda r: {"o": r.randint(1, 4)},
        lambda p: f"returns the sum of xs[i] * (i + {p['o']}) over every index i (from 0)",
        lambda p: _src(f"""
            def weighted_sum(xs):
                return sum(x * (i + {p["o"]}) for i, x in enumerate(xs))
            """),
        lambda r, p: [_ints(r)],
    ),
    Template(
        "top_sum",
        "top_sum",
        "top_sum(xs: list[int]) -> int",
        lambda r: {"k": r.randint(1, 4)},
        lambda p: f"returns the sum of the {p['k']} largest elements of `xs` (of all of them if there are fewer)",
        lambda p: _src(f"""
            def top_sum(xs):
                return sum(sorted(xs, reverse=True)[:{p["k"]}])
            """),
        lambda r, p: [_ints(r)],
    ),
    Template(
        "replace_vowels",
        "replace_vowels",
        "replace_vowels(s: str) -> str",
        lambda r: {"c": r.choice("*#_xz")},
        lambda p: f"returns `s` with every vowel (a, e, i, o, u, lowercase or uppercase) replaced by {p['c']!r}",
        lambda p: _src(f"""
            def replace_vowels(s):
                return "".join({p["c"]!r} if ch in "aeiouAEIOU" else ch for ch in s)
            """),
        lambda r, p: [_text(r).title() if r.random() < 0.3 else _text(r)],
    ),
    Template(
        "coprime_count",
        "coprime_count",
        "coprime_count(xs: list[int]) -> int",
        lambda r: {"k": r.choice([6, 10, 12, 14, 15, 21, 30])},
        lambda p: f"returns how many elements x of `xs` have gcd(x, {p['k']}) == 1",
        lambda p: _src(f"""
            import math


            def coprime_count(xs):
                return sum(math.gcd(x, {p["k"]}) == 1 for x in xs)
            """),
        lambda r, p: [_ints(r, 0, 60)],
    ),
    Template(
        "fizz",
        "fizz",
        "fizz(n: int) -> list[str]",
        lambda r: (lambda a: {"a": a, "b": r.choice([b for b in range(2, 8) if b != a])})(r.randint(2, 7)),
        lambda p: (
            f"returns a list with one string for each i from 1 to n: 'FizzBuzz' if i is divisible by "
            f"both {p['a']} and {p['b']}, 'Fizz' if only by {p['a']}, 'Buzz' if only by {p['b']}, "
            "else str(i)"
        ),
        lambda p: _src(f"""
            def fizz(n):
                out = []
                for i in range(1, n + 1):
                    if i % {p["a"]} == 0 and i % {p["b"]} == 0:
                        out.append("FizzBuzz")
                    elif i % {p["a"]} == 0:
                        out.append("Fizz")
                    elif i % {p["b"]} == 0:
                        out.append("Buzz")
                    else:
                        out.append(str(i))
                return out
            """),
        lambda r, p: [r.randint(0, 20)],
    ),
    Template(
        "bracket_depth",
        "bracket_depth",
        "bracket_depth(s: str) -> int",
        lambda r: {"pair": r.choice(["()", "[]", "{}", "<>"])},
        lambda p: (
            f"returns the maximum nesting depth of {p['pair'][0]!r}/{p['pair'][1]!r} brackets in `s` "
            "(other characters are ignored), or -1 if they are unbalanced"
        ),
        lambda p: _src(f"""
            def bracket_depth(s):
                depth = best = 0
                for ch in s:
                    if ch == {p["pair"][0]!r}:
                        depth += 1
                        best = max(best, depth)
                    elif ch == {p["pair"][1]!r}:
                        depth -= 1
                        if depth < 0:
                            return -1
                return best if depth == 0 else -1
            """),
        lambda r, p: ["".join(r.choice(p["pair"] + "ab") for _ in range(r.randint(0, 12)))],
    ),
)
TEMPLATE_KEYS: tuple[str, ...] = tuple(t.key for t in TEMPLATES)
_BY_KEY = {t.key: t for t in TEMPLATES}


def _reference(source: str, fn_name: str) -> Callable[..., Any]:
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<reference {fn_name}>", "exec"), namespace)  # noqa: S102 - our own source
    return namespace[fn_name]


def _call_repr(fn_name: str, args: list[Any]) -> str:
    return f"{fn_name}({', '.join(repr(a) for a in args)})"


# --------------------------------------------------------------------------- task

CODE_TASK_NAMES: tuple[str, ...] = ("code_functions",)
_PARAM_KEYS = ("templates", "num_tests", "visible_examples", "partial_credit", "sandbox", "sandbox_workers")


def score_code(
    responses: Sequence[str],
    examples: Sequence[Example],
    sandbox: Sandbox,
    partial_credit: bool = False,
) -> list[float]:
    """Scores of code responses against each example's tests (``ground_truth``), in one batch."""
    scores = [0.0] * len(responses)
    jobs, where = [], []
    for k, (response, example) in enumerate(zip(responses, examples, strict=True)):
        tests = code_tests_of(example)
        code = extract_code(response, tests.fn_name)
        if code is None or not tests.inputs:
            continue
        jobs.append((code, tests))
        where.append(k)
    for k, result in zip(where, sandbox.run_many(jobs, stop_at_failure=not partial_credit)):
        scores[k] = result.score(partial_credit)
    return scores


_TESTS_CACHE: dict[str, CodeTests] = {}


def code_tests_of(example: Example) -> CodeTests:
    """The example's test cases (its ``ground_truth`` in the Eurus/APPS schema), cached."""
    key = example.ground_truth
    tests = _TESTS_CACHE.get(key)
    if tests is None:
        tests = CodeTests.parse(key)
        if len(_TESTS_CACHE) > 4096:
            _TESTS_CACHE.clear()
        _TESTS_CACHE[key] = tests
    return tests


def is_code_example(example: Example) -> bool:
    """True for rows with test cases: ``ability == "code"`` or a ground truth with inputs/outputs."""
    if example.metadata.get("ability") == "code":
        return True
    text = example.ground_truth.lstrip()
    if not text.startswith("{") or '"inputs"' not in text:
        return False
    try:
        code_tests_of(example)
    except (ValueError, TypeError):
        return False
    return True


class CodeTask(Task):
    """Procedurally generated function-writing problems, scored in the sandbox.

    Args:
        name: ``"code_functions"``.
        params: ``templates`` (subset of :data:`TEMPLATE_KEYS`), ``num_tests`` (10),
            ``visible_examples`` (2, shown in the prompt), ``partial_credit`` (False: 1.0 only
            when every test passes), ``sandbox`` (:class:`SandboxLimits` fields, e.g.
            ``{"case_timeout_s": 1.0}``), ``sandbox_workers`` (2).
        prompt_style: ``"instruct"`` (one chat message) or ``"plain"`` (the same text).
        eval_fraction: share of the problem space held out for evaluation (by prompt hash).
    """

    #: scoring only sends code to the sandbox's own processes, which contain it
    score_in_process = True

    def __init__(
        self,
        name: str = "code_functions",
        params: dict[str, Any] | None = None,
        *,
        prompt_style: str = "instruct",
        eval_fraction: float = 0.1,
        partial_credit: bool | None = None,
    ):
        if name not in CODE_TASK_NAMES:
            raise ValueError(f"unknown code task {name!r}; valid: {', '.join(CODE_TASK_NAMES)}")
        params = dict(params or {})
        unknown = sorted(k for k in params if k not in _PARAM_KEYS)
        if unknown:
            raise ValueError(
                f"code task {name!r} has no parameter(s) {', '.join(unknown)}; valid params: {', '.join(_PARAM_KEYS)}"
            )
        keys = params.get("templates") or list(TEMPLATE_KEYS)
        bad = [k for k in keys if k not in _BY_KEY]
        if bad:
            raise ValueError(f"unknown code template(s) {', '.join(bad)}; valid: {', '.join(TEMPLATE_KEYS)}")
        if prompt_style not in ("plain", "instruct"):
            raise ValueError(f"prompt_style must be plain or instruct, got {prompt_style!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
        self.name = name
        self.params = params
        self.templates = [_BY_KEY[k] for k in keys]
        self.num_tests = int(params.get("num_tests", 10))
        self.visible = int(params.get("visible_examples", 2))
        if self.num_tests < 1 or not 0 <= self.visible <= self.num_tests:
            raise ValueError("need num_tests >= 1 and 0 <= visible_examples <= num_tests")
        self.partial_credit = bool(params.get("partial_credit", False) if partial_credit is None else partial_credit)
        self.limits = SandboxLimits(**(params.get("sandbox") or {}))
        self.sandbox_workers = int(params.get("sandbox_workers", 2))
        self.prompt_style = prompt_style
        self.eval_fraction = float(eval_fraction)
        self.data_source = f"vespo/{name}"

    def __repr__(self) -> str:
        return f"CodeTask({self.name!r}, {len(self.templates)} templates, prompt_style={self.prompt_style!r})"

    @property
    def spec(self) -> dict[str, Any]:
        """The :func:`~vespo.tasks.build_task` spec that rebuilds this task."""
        return {
            "kind": "reasoning_gym",
            "name": self.name,
            "params": dict(self.params),
            "prompt_style": self.prompt_style,
            "eval_fraction": self.eval_fraction,
        }

    @property
    def sandbox(self) -> Sandbox:
        """The process-wide sandbox for this task's limits (started on first use)."""
        return shared_sandbox(self.limits, self.sandbox_workers)

    # ------------------------------------------------------------------ examples

    def _problem(self, rng: random.Random) -> tuple[Template, dict[str, Any], str, CodeTests, str]:
        template = rng.choice(self.templates)
        p = template.params(rng)
        source = template.solution(p)
        fn = _reference(source, template.fn_name)
        inputs: list[list[Any]] = []
        seen: set[str] = set()
        for _ in range(self.num_tests * 20):
            args = template.inputs(rng, p)
            key = json.dumps(args)
            if key not in seen:
                seen.add(key)
                inputs.append(args)
            if len(inputs) == self.num_tests:
                break
        outputs = [fn(*json.loads(json.dumps(a))) for a in inputs]
        tests = CodeTests(inputs, outputs, template.fn_name)
        lines = [f"Write a Python function `{template.signature}` that {template.describe(p)}."]
        if self.visible:
            lines.append("")
            lines.append("For example:")
            for args, out in list(zip(inputs, outputs))[: self.visible]:
                lines.append(f"    {_call_repr(template.fn_name, args)} == {out!r}")
        lines += ["", ANSWER_FORMAT]
        return template, p, "\n".join(lines), tests, source

    def _collect(self, split: str, n: int, seed: int) -> list[Example]:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        want_eval = split == "eval"
        rng = random.Random(derive_seed("code", self.name, split, seed))
        out: list[Example] = []
        seen: set[str] = set()
        attempts, budget = 0, n * 50 + 2000
        while len(out) < n and attempts < budget:
            attempts += 1
            template, p, text, tests, source = self._problem(rng)
            key = text.split("\n\nFor example:")[0]  # the problem, whatever its examples
            if in_eval_partition(key, self.eval_fraction) != want_eval or (want_eval and key in seen):
                continue
            seen.add(key)
            prompt: Any = [{"role": "user", "content": text}] if self.prompt_style == "instruct" else text + "\n"
            out.append(
                Example(
                    prompt=prompt,
                    ground_truth=tests.to_json(),
                    data_source=self.data_source,
                    metadata={
                        "ability": "code",
                        "template": template.key,
                        "params": p,
                        "fn_name": template.fn_name,
                        "solution": source,
                        "split": split,
                    },
                    uid=f"{self.name}/{split}/{seed}/{len(out)}",
                )
            )
        if len(out) < n and not want_eval:
            raise ValueError(f"code task: only {len(out)} train problems generated for n={n}")
        return out

    def train_examples(self, n: int, seed: int = 0) -> list[Example]:
        """``n`` training problems (problems may repeat with different tests)."""
        return self._collect("train", n, seed)

    def eval_examples(self, n: int, seed: int = 0) -> list[Example]:
        """Up to ``n`` unique eval problems, disjoint from every train problem."""
        return self._collect("eval", n, seed)

    # ------------------------------------------------------------------ scoring

    def score(self, response: str, example: Example) -> float:
        return self.score_many([response], [example])[0]

    def score_many(self, responses: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """Scores of a batch, evaluated ``sandbox_workers`` at a time."""
        return score_code(responses, examples, self.sandbox, self.partial_credit)

    def demonstration(self, example: Example) -> str | None:
        """The reference solution in a ```python block."""
        source = example.metadata.get("solution")
        return f"```python\n{source}```" if source else None


# --------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_report(passed: Sequence[Sequence[bool]], ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Mean pass@k over problems (``passed[i][j]``: sample j of problem i passed); k > n skipped."""
    report: dict[str, float] = {}
    for k in ks:
        values = [pass_at_k(len(p), sum(map(bool, p)), k) for p in passed if len(p) >= k]
        if values:
            report[f"pass@{k}"] = sum(values) / len(values)
    return report


def evaluate_pass_at_k(
    task: Task,
    examples: Sequence[Example],
    responses: Sequence[Sequence[str]],
    ks: Sequence[int] = (1, 10),
    score: Callable[[list[str], list[Example]], list[float]] | None = None,
) -> dict[str, float]:
    """pass@k of ``responses[i]`` (samples for ``examples[i]``); a sample passes when it scores 1.0.

    ``score`` defaults to the task's ``score_many`` (or ``score``); pass a
    :class:`~vespo.tasks.rewards.RewardRunner`'s ``lambda r, e: runner.score_batch(r, e)[0]``
    to score through its workers.
    """
    if len(examples) != len(responses):
        raise ValueError(f"{len(examples)} examples but {len(responses)} response lists")
    flat_r = [r for rs in responses for r in rs]
    flat_e = [ex for ex, rs in zip(examples, responses) for _ in rs]
    if score is None:
        many = getattr(task, "score_many", None)
        score = many if callable(many) else (lambda rs, es: [task.score(r, e) for r, e in zip(rs, es)])
    scores = score(flat_r, flat_e)
    passed, pos = [], 0
    for rs in responses:
        passed.append([s >= 1.0 for s in scores[pos : pos + len(rs)]])
        pos += len(rs)
    report = pass_at_k_report(passed, ks)
    report["problems"] = float(len(examples))
    return report
