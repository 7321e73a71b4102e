"""The types of the environment seam: a chat message, an environment's ``Reply`` and the ``Env`` protocol.

What it knows: the shapes an environment receives and returns (``vopd.env`` says how one is named and loaded,
``vopd.env.calls`` how its calls are bounded). What it does not know: any environment, tokens, templates, models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, TypeAlias

#: One chat turn: {"role": ..., "content": text} (a tool message also has "name").
Message: TypeAlias = dict[str, str]
#: Builds one environment per episode.
EnvFactory: TypeAlias = Callable[[], "Env"]


@dataclass(frozen=True)
class Reply:
    """An environment's answer to one assistant turn: ``messages`` to append (roles ``tool``, ``user`` or
    ``system``, text content), or ``done`` (the episode ends after that turn; ``messages`` are then ignored);
    ``reward``: a final score of the episode, logged, never trained on."""

    messages: tuple[Message, ...] = ()
    done: bool = False
    reward: float | None = None


class Env(Protocol):
    """One episode's environment. ``tools``: the tool schemas declared to the chat template (``tools=``: e.g.
    ``[{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}]``; empty for
    none). ``start`` receives the row's first messages; ``step`` each assistant turn's text (its tool calls
    verbatim), the end-of-turn token left out. A tool message whose content starts with ``error:`` counts as a tool
    error (docs/metrics.md)."""

    tools: list[dict[str, Any]]

    def start(self, messages: Sequence[Message]) -> None: ...

    def step(self, assistant: str) -> Reply: ...


def is_tool_error(content: str) -> bool:
    """Whether a tool message's content reports an error (``error: <reason>``, docs/metrics.md)."""
    return content.lstrip().startswith("error:")
