"""The built-in ``calculator`` environment (``rollout.env=calculator``): a safe arithmetic tool.

What it knows: the one tool it declares to the chat template (``calculator``, one argument ``expression``); how an
expression is evaluated without Python's ``eval``: parsed into an AST and walked, allowing only integer literals,
``+ - * / // % **``, unary minus/plus and parentheses, in exact rational arithmetic (``fractions.Fraction``), with an
exponent, an intermediate value and an expression length bounded so that no input can take long or use much
memory; how a value is written (an exact integer as one, else a decimal of at most 6 decimals); and that a turn with
tool calls is answered by one tool message per call (``error: <reason>`` for a call it cannot serve), a turn
without one ends the episode. What it does not know: the chat template, tokens, the model, rewards (it gives none).
"""

from __future__ import annotations

import ast
import json
import operator
from fractions import Fraction
from typing import Any, Callable, Sequence

from vopd.env.base import Message, Reply
from vopd.env.toolcalls import CLOSE, OPEN, ToolCall, parse_tool_calls

NAME = "calculator"
#: The longest expression read, in characters.
MAX_CHARS = 200
#: The largest exponent of ``**`` and the most bits of any value along the way (about 300 decimal digits).
MAX_EXPONENT = 100
MAX_BITS = 1000

TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": NAME,
    "description": "Evaluate an arithmetic expression over integers: + - * / // % ** and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {
        "type": "string", "description": "The expression, e.g. 123*456 or (7 - 2) ** 3 // 4"}},
        "required": ["expression"]}}}


class CalcError(Exception):
    """An expression the calculator refuses; its message is the reason the tool message gives."""


_BINARY: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: lambda a, b: Fraction(a // b), ast.Mod: operator.mod}


def _bounded(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise CalcError("number too large")
    return value


def _power(base: Fraction, exp: Fraction) -> Fraction:
    if exp.denominator != 1:
        raise CalcError("non-integer exponent")
    if abs(exp) > MAX_EXPONENT:
        raise CalcError(f"exponent larger than {MAX_EXPONENT}")
    bits = max(base.numerator.bit_length(), base.denominator.bit_length())
    if bits * abs(exp.numerator) > MAX_BITS:  # checked before computing: the power itself would be the cost
        raise CalcError("number too large")
    return Fraction(base ** int(exp))


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:  # bool is an int subclass: refused with floats, strings and the rest
            raise CalcError("only integers are supported")
        return _bounded(Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _value(node.operand)
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp) and (isinstance(node.op, ast.Pow) or type(node.op) in _BINARY):
        left, right = _value(node.left), _value(node.right)
        try:
            if isinstance(node.op, ast.Pow):
                return _bounded(_power(left, right))
            return _bounded(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalcError("division by zero") from None
    if isinstance(node, (ast.Name, ast.Call, ast.Attribute, ast.Subscript)):
        raise CalcError("unsupported syntax (names and calls are not allowed)")
    raise CalcError("unsupported syntax")


def evaluate(expression: str) -> Fraction:
    """The exact value of ``expression``, or ``CalcError`` with the reason."""
    if len(expression) > MAX_CHARS:
        raise CalcError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalcError("unsupported syntax") from None
    try:
        return _value(tree.body)
    except RecursionError:  # deeply nested parentheses
        raise CalcError("expression nested too deeply") from None


def show(value: Fraction) -> str:
    """``value`` as the tool writes it: an integer exactly, else a decimal rounded to 6 decimals (trailing zeros
    dropped), or 6 significant digits for a value that rounds to 0 there."""
    if value.denominator == 1:
        return str(value.numerator)
    scaled = round(value * 10**6)
    if scaled == 0:
        return f"{float(value):.6g}"
    sign, digits = ("-" if scaled < 0 else ""), f"{abs(scaled):07d}"
    whole, frac = digits[:-6], digits[-6:].rstrip("0")
    return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"


def answer(expression: object) -> str:
    """The tool message's content for one call's ``expression``: its value, or ``error: <reason>``."""
    if not isinstance(expression, str) or not expression.strip():
        return "error: malformed tool call (no expression)"
    try:
        return show(evaluate(expression))
    except CalcError as exc:
        return f"error: {exc}"


class Calculator:
    """The ``calculator`` environment: stateless; each tool call in a turn gets one tool message."""

    tools: list[dict[str, Any]] = [TOOL]

    def start(self, messages: Sequence[Message]) -> None:
        """Nothing to set up: every episode is answered alike."""

    def step(self, assistant: str) -> Reply:
        calls = parse_tool_calls(assistant)
        if not calls:
            return Reply(done=True)
        return Reply(tuple({"role": "tool", "name": NAME, "content": answer_call(c)} for c in calls))


def answer_call(call: ToolCall) -> str:
    """The tool message's content for one parsed call: its value, or ``error: <reason>`` (a malformed call,
    another tool's name, a bad expression)."""
    if call.error:
        return f"error: {call.error}"
    if call.name != NAME:
        return f"error: unknown tool {call.name[:40]!r} (the only tool is {NAME})"
    return answer(call.arguments.get("expression"))


def render_call(expression: str) -> str:
    """The text of one calculator call as a Qwen3 model writes it (``vopd.env.toolcalls``' format)."""
    body = json.dumps({"name": NAME, "arguments": {"expression": expression}}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"
