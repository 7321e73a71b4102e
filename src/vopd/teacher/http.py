"""The HTTP transport every teacher placement that talks to a server shares: one session, its retries, its limits.

What it knows: one ``httpx`` session to one server (a bearer token read from the caller or an environment variable,
timeouts), a JSON request tried ``retries + 1`` times with exponential back-off (connection errors, timeouts and 5xx
answers are retried; a 4xx answer is the caller's mistake and raises at once), the bytes each answered request sent
and received, one-line error text, and packing a list of items (sequences, as sizes) into consecutive requests
within a server's limits (items per request, padded tokens, body and answer size). What it does not know: what is
sent or what comes back (the vopd-server protocols are ``vopd.teacher.client``, the codec ``vopd.teacher.wire``), a
rollout, or the loss. A new kind of teacher server is one module on top of this one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from vopd.errors import UserError

if TYPE_CHECKING:
    import httpx


class Session:
    """A JSON-over-HTTP session with one server.

    url: ``http://host:port``. token: bearer token; None reads ``$token_env`` (unset or empty: none).
    A request is tried ``retries + 1`` times; between tries it waits ``backoff_s``, then twice that, and so on.
    ``bytes_sent``/``bytes_received``: the bodies of the answered requests so far.
    """

    def __init__(self, url: str, *, token: str | None = None, token_env: str, timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5) -> None:
        try:
            import httpx
        except ImportError as exc:
            raise UserError(f"a remote teacher needs httpx ({exc}); pip install 'vopd[serve]'") from None
        if not url.startswith(("http://", "https://")):
            raise UserError(f"teacher URL {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000)")
        self.url = url.rstrip("/")
        self.retries, self.backoff_s, self.token_env = max(0, retries), backoff_s, token_env
        token = token if token is not None else os.environ.get(token_env) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._httpx = httpx
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self.bytes_sent = self.bytes_received = 0

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON answer of ``method path`` (``payload`` as the JSON body), retried as the class says; a
        ``UserError`` for a 4xx answer or once every try failed."""
        httpx = self._httpx
        tries = self.retries + 1
        last = ""
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))  # exponential back-off
            try:
                resp = self._client.request(method, path, json=payload)
            except httpx.TransportError as exc:  # refused, reset, timed out, DNS: the server may come back
                last = f"{type(exc).__name__}: {one_line(exc)}"
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {error_text(resp)}"
                continue
            if resp.status_code == 401:
                raise UserError(f"teacher server at {self.url} refused the token (401): set ${self.token_env} to the "
                                "server's token")
            if resp.status_code >= 400:
                raise UserError(f"teacher server at {self.url} rejected the request (HTTP {resp.status_code}): "
                                f"{error_text(resp)}")
            self.bytes_sent += len(resp.request.content)
            self.bytes_received += len(resp.content)
            answer: dict[str, Any] = resp.json()
            return answer
        raise UserError(f"teacher server at {self.url} is unreachable after {tries} tries (last error {last}): restart "
                        "it and resume with --resume; the last checkpoint is kept")


@dataclass(frozen=True)
class Limits:
    """What one request to a server may hold: ``max_batch`` items, ``max_tokens`` padded tokens (items x the
    longest), a body of ``max_body`` bytes and an answer of ``max_answer`` bytes (``inf``: unbounded)."""

    max_batch: int
    max_tokens: int
    max_body: float = float("inf")
    max_answer: float = float("inf")


@dataclass(frozen=True)
class Item:
    """One item's share of a request: its ``tokens`` and the bytes it adds to the body and to the answer."""

    tokens: int
    body: int
    answer: float


def pack(items: Sequence[Item], limits: Limits) -> list[list[int]]:
    """The indices of ``items``, in order, cut into consecutive requests within ``limits``; an item that alone
    passes a limit gets a request of its own (refusing it, with the fix, is the caller's)."""
    groups: list[list[int]] = []
    cur: list[int] = []
    longest = body = 0
    answer = 0.0
    for index, item in enumerate(items):
        n = item.tokens
        if cur and (len(cur) + 1 > limits.max_batch or max(longest, n) * (len(cur) + 1) > limits.max_tokens
                    or body + item.body > limits.max_body or answer + item.answer > limits.max_answer):
            groups.append(cur)
            cur, longest, body, answer = [], 0, 0, 0.0
        cur.append(index)
        longest, body, answer = max(longest, n), body + item.body, answer + item.answer
    if cur:
        groups.append(cur)
    return groups


def one_line(exc: object) -> str:
    """The first line of ``exc``'s text (its type's name when it has none), at most 200 characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def error_text(resp: httpx.Response) -> str:
    """The server's one-line error: its JSON ``error`` field, else the body, else the status's reason."""
    try:
        return one_line(resp.json().get("error", resp.text))
    except ValueError:
        return one_line(resp.text or resp.reason_phrase)
