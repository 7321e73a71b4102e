"""The tool world's calculator: its declaration, a safe evaluator, and tool calls written and read in the Hermes/Qwen3
format (docs/tiny_world.md, "The tool world").

This is the world's own copy of the calculator the agentic environment serves, written to the same contract so that
the world's SFT traces hold exactly the tool messages a run on it will see: a call is
``<tool_call>\\n{"name": "calculator", "arguments": {"expression": "45*123"}}\\n</tool_call>`` inside the assistant's
text; the result is the value as plain text ("5535"; an exact division as an integer, else a decimal with at most 6
decimals), an error is ``error: <reason>``.

What it knows: the calculator's JSON declaration (``CALCULATOR_TOOL``), how to evaluate an integer expression
(+ - * / // % **, parentheses, unary minus; no names, no calls) from its syntax tree (never ``eval``), how to render a
call and how to find and answer the calls in an assistant's text. What it does not know: templates, tokens, models,
or what an episode is.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

TOOL_NAME = "calculator"
#: The declaration passed to the chat template (``apply_chat_template(..., tools=[CALCULATOR_TOOL])``), as Hugging
#: Face's tool-use docs write one; kept short because the template writes it into every prompt.
CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Evaluate an integer arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 45*123"}},
            "required": ["expression"],
        },
    },
}
TOOLS: list[dict[str, Any]] = [CALCULATOR_TOOL]

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MALFORMED = "error: malformed tool call"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
#: Bounds that keep one evaluation cheap: an exponent's size, and the size of any intermediate value.
MAX_EXPONENT = 100
MAX_BITS = 4096
MAX_CHARS = 200


class CalculatorError(Exception):
    """An expression the calculator refuses; the message is the reason after "error: "."""


_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}


def _binary(op: str, a: Fraction, b: Fraction) -> Fraction:
    if op in ("/", "//", "%") and b == 0:
        raise CalculatorError("division by zero")
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    if op == "//":
        return Fraction(a // b)
    if op == "%":
        return a % b
    if b.denominator != 1 or abs(b) > MAX_EXPONENT:
        raise CalculatorError(f"exponent must be an integer in [-{MAX_EXPONENT}, {MAX_EXPONENT}]")
    if a == 0 and b < 0:
        raise CalculatorError("division by zero")
    if max(abs(a.numerator), a.denominator).bit_length() * abs(int(b)) > MAX_BITS:
        raise CalculatorError("result too large")
    return a ** int(b)


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _value(node.operand)
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        out = _binary(_BINARY[type(node.op)], _value(node.left), _value(node.right))
        if max(abs(out.numerator), out.denominator).bit_length() > MAX_BITS:
            raise CalculatorError("result too large")
        return out
    raise CalculatorError("unsupported syntax")


def format_value(value: Fraction) -> str:
    """An integer as itself; any other value as a decimal rounded to 6 places, trailing zeros dropped."""
    if value.denominator == 1:
        return str(value.numerator)
    scaled = round(abs(value) * 10**6)
    whole, frac = divmod(scaled, 10**6)
    digits = f"{frac:06d}".rstrip("0")
    sign = "-" if value < 0 and scaled else ""
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def evaluate(expression: str) -> str:
    """The calculator's answer to ``expression``: its value as text, or ``error: <reason>``."""
    if len(expression) > MAX_CHARS:
        return f"error: expression longer than {MAX_CHARS} characters"
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return "error: unsupported syntax"
    try:
        return format_value(_value(tree.body))
    except CalculatorError as exc:
        return f"error: {exc}"


def render_call(expression: str) -> str:
    """The text of one calculator call, as a Qwen3 model writes it."""
    body = json.dumps({"name": TOOL_NAME, "arguments": {"expression": expression}}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


@dataclass(frozen=True)
class ToolCall:
    """One call found in an assistant's text: its ``name`` and ``arguments``, or ``arguments is None`` when the text
    between the tags is not a JSON object with a string ``name`` and an object ``arguments``."""

    name: str
    arguments: dict[str, Any] | None


def parse_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>...</tool_call>`` block in ``text``, in order ([]: the text is a final answer)."""
    calls = []
    for match in _CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            body = None
        ok = isinstance(body, dict) and isinstance(body.get("name"), str) and isinstance(body.get("arguments"), dict)
        calls.append(ToolCall(body["name"], body["arguments"]) if ok and isinstance(body, dict) else ToolCall("", None))
    return calls


def answer_call(call: ToolCall) -> str:
    """The tool message's content for one call (an ``error: ...`` for a malformed call or another tool)."""
    if call.arguments is None:
        return MALFORMED
    if call.name != TOOL_NAME:
        return f"error: unknown tool {call.name!r}"
    expression = call.arguments.get("expression")
    if set(call.arguments) != {"expression"} or not isinstance(expression, str):
        return MALFORMED
    return evaluate(expression)


def is_error(content: str) -> bool:
    return content.startswith("error: ")
