"""The environment seam of multi-turn rollouts (``rollout.env``): what an environment is, and how one is named.

What it knows: the ``Env`` protocol (started from a data row's first messages; then ``step(assistant text)`` gives
the messages to append, tool results or a user turn, or says the episode is done, with an optional final reward
kept for metrics only), the frozen ``Reply`` it returns, the tools it declares to the chat template, and
``load_env``: ``calculator`` (``vopd.env.calculator``) or a user class by import path ``package.module:Name``, with a
one-line error for a path that does not lead to one. What it does not know: tokens, chat templates, models, the
episode loop (``vopd.episodes``), or how a call is bounded in time and size (``vopd.env.calls``). The
types live in ``vopd.env.base`` (re-exported here), so that the built-in environments can import them.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Any

from vopd.env.base import Env, EnvFactory, Message, Reply
from vopd.errors import UserError

if TYPE_CHECKING:
    from vopd.prompts import ChatOptions

__all__ = ["BUILT_IN", "Env", "EnvFactory", "Message", "Reply", "check_spec", "env_chat", "load_env", "tools_of"]

_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
BUILT_IN = ("calculator",)


def check_spec(spec: str) -> None:
    """``rollout.env`` is empty, a built-in name or ``package.module:Name``: a one-line error otherwise (nothing
    is imported)."""
    if spec and spec not in BUILT_IN and not _PATH.match(spec):
        raise UserError(f"config key rollout.env={spec!r} is invalid: it must be empty (single turn), "
                        f"{' or '.join(BUILT_IN)}, or an import path package.module:Name")


def load_env(spec: str) -> EnvFactory:
    """The factory of ``rollout.env``: the built-in calculator, or the class (any callable without arguments)
    ``Name`` of the importable module ``package.module``; one-line ``UserError`` when it cannot be found."""
    check_spec(spec)
    if spec == "calculator":
        from vopd.env.calculator import Calculator

        return Calculator
    module_name, name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own failure at import
        raise UserError(f"rollout.env={spec}: cannot import {module_name} ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:160]}); put it on PYTHONPATH or fix the path") from None
    found = getattr(module, name, None)
    if not callable(found):
        raise UserError(f"rollout.env={spec}: module {module_name} has no class {name}; name a class defined there")
    return found  # a user's class: each instance is checked by vopd.env.calls


def tools_of(factory: EnvFactory, spec: str) -> list[dict[str, Any]]:
    """The tools an environment declares (read from one instance), checked to be a list of objects."""
    try:
        tools = getattr(factory(), "tools", [])
    except Exception as exc:
        raise UserError(f"rollout.env={spec}: building the environment failed ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:160]})") from None
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
        raise UserError(f"rollout.env={spec}: its tools must be a list of tool schemas (objects), got "
                        f"{type(tools).__name__}")
    return list(tools)


def env_chat(chat: ChatOptions, tools: list[dict[str, Any]]) -> ChatOptions:
    """How an environment's rows are rendered: through the chat template always (an environment's messages are
    chat turns; a text row becomes a user turn), its tools declared to the template (``tools=``) when it has any."""
    from vopd.prompts import ChatOptions

    kwargs = {**chat.template_kwargs, **({"tools": tools} if tools else {})}
    return ChatOptions(chat.system_prompt, kwargs, text_as_chat=True)
