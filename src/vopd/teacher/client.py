"""The client side of a remote teacher (`vopd serve-teacher`): a ``Teacher`` that answers with per-token numbers.

What it knows: turning a ``Rollout`` (+ the student's top-k ids) into ``/score`` requests split to the server's
limits, retrying with exponential back-off, and putting the answers back on the rollout's (B, L-1) grid as
``TeacherNumbers``: log q(y_t), the teacher's logits at the asked ids and (`rb-topk`) its log-sum-exp. Renormalising
on the same ids cancels the teacher's log-sum-exp (docs/estimators.md), so its logits at the ids suffice for the
top-k KL; the methods that need sums over the whole vocabulary (``MethodSpec.full_distribution``) cannot be served.
Its pre-flight compares tokenizer fingerprints (the teacher's tokenizer is never loaded here).

What it does not know: the training loop, the loss math (``vopd.loss.chunked`` takes the numbers), checkpoints (it
only tells the user to resume), or the server side (``vopd.teacher.server``).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.loss.scores import TeacherNumbers
from vopd.rollout import Rollout
from vopd.teacher.wire import TOKEN_ENV, b64_decode, b64_encode, response_bytes, tokenizer_fingerprint

if TYPE_CHECKING:
    import httpx

    from vopd.models import Model, Tokenizer

#: The first server protocol that answers ``"lse": true``.
LSE_PROTOCOL = 2


class RemoteTeacher:
    """HTTP client of ``vopd serve-teacher``.

    url: ``http://host:port``. token: bearer token; None reads ``$VOPD_TEACHER_TOKEN`` (unset or empty: none).
    A request is tried ``retries + 1`` times; between tries it waits ``backoff_s``, then twice that, and so on.
    Connection errors, timeouts and 5xx answers are retried; 4xx answers are the caller's mistake and raise at once.
    """

    full_distribution = False
    #: The server's tokenizer is not here: its fingerprint stands in for it (``pairing_checks``).
    tokenizer: Tokenizer | None = None

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5) -> None:
        try:
            import httpx
        except ImportError as exc:
            raise UserError(f"a remote teacher needs httpx ({exc}); pip install 'vopd[serve]'") from None
        if not url.startswith(("http://", "https://")):
            raise UserError(f"teacher URL {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000)")
        self.url = url.rstrip("/")
        self.retries, self.backoff_s = max(0, retries), backoff_s
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._httpx = httpx
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self._info: dict[str, Any] | None = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RemoteTeacher":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        """The server's ``/health``: model, vocab_size, limits (cached for request splitting)."""
        self._info = self._request("GET", "/health")
        return self._info

    @property
    def vocab_size(self) -> int:
        return int((self._info or self.health())["vocab_size"])

    def pairing_checks(self, student: Model, student_tok: Tokenizer) -> list[str]:
        """The tokenizer fingerprint from ``/health`` stands in for comparing the tokenizers."""
        health = self.health()
        vocab = len(student_tok)
        mine, theirs = tokenizer_fingerprint(student_tok), health.get("tokenizer_sha256")
        if mine != theirs:
            raise UserError(f"the teacher server at {self.url} uses another tokenizer than the student (fingerprint "
                            f"{str(theirs)[:12]}... vs {mine[:12]}..., {health.get('vocab_size')} vs {vocab} tokens); "
                            "OPD needs one shared tokenizer: serve a teacher from the student's model family")
        return [f"teacher server {self.url} ({health.get('model')}, protocol {health.get('protocol')}): same "
                f"tokenizer ({vocab} tokens, fingerprint {mine[:12]})"]

    def score(self, rollout: Rollout, topk_ids: Tensor | None = None, *, lse: bool = False) -> TeacherNumbers:
        """log q(y_t) at every completion position of ``rollout``; given ``topk_ids`` (B, L-1, k) aligned with
        ``rollout.targets``, the teacher's logits at those ids; with ``lse``, its full-vocabulary log-sum-exp
        (protocol 2). Results are on the rollout's device."""
        info = self._info or self.health()
        limits = info["limits"]
        if lse and int(info.get("protocol", 1)) < LSE_PROTOCOL:
            raise UserError(f"teacher server at {self.url} speaks protocol {info.get('protocol')}, which does not send "
                            f"the teacher's log-sum-exp that rb-topk needs (protocol {LSE_PROTOCOL}); update vopd on "
                            "the server and restart it, or use loss.method=vopd-topk")
        ids, attention, mask = rollout.input_ids.cpu(), rollout.attention_mask.cpu(), rollout.completion_mask.cpu()
        b, t = mask.shape
        k = 0
        if topk_ids is not None:
            if topk_ids.dim() != 3 or tuple(topk_ids.shape[:2]) != (b, t) or topk_ids.shape[-1] < 1:
                raise ValueError(f"topk_ids shape {tuple(topk_ids.shape)} must be (B, L-1, k) = ({b}, {t}, k)")
            k = topk_ids.shape[-1]
            if k > limits["max_k"]:
                raise UserError(f"top_k={k} exceeds the teacher server's max_k={limits['max_k']}; lower loss.top_k "
                                "or restart the server with a larger --max-k")
            topk_ids = topk_ids.cpu()
        logq = torch.zeros(b, t, dtype=torch.float32)
        logits = torch.zeros(b, t, k, dtype=torch.float32) if k else None
        lse_out = torch.zeros(b, t, dtype=torch.float32) if lse else None

        # Per sequence, only tokens up to the last completion target are sent: positions start..end-1 are scored.
        spans: list[tuple[int, int, int]] = []  # (row, start, end)
        for i in range(b):
            live = mask[i].nonzero().squeeze(-1)
            if live.numel():
                end = int(live[-1]) + 1
                if end >= int(attention[i].sum()):
                    raise ValueError(f"completion_mask of sequence {i} reaches past its attention mask")
                spans.append((i, int(live[0]), end))

        for group in self._groups(spans, k, limits, lse):
            seqs = []
            for i, start, end in group:
                seq: dict[str, Any] = {"ids": ids[i, : end + 1].tolist(), "start": start}
                if k:
                    assert topk_ids is not None
                    seq["topk_ids"] = b64_encode(topk_ids[i, start:end])
                seqs.append(seq)
            body: dict[str, Any] = {"sequences": seqs, "k": k, "encoding": "base64"}
            if lse:
                body["lse"] = True
            self._unpack(self._request("POST", "/score", body), group, k, logq, logits, lse_out)
        return TeacherNumbers(logq, topk_ids, logits, lse_out).to(rollout.input_ids.device)

    # -- internals -----------------------------------------------------------------------------------------------

    def _groups(self, spans: list[tuple[int, int, int]], k: int, limits: dict[str, Any],
                lse: bool = False) -> list[list[tuple[int, int, int]]]:
        """Consecutive sequences packed into requests within max_batch, max_tokens (padded), the body limit and the
        answer's limit (``max_response_mb``, from protocol-2 servers that report it)."""
        max_body = 0.9 * limits["max_body_mb"] * 2**20
        max_answer = 0.9 * float(limits.get("max_response_mb", float("inf"))) * 2**20
        groups: list[list[tuple[int, int, int]]] = []
        cur: list[tuple[int, int, int]] = []
        longest = body = 0
        answer = 0.0
        for span in spans:
            n = span[2] + 1
            if n > limits["max_tokens"]:
                raise UserError(f"a sequence of {n} tokens exceeds the teacher server's max_tokens="
                                f"{limits['max_tokens']}; restart the server with a larger --max-tokens")
            size = 8 * n + (16 * (n - 1 - span[1]) * k) // 3 + 64  # JSON ids + base64 int32 top-k, generous
            reply = response_bytes(span[2] - span[1], k, lse, "base64")
            if reply > max_answer:
                raise UserError(f"scoring a sequence of {span[2] - span[1]} positions with k={k} needs a "
                                f"{reply / 2**20:.3g} MiB answer, over the teacher server's max_response_mb="
                                f"{limits['max_response_mb']}; restart it with a larger --max-response-mb or lower "
                                "loss.top_k")
            if cur and (len(cur) + 1 > limits["max_batch"] or max(longest, n) * (len(cur) + 1) > limits["max_tokens"]
                        or body + size > max_body or answer + reply > max_answer):
                groups.append(cur)
                cur, longest, body, answer = [], 0, 0, 0.0
            cur.append(span)
            longest, body, answer = max(longest, n), body + size, answer + reply
        if cur:
            groups.append(cur)
        return groups

    def _unpack(self, reply: dict[str, Any], group: list[tuple[int, int, int]], k: int, logq: Tensor,
                logits: Tensor | None, lse: Tensor | None) -> None:
        results = reply.get("results", [])
        if len(results) != len(group):
            raise RuntimeError(f"teacher server at {self.url} answered {len(results)} results for {len(group)} "
                               "sequences; client and server protocol versions differ")
        for (i, start, end), res in zip(group, results):
            n = end - start
            logq[i, start:end] = b64_decode(res["logq"], torch.float32, n)
            if logits is not None:
                logits[i, start:end] = b64_decode(res["logits"], torch.float32, n * k).reshape(n, k)
            if lse is not None:
                lse[i, start:end] = b64_decode(res["lse"], torch.float32, n)

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        httpx = self._httpx
        tries = self.retries + 1
        last = ""
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))  # exponential back-off
            try:
                resp = self._client.request(method, path, json=payload)
            except httpx.TransportError as exc:  # refused, reset, timed out, DNS: the server may come back
                last = f"{type(exc).__name__}: {_one_line(exc)}"
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {_error_text(resp)}"
                continue
            if resp.status_code == 401:
                raise UserError(f"teacher server at {self.url} refused the token (401): set ${TOKEN_ENV} to the "
                                "server's token")
            if resp.status_code >= 400:
                raise UserError(f"teacher server at {self.url} rejected the request (HTTP {resp.status_code}): "
                                f"{_error_text(resp)}")
            return resp.json()
        raise UserError(f"teacher server at {self.url} is unreachable after {tries} tries (last error {last}): restart "
                        "it and resume with --resume; the last checkpoint is kept")


def _one_line(exc: object) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _error_text(resp: httpx.Response) -> str:
    try:
        return _one_line(resp.json().get("error", resp.text))
    except ValueError:
        return _one_line(resp.text or resp.reason_phrase)
