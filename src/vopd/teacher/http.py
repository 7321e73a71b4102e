"""The HTTP transport every teacher placement that talks to a server shares: one session, its retries, its limits.

What it knows: one ``httpx`` session to one server (a bearer token read from the caller or an environment variable,
timeouts), a JSON request tried ``retries + 1`` times with exponential back-off (connection errors, timeouts and 5xx
answers are retried; a 4xx answer is the caller's mistake and raises at once), the bytes each answered request sent
and received, one-line error text, and packing a list of items (sequences, as sizes) into consecutive requests
within a server's limits (items per request, padded tokens, body and answer size). It bounds what it reads: an
answer is streamed and refused as soon as it passes the caller's ``max_answer`` bytes (its declared length first),
a try ends after ``timeout_s`` in all (a server that trickles bytes is a timeout, not a hang), and an answer that is
not a JSON object is one line. The bearer token's syntax (``check_token``: printable ASCII, nothing around it) is
checked here and, with the same function, by the server at start-up. What it does not know: what is sent or what
comes back (the vopd-server protocols are ``vopd.teacher.client``, what their answers must hold
``vopd.teacher.replies``, the codec ``vopd.teacher.wire``), a rollout, or the loss. A new kind of teacher server is
one module on top of this one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from vopd.errors import UserError

if TYPE_CHECKING:
    import httpx

#: The most of an error answer that is read: its message is one line.
ERROR_BYTES = 64 * 1024


class Rejected(UserError):
    """A 4xx answer (the request was the caller's mistake): ``status`` and the server's one-line ``detail``, so that
    a client that knows the server can reword it with the fix (a stock server's flag)."""

    def __init__(self, message: str, status: int, detail: str) -> None:
        super().__init__(message)
        self.status, self.detail = status, detail


class Unreachable(UserError):
    """Every try of a request failed (connection errors, timeouts, 5xx): another replica may answer it."""


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
        self.timeout_s = timeout_s
        if token is None:
            token = check_token(os.environ.get(token_env) or None, f"${token_env}")
        else:
            token = check_token(token or None, "the teacher's token")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._httpx = httpx
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self.bytes_sent = self.bytes_received = 0

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, path: str, payload: dict[str, Any] | None = None, *, max_answer: float,
                advice: str = "", array_key: str | None = None) -> dict[str, Any]:
        """The JSON object that answers ``method path`` (``payload`` as the JSON body), retried as the class says; a
        ``UserError`` for a 4xx answer, an answer of more than ``max_answer`` bytes (refused without reading the rest)
        or one that is not a JSON object (``advice`` is added to those two: what the caller's user should do), or
        once every try failed. ``array_key``: an answer that is a JSON array is taken, as ``{array_key: it}``
        (SGLang's ``/generate`` answers a batch so)."""
        httpx = self._httpx
        tries = self.retries + 1
        last = ""
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))  # exponential back-off
            try:
                status, body, sent = self._try(method, path, payload, max_answer, advice)
            except httpx.TransportError as exc:  # refused, reset, timed out, DNS: the server may come back
                last = f"{type(exc).__name__}: {one_line(exc)}"
                continue
            if status >= 500:
                last = f"HTTP {status}: {error_text(body)}"
                continue
            if status == 401:
                raise UserError(f"teacher server at {self.url} refused the token (401): set ${self.token_env} to the "
                                "server's token")
            if status >= 400:
                raise Rejected(f"teacher server at {self.url} rejected the request (HTTP {status}): "
                               f"{error_text(body)}", status, error_text(body))
            self.bytes_sent += sent
            self.bytes_received += len(body)
            return json_object(body, f"teacher server at {self.url} answered {method} {path} with", advice,
                               array_key=array_key)
        raise Unreachable(f"teacher server at {self.url} is unreachable after {tries} tries (last error {last}): restart "
                        "it and run the command again (vopd train: --resume continues from the last checkpoint, "
                        "which is kept)")

    def _try(self, method: str, path: str, payload: dict[str, Any] | None, max_answer: float,
             advice: str) -> tuple[int, bytes, int]:
        """One try: (status, body, bytes sent). The body is read as it arrives, at most ``max_answer`` bytes (an
        error's first ``ERROR_BYTES``), within ``timeout_s`` in all."""
        deadline = time.monotonic() + self.timeout_s
        with self._client.stream(method, path, json=payload) as resp:
            failed = resp.status_code >= 400
            limit = ERROR_BYTES if failed else max_answer
            declared = resp.headers.get("content-length", "")
            if not failed and declared.isdigit() and int(declared) > limit:
                raise self._oversized(method, path, int(declared), limit, advice)
            chunks: list[bytes] = []
            size = 0
            for chunk in resp.iter_bytes():  # decoded bytes: a compressed answer is bounded by what it inflates to
                size += len(chunk)
                if size > limit:
                    if failed:
                        break  # an error's first bytes hold its one line
                    raise self._oversized(method, path, size, limit, advice)  # leaving drops the connection
                if time.monotonic() > deadline:
                    raise self._httpx.ReadTimeout(f"the answer took more than timeout_s={self.timeout_s:g} s in all")
                chunks.append(chunk)
            return resp.status_code, b"".join(chunks), len(resp.request.content)

    def _oversized(self, method: str, path: str, size: int, limit: float, advice: str) -> UserError:
        return UserError(f"teacher server at {self.url} sent an answer to {method} {path} of at least "
                         f"{size / 2**20:.3g} MiB, over the {limit / 2**20:.3g} MiB that this request's answer can "
                         f"take within the server's limits; the rest was not read{advice}")


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


