"""The pre-flight of an agent run (``rollout.env``): what the chat templates must do for multi-turn rollouts.

What it knows: one probe episode with tools (a question, an assistant turn that calls the environment's first tool,
its tool answer, a final assistant turn), rendered through a chat template with the environment's tools declared.
Three properties are checked, each a one-line ``UserError`` naming what differs and the fix:

1. **Same ids for student and teacher**: every teacher with a tokenizer of its own renders the probe episode to the
   student's ids; otherwise it would score tool answers and framing in a format it was not trained on (a renderer
   mismatch biases every token: docs/real_models.md, "Multi-turn rollouts with tools").
2. **The template extends**: the text of the episode after a tool answer (with the generation prompt) begins with
   the text up to the assistant's turn, so that the environment's tokens can be appended to what was sampled
   without re-tokenising it (``vopd.episodes``). Templates that rewrite earlier turns (strip reasoning, renumber
   calls) fail here.
3. **Tool calls round-trip**: the assistant's tool call, rendered and decoded, parses back to the same call
   (``vopd.env.toolcalls``).

What it does NOT know: how episodes are sampled, the environment's semantics (only its ``tools``), or the loss.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from vopd.env import env_chat
from vopd.env.toolcalls import CLOSE, OPEN, parse_tool_calls
from vopd.errors import UserError
from vopd.prompts import chat_ids

if TYPE_CHECKING:
    from vopd.env.base import Message
    from vopd.models import Tokenizer
    from vopd.prompts import ChatOptions


def probe_call(tools: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """A call of the environment's first tool (its name, one example value per required string/number argument),
    or a call of a tool named ``tool`` when it declares none."""
    fn = (tools[0].get("function", tools[0]) if tools else {}) or {}
    name = str(fn.get("name") or "tool")
    params = fn.get("parameters") or {}
    props = params.get("properties") or {} if isinstance(params, dict) else {}
    args: dict[str, Any] = {}
    for key, schema in props.items() if isinstance(props, dict) else []:
        kind = schema.get("type") if isinstance(schema, dict) else None
        args[str(key)] = 12 if kind in ("integer", "number") else "12*34"
    return name, args


def probe_episode(tools: list[dict[str, Any]], chat: ChatOptions) -> tuple[list[Message], str]:
    """(the probe episode's messages, the assistant's tool-call text): user, assistant (call), tool, assistant."""
    name, args = probe_call(tools)
    call = f"{OPEN}\n{json.dumps({'name': name, 'arguments': args})}\n{CLOSE}"
    messages: list[Message] = [{"role": "user", "content": "What is 12 * 34?"},
                               {"role": "assistant", "content": call},
                               {"role": "tool", "name": name, "content": "408"},
                               {"role": "assistant", "content": "The answer is 408."}]
    if chat.system_prompt:
        messages.insert(0, {"role": "system", "content": chat.system_prompt})
    return messages, call


def _render(tok: Tokenizer, messages: list[Message], chat: ChatOptions, *, gen: bool, who: str) -> list[int]:
    return chat_ids(tok, messages, add_generation_prompt=gen, kwargs=chat.template_kwargs,
                    where=f"the pre-flight's probe episode with tools ({who})")


def _text(tok: Tokenizer, ids: list[int]) -> str:
    return str(tok.decode(ids, skip_special_tokens=False))


def check_extends(tok: Tokenizer, messages: list[Message], chat: ChatOptions, who: str) -> str:
    """Property 2 for ``tok``'s template: the rendering after the tool answer extends the rendering up to the
    assistant's tool call (with its end of turn as the template writes it)."""
    k = next(i for i, m in enumerate(messages) if m["role"] == "tool")
    before = _text(tok, _render(tok, messages[:k], chat, gen=False, who=who))
    after = _text(tok, _render(tok, messages[:k + 1], chat, gen=True, who=who))
    if not after.startswith(before):
        at = next((i for i, (x, y) in enumerate(zip(before, after)) if x != y), min(len(before), len(after)))
        raise UserError(f"the chat template of {who} rewrites earlier turns once a tool answers (the text differs at "
                        f"character {at}: {before[at:at + 30]!r} vs {after[at:at + 30]!r}), so the environment's "
                        "tokens cannot be appended to what the student sampled: use a template that only appends "
                        "turns (data.chat_template_kwargs, or another chat_template.jinja)")
    return f"{who}'s chat template appends turns (a tool answer extends the episode's text)"


def check_round_trip(tok: Tokenizer, messages: list[Message], call: str, chat: ChatOptions, who: str) -> str:
    """Property 3: the assistant's turn with the tool call, as the template writes it (the text it adds after the
    conversation before it) and decoded, parses back to the call it was; the tool markers that are one token each
    are named in the line."""
    k = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    before = _text(tok, _render(tok, messages[:k], chat, gen=True, who=who))
    turn = _text(tok, _render(tok, messages[:k + 1], chat, gen=False, who=who))
    want = parse_tool_calls(call)
    got = parse_tool_calls(turn[len(before):]) if turn.startswith(before) else []
    if not got or got[0] != want[0]:
        shown = got[0] if got else "no tool call"
        raise UserError(f"{who}'s chat template does not keep the assistant's tool call: rendered and decoded it "
                        f"reads {shown!r}, not {want[0]!r}; the student's tool calls would reach the environment "
                        "changed: use a template that writes assistant content verbatim")
    one = [m for m in (OPEN, CLOSE) if len(tok(m, add_special_tokens=False)["input_ids"]) == 1]
    tail = f"; {', '.join(one)} one token each" if one else ""
    return f"{who}'s tool calls round-trip through its chat template (render, decode, parse){tail}"


def agent_checks(student_tok: Tokenizer, teachers: list[tuple[str, Tokenizer | None]],
                 tools: list[dict[str, Any]], chat: ChatOptions) -> list[str]:
    """Properties 1-3 for the student, and 1 for every teacher holding a tokenizer (``teachers``: (name for
    messages, its tokenizer or None for a server that holds its own)); returns the lines for the log."""
    chat = env_chat(chat, tools)  # the tools declared to every template, as the episodes render them
    messages, call = probe_episode(tools, chat)
    lines = [check_extends(student_tok, messages, chat, "the student"),
             check_round_trip(student_tok, messages, call, chat, "the student")]
    ids = _render(student_tok, messages, chat, gen=False, who="the student")
    for name, tok in teachers:
        who = f"teacher {name}" if name else "the teacher"
        if tok is None:
            lines.append(f"{who} holds its own tokenizer (a server): the episode's rendering is the student's")
            continue
        theirs = _render(tok, messages, chat, gen=False, who=who)
        if theirs != ids:
            at = next((i for i, (x, y) in enumerate(zip(ids, theirs)) if x != y), min(len(ids), len(theirs)))
            raise UserError(f"student and {who} render the same episode with tools to other ids: first difference at "
                            f"token {at} ({_text(student_tok, ids[at:at + 3])!r} vs {_text(tok, theirs[at:at + 3])!r}); "
                            f"{who} would score tool answers in a format it was not trained on: give both the same "
                            "chat template")
        lines.append(f"student and {who} render a {len(ids)}-token episode with tools to the same ids")
    return lines
