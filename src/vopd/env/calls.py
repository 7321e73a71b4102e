"""Calls into an environment, bounded: in time (each call in a worker thread, given up after a limit), in size
(every message's text cut to a number of characters) and in what they may return.

What it knows: that an environment is user code which may raise, hang, return something that is not a ``Reply``
or return a huge text, and how each becomes either a one-line ``UserError`` naming the environment, the row and
the fix (a failure, a hang, a wrong type) or a bounded answer (a text longer than the limit is cut, marked so).
A thread cannot be stopped: one that never returns is abandoned (a daemon, so the process can still exit) and the
run stops with the error. What it does not know: tokens, templates, the episode loop, what an environment does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from vopd.env.base import Env, EnvFactory, Message, Reply
from vopd.errors import UserError

T = TypeVar("T")
_ROLES = ("tool", "user", "system")
CUT_MARK = " [... cut: the answer was longer than rollout.env_max_chars]"


def _line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


@dataclass(frozen=True)
class EnvCalls:
    """How every call of the environment ``spec`` is bounded: ``seconds`` per call, ``max_chars`` per message."""

    spec: str
    seconds: float
    max_chars: int

    def _run(self, fn: Callable[[], T], what: str, where: str) -> T:
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - any failure of user code is reported, in one line
                box["error"] = exc

        worker = threading.Thread(target=work, name=f"vopd-env-{what}", daemon=True)
        worker.start()
        worker.join(self.seconds)
        if worker.is_alive():
            raise UserError(f"rollout.env={self.spec}: {what} did not return within {self.seconds:g} s at {where}; "
                            "fix the environment, or raise rollout.env_timeout_s")
        if "error" in box:
            raise UserError(f"rollout.env={self.spec}: {what} failed at {where} ({_line(box['error'])}); fix the "
                            "environment")
        return box["value"]  # what fn returned

    def make(self, factory: EnvFactory, where: str) -> Env:
        env = self._run(factory, "building the environment", where)
        for method in ("start", "step"):
            if not callable(getattr(env, method, None)):
                raise UserError(f"rollout.env={self.spec}: the environment has no {method}() method; an environment "
                                "has start(messages) and step(assistant_text) -> vopd.env.Reply")
        return env

    def start(self, env: Env, messages: Sequence[Message], where: str) -> None:
        self._run(lambda: env.start([dict(m) for m in messages]), "start()", where)

    def step(self, env: Env, assistant: str, where: str) -> Reply:
        reply = self._run(lambda: env.step(assistant), "step()", where)
        if not isinstance(reply, Reply):
            raise UserError(f"rollout.env={self.spec}: step() returned {type(reply).__name__} at {where}, not a "
                            "vopd.env.Reply; return Reply(messages=(...), done=...)")
        if reply.done:
            return Reply(done=True, reward=self._reward(reply.reward, where))
        if isinstance(reply.messages, (str, dict)) or not isinstance(reply.messages, Sequence) or \
                not reply.messages:
            raise UserError(f"rollout.env={self.spec}: step() at {where} returned no messages and is not done; return "
                            "Reply(messages=(...)) with at least one, or Reply(done=True)")
        return Reply(tuple(self._message(m, where) for m in reply.messages), False, self._reward(reply.reward, where))

    def _message(self, m: object, where: str) -> Message:
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str) or \
                not isinstance(m.get("name", ""), str):
            shown = " ".join(repr(m).split())[:80]
            raise UserError(f"rollout.env={self.spec}: step() at {where} returned the message {shown}, not "
                            f"{{'role': {' | '.join(_ROLES)}, 'content': text}}; return chat messages with text")
        content = m["content"]
        if len(content) > self.max_chars:
            content = content[: self.max_chars] + CUT_MARK
        out = {"role": m["role"], "content": content}
        if m.get("name"):
            out["name"] = m["name"]
        return out

    def _reward(self, reward: object, where: str) -> float | None:
        if reward is None:
            return None
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise UserError(f"rollout.env={self.spec}: step() at {where} returned the reward {reward!r}, not a "
                            "number; return a float or None")
        return float(reward)