def error_text(body: bytes) -> str:
    """The server's one-line error from an error answer's ``body``: its JSON ``error`` field, else the body's text."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        answer = None
    if isinstance(answer, dict) and "error" in answer:
        error = answer["error"]  # a stock server (vLLM, OpenAI style) nests it: {"error": {"message": ...}}
        return one_line(error.get("message", error) if isinstance(error, dict) else error)
    if isinstance(answer, dict) and "message" in answer:
        return one_line(answer["message"])
    return one_line(body.decode("utf-8", "replace")) if body.strip() else "(empty body)"


def json_object(body: bytes, source: str, advice: str = "", array_key: str | None = None) -> dict[str, Any]:
    """``body`` parsed as a JSON object (or a JSON array, as ``{array_key: it}``, when ``array_key`` is given); else
    a ``UserError`` that starts with ``source`` ("teacher server at URL answered GET /health with") and names what
    came instead (another kind of server on the port, a proxy's page)."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        start = body[:60].decode("utf-8", "replace")
        raise UserError(f"{source} a body that is not JSON ({one_line(exc)}; it starts {start!r}): is another kind "
                        f"of server listening there?{advice}") from None
    if array_key is not None and isinstance(answer, list):
        return {array_key: answer}
    if not isinstance(answer, dict):
        kind = "null" if answer is None else type(answer).__name__
        raise UserError(f"{source} a JSON {kind}, expected a JSON object{advice}")
    return answer


def check_token(token: str | None, source: str) -> str | None:
    """``token`` when it can travel in an ``Authorization: Bearer`` header as it is (printable ASCII, no space or
    other whitespace around it), or None for no token; else a ``UserError`` naming ``source`` (where the token was
    read). Checked on both sides: a token that the client would send differently than the server compares it would
    only show up as a refused token, or as an unreachable server."""
    if token is None:
        return None
    if token != token.strip() or not token:
        raise UserError(f"{source} has whitespace around it ({token!r} is {len(token)} characters): remove it (a "
                        "line read from a file keeps its newline)")
    bad = next((c for c in token if not " " <= c <= "~"), None)
    if bad is not None:
        raise UserError(f"{source} holds the character {bad!r} ({len(token)} characters): a bearer token must be "
                        "printable ASCII, e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
    return token
