"""Step-by-step worked solutions for integer arithmetic expressions.

Used for the demonstrations of reasoning-gym's ``chain_sum``, ``basic_arithmetic`` and ``products``.
An expression such as ``"12 + 7 + 30"`` becomes the steps ``12+7=19``, ``19+30=49``; the steps are
rendered compactly for tiny character-level models (``"12+7=19,19+30=49. Answer: 49"``) or
one per line for instruction-tuned models.

Semantics follow reasoning-gym: Python precedence, unary minus binds tightest, ``/`` is floor
division (the generators make divisions exact). reasoning-gym's parenthesis-free
``basic_arithmetic`` variant evaluates strictly left to right, so :func:`worked_steps` also tries
that order and keeps whichever reproduces the reference answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN_RE = re.compile(r"\s*(\d+|[-+*/()])")


@dataclass(frozen=True)
class Step:
    """One elementary operation ``left op right = result`` (``op == "neg"`` for ``-(left)``)."""

    left: int
    op: str
    right: int | None
    result: int

    def render(self, spaced: bool = False) -> str:
        if self.op == "neg":
            return f"-({self.left}) = {self.result}" if spaced else f"-({self.left})={self.result}"
        if spaced:
            return f"{self.left} {self.op} {self.right} = {self.result}"
        return f"{self.left}{self.op}{self.right}={self.result}"


def tokenize(expression: str) -> list[str]:
    """Split an integer expression into numbers, operators and parentheses."""
    tokens: list[str] = []
    pos = 0
    text = expression.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            raise ValueError(f"cannot tokenize {expression!r} at position {pos}")
        tokens.append(m.group(1))
        pos = m.end()
    return tokens


def compact(expression: str) -> str:
    """The expression without whitespace, e.g. ``"( 56 + -33 ) - 84"`` -> ``"(56+-33)-84"``."""
    return "".join(expression.split())


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a // b
    raise ValueError(f"unknown operator {op!r}")


class _Parser:
    """Recursive descent over tokens; emits steps in evaluation (post-)order."""

    def __init__(self, tokens: list[str], expand_products: bool):
        self.tokens = tokens
        self.i = 0
        self.steps: list[Step] = []
        self.expand_products = expand_products

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ValueError("unexpected end of expression")
        self.i += 1
        return tok

    def parse(self) -> int:
        value = self.expr()
        if self.peek() is not None:
            raise ValueError(f"unexpected token {self.peek()!r}")
        return value

    def expr(self) -> int:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term()
            value = self.binary(value, op, right)
        return value

    def term(self) -> int:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.factor()
            value = self.binary(value, op, right)
        return value

    def factor(self) -> int:
        tok = self.take()
        if tok == "-":
            if self.peek() is not None and self.peek().isdigit():
                return -int(self.take())
            inner = self.factor()
            self.steps.append(Step(inner, "neg", None, -inner))
            return -inner
        if tok == "(":
            value = self.expr()
            if self.take() != ")":
                raise ValueError("unbalanced parentheses")
            return value
        if tok.isdigit():
            return int(tok)
        raise ValueError(f"unexpected token {tok!r}")

    def binary(self, left: int, op: str, right: int) -> int:
        result = _apply(left, op, right)
        if op == "*" and self.expand_products:
            self.steps.extend(long_multiplication(left, right))
        else:
            self.steps.append(Step(left, op, right, result))
        return result


def long_multiplication(a: int, b: int) -> list[Step]:
    """``a*b`` split by the decimal places of ``b``: ``12*34`` -> 12*30, 12*4, 360+48."""
    digits = str(b)
    if a < 0 or b < 0 or len(digits) < 2:
        return [Step(a, "*", b, a * b)]
    parts = [int(d) * 10 ** (len(digits) - k - 1) for k, d in enumerate(digits) if d != "0"]
    if len(parts) < 2:
        return [Step(a, "*", b, a * b)]
    steps = [Step(a, "*", p, a * p) for p in parts]
    total = steps[0].result
    for s in steps[1 : len(parts)]:
        steps.append(Step(total, "+", s.result, total + s.result))
        total += s.result
    return steps


def evaluate_steps(expression: str, *, expand_products: bool = False) -> tuple[int, list[Step]]:
    """Value and steps of ``expression`` with the usual precedence."""
    parser = _Parser(tokenize(expression), expand_products)
    value = parser.parse()
    return value, parser.steps


def left_to_right_steps(expression: str, *, expand_products: bool = False) -> tuple[int, list[Step]]:
    """Value and steps of a parenthesis-free expression evaluated strictly left to right."""
    tokens = tokenize(expression)
    if "(" in tokens or ")" in tokens:
        raise ValueError("left-to-right evaluation needs an expression without parentheses")
    values: list[int] = []
    ops: list[str] = []
    i = 0
    expect_number = True
    while i < len(tokens):
        tok = tokens[i]
        if expect_number:
            sign = 1
            if tok == "-":
                sign, i = -1, i + 1
                tok = tokens[i] if i < len(tokens) else ""
            if not tok.isdigit():
                raise ValueError(f"expected a number in {expression!r}")
            values.append(sign * int(tok))
        else:
            ops.append(tok)
        expect_number = not expect_number
        i += 1
    if len(values) != len(ops) + 1:
        raise ValueError(f"malformed expression {expression!r}")
    steps: list[Step] = []
    value = values[0]
    for op, right in zip(ops, values[1:], strict=True):
        result = _apply(value, op, right)
        if op == "*" and expand_products:
            steps.extend(long_multiplication(value, right))
        else:
            steps.append(Step(value, op, right, result))
        value = result
    return value, steps


def worked_steps(expression: str, answer: str, *, expand_products: bool = False) -> list[Step] | None:
    """Steps whose final result equals ``answer``, or None if neither evaluation order reproduces it."""
    try:
        target = int(answer.strip())
    except ValueError:
        return None
    for evaluate in (evaluate_steps, left_to_right_steps):
        try:
            value, steps = evaluate(expression, expand_products=expand_products)
        except (ValueError, ZeroDivisionError, IndexError):
            continue
        if value == target:
            return steps
    return None


def render_solution(steps: list[Step], answer: str, *, spaced: bool = False) -> str:
    """``"12+7=19,19+30=49. Answer: 49"`` (compact) or one step per line (``spaced=True``)."""
    if spaced:
        return "".join(s.render(True) + "\n" for s in steps) + f"Answer: {answer}"
    body = ",".join(s.render() for s in steps)
    return f"{body}. Answer: {answer}" if body else f"Answer: {answer}"
