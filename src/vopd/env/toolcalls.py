"""Tool calls in an assistant's text, in the Hermes/Qwen3 format that Qwen3 models emit.

What it knows: a call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` inside the assistant's
text (the arguments an object, or a JSON string holding one, as some models write them); a turn may hold several;
an unclosed ``<tool_call>`` (a turn cut short) or a body that is not such an object is a malformed call, kept in
order among the good ones so that each gets its own answer. What it does not know: which tools exist, what they
do, how a call is answered or rendered (the environment's and the chat template's).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call: the tool's ``name`` and its ``arguments``; ``error`` (then name and arguments are empty) when the
    call could not be read: the reason, for the tool message that answers it."""

    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def _read(body: str, closed: bool) -> ToolCall:
    if not closed:
        return ToolCall(error="malformed tool call (no </tool_call>)")
    try:
        value = json.loads(body.strip())
    except (json.JSONDecodeError, RecursionError):
        return ToolCall(error="malformed tool call (not JSON)")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return ToolCall(error="malformed tool call (no tool name)")
    args = value.get("arguments", {})
    if isinstance(args, str):  # {"arguments": "{\"expression\": ...}"}: a JSON string holding the object
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            return ToolCall(error="malformed tool call (arguments are not JSON)")
    if not isinstance(args, dict):
        return ToolCall(error="malformed tool call (arguments are not an object)")
    return ToolCall(value["name"], args)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The tool calls in ``text``, in order (empty: the turn calls no tool, a final answer)."""
    return [_read(m.group(1), m.group(0).endswith(CLOSE)) for m in _CALL.finditer(text)]
