"""A strict numeric reward for chat models that state their final answer in their own words.

SmolLM2-135M-Instruct, asked for a last line ``Answer: <x>``, writes ``The answer is 79.`` or
``The answer is: 79`` instead (94-100 % of its greedy responses have no ``Answer:`` marker,
benchmarks/results/smollm2_probe.json). :func:`score` accepts the usual ways of *stating* a final
answer and nothing else:

    what scores 1.0:  an answer statement -- ``Answer: X``, ``answer is X``, ``answer is: X``,
                      ``answer = X`` (any case, ``final``/``the`` optional, ``**``/``$`` around X
                      allowed) or ``\\boxed{X}`` -- whose number X (the first number right after the
                      LAST such statement) equals the reference answer exactly (numerically).
    what scores 0.0:  a wrong number after the last statement; a statement followed by no number.
    unparsed (None):  no answer statement at all. The reward runner scores it 0 and counts it
                      (``reward/unparsed``), so a format the reward cannot read is visible, not a
                      silent zero.

So format alone never scores (the number must be right), numbers elsewhere in the working are
ignored (writing every candidate number does not help: only the last statement counts), and an
unreadable response is counted separately from a wrong one.

Use it with ``task.reward_fn: vespo.tasks.final_answer:score`` on reasoning-gym tasks with numeric
answers (chain_sum, products, basic_arithmetic).
"""

from __future__ import annotations

import math
import re

from vespo.tasks.base import Example

__all__ = ["extract_final_number", "score"]

_STATEMENT = re.compile(
    r"(?:answer\s*(?:is\s*:?|:|=)|\\boxed\s*\{)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"^[\s*$\\(]*([-+−]?\d[\d,]*(?:\.\d+)?)")


def extract_final_number(text: str) -> tuple[bool, float | None]:
    """``(has_statement, number)``: whether the text states an answer, and the number after the last statement."""
    matches = list(_STATEMENT.finditer(text))
    if not matches:
        return False, None
    rest = text[matches[-1].end() :]
    m = _NUMBER.match(rest)
    if m is None:
        return True, None
    raw = m.group(1).replace(",", "").replace("−", "-")
    try:
        return True, float(raw)
    except ValueError:
        return True, None


def score(response: str, example: Example) -> float | None:
    """1.0 if the last answer statement gives the reference number, 0.0 if not, None if there is none."""
    has_statement, value = extract_final_number(response)
    if not has_statement:
        return None
    if value is None:
        return 0.0
    try:
        gold = float(str(example.ground_truth).strip().replace(",", ""))
    except ValueError:
        return 0.0
    if not math.isfinite(gold):
        return 0.0
    return 1.0 if abs(value - gold) <= 1e-9 * max(1.0, abs(gold)) else 0.0
