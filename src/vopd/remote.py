"""The client side of a remote teacher (``vopd serve-teacher``) and the loss that uses its per-token numbers.

What it knows:
- ``RemoteTeacher``: turning a ``Rollout`` (+ the student's top-k ids) into ``/score`` requests split to the
  server's limits, retrying with exponential back-off, and putting the answers back on the rollout's (B, L-1) grid.
- ``student_topk_ids``: the student's top-k ids per completion position, chunk-wise, without gradient (the ids the
  teacher must be asked about; the same chunking as ``vopd.chunked``, so the same ids).
- ``remote_distillation_loss``: `opd`, `vopd-topk`, `opd-topk` and `rb-topk` from the student's hidden states and
  output layer plus the teacher's log q(y_t), its logits at the top-k ids and (`rb-topk`) its log-sum-exp, through
  ``vopd.chunked``'s own fused head (``fused_head_loss``: the same per-chunk code as the in-process path).
  Renormalising on the same ids cancels the teacher's log-sum-exp (spec, notes), so its logits at the ids suffice
  for the top-k KL; `rb-topk` uses log q_v = z_v - lse at the ids, hence the lse. `vopd`, `opd-full` and
  `vopd-opt` need sums over the whole vocabulary at every position and are refused.

What it does not know: the training loop, checkpoints (it only tells the user to resume), or the server side.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vopd.chunked import TeacherRows, _logits, chunk_rows, fused_head_loss
from vopd.errors import UserError
from vopd.estimators import FULL_VOCAB_METHODS, TOPK_METHODS, LossOutput, Method, check_inputs, compute_dtype
from vopd.rollout import Rollout
from vopd.wire import TOKEN_ENV, b64_decode, b64_encode

#: Methods a remote teacher can serve: the teacher's numbers at y_t and at the student's top-k ids are enough.
REMOTE_METHODS: frozenset[str] = frozenset({"opd", "vopd-topk", "opd-topk", "rb-topk"})
#: Methods that also need the teacher's full-vocabulary log-sum-exp per position (``score(..., lse=True)``).
LSE_METHODS: frozenset[str] = frozenset({"rb-topk"})
#: The first server protocol that answers ``"lse": true``.
LSE_PROTOCOL = 2


@dataclass(frozen=True)
class RemoteScores:
    """The teacher's numbers for one rollout, aligned with ``rollout.targets`` (0 outside completion positions).

    logq:        (B, L-1) fp32, log q(targets[:, t]).
    topk_logits: (B, L-1, k) fp32, the teacher's logits at the requested ids, or None when none were requested.
    lse:         (B, L-1) fp32, the teacher's log-sum-exp over the whole vocabulary, or None when not requested.
    """

    logq: Tensor
    topk_logits: Tensor | None
    lse: Tensor | None = None


class RemoteTeacher:
    """HTTP client of ``vopd serve-teacher``.

    url: ``http://host:port``. token: bearer token; None reads ``$VOPD_TEACHER_TOKEN`` (unset or empty: none).
    A request is tried ``retries + 1`` times; between tries it waits ``backoff_s``, then twice that, and so on.
    Connection errors, timeouts and 5xx answers are retried; 4xx answers are the caller's mistake and raise at once.
    """

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

    def score(self, rollout: Rollout, topk_ids: Tensor | None = None, *, lse: bool = False) -> RemoteScores:
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

        for group in self._groups(spans, k, limits):
            seqs = []
            for i, start, end in group:
                seq: dict[str, Any] = {"ids": ids[i, : end + 1].tolist(), "start": start}
                if k:
                    seq["topk_ids"] = b64_encode(topk_ids[i, start:end])  # type: ignore[index]
                seqs.append(seq)
            body: dict[str, Any] = {"sequences": seqs, "k": k, "encoding": "base64"}
            if lse:
                body["lse"] = True
            self._unpack(self._request("POST", "/score", body), group, k, logq, logits, lse_out)
        dev = rollout.input_ids.device
        return RemoteScores(logq.to(dev), None if logits is None else logits.to(dev),
                            None if lse_out is None else lse_out.to(dev))

    # -- internals -----------------------------------------------------------------------------------------------

    def _groups(self, spans: list[tuple[int, int, int]], k: int,
                limits: dict[str, Any]) -> list[list[tuple[int, int, int]]]:
        """Consecutive sequences packed into requests within max_batch, max_tokens (padded) and the body limit."""
        max_body = 0.9 * limits["max_body_mb"] * 2**20
        groups: list[list[tuple[int, int, int]]] = []
        cur: list[tuple[int, int, int]] = []
        longest = body = 0
        for span in spans:
            n = span[2] + 1
            if n > limits["max_tokens"]:
                raise UserError(f"a sequence of {n} tokens exceeds the teacher server's max_tokens="
                                f"{limits['max_tokens']}; restart the server with a larger --max-tokens")
            size = 8 * n + (16 * (n - 1 - span[1]) * k) // 3 + 64  # JSON ids + base64 int32 top-k, generous
            if cur and (len(cur) + 1 > limits["max_batch"] or max(longest, n) * (len(cur) + 1) > limits["max_tokens"]
                        or body + size > max_body):
                groups.append(cur)
                cur, longest, body = [], 0, 0
            cur.append(span)
            longest, body = max(longest, n), body + size
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


def _error_text(resp: Any) -> str:
    try:
        return _one_line(resp.json().get("error", resp.text))
    except ValueError:
        return _one_line(resp.text or resp.reason_phrase)


# --- student side -----------------------------------------------------------------------------------------------

@torch.no_grad()
def student_topk_ids(student_hidden: Tensor, student_weight: Tensor, mask: Tensor, k: int, *,
                     bias: Tensor | None = None, memory_budget_mb: float = 1024) -> Tensor:
    """The student's top-k ids (B, T, k) int64 at masked positions (0 elsewhere), chunked like ``vopd.chunked``
    (same rows per chunk for the same budget), so no (B, T, V) tensor exists and the ids match the in-process path."""
    lead = tuple(student_hidden.shape[:-1])
    vocab = student_weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} is outside [1, V={vocab}]")
    cd = compute_dtype(student_hidden.dtype)
    out = torch.zeros(*lead, k, dtype=torch.long, device=student_hidden.device)
    idx = mask.reshape(-1).bool().nonzero().squeeze(-1)
    if idx.numel() == 0:
        return out
    half_cuda = student_hidden.is_cuda and student_hidden.dtype in (torch.bfloat16, torch.float16)
    w = student_weight if half_cuda and cd == torch.float32 else student_weight.to(cd)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, idx)
    rows = chunk_rows(vocab, memory_budget_mb)
    flat = out.reshape(-1, k)
    for lo in range(0, idx.numel(), rows):
        hi = min(idx.numel(), lo + rows)
        flat[idx[lo:hi]] = _logits(hs[lo:hi], w, bias, cd).topk(k, dim=-1).indices
    return out


def remote_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    tokens: Tensor,
    mask: Tensor,
    *,
    method: Method,
    teacher_logq: Tensor,
    teacher_topk_logits: Tensor | None = None,
    topk_ids: Tensor | None = None,
    teacher_lse: Tensor | None = None,
    student_bias: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    sampler_logprobs: Tensor | None = None,
    ratio_cap: float | None = None,
    memory_budget_mb: float = 1024,
) -> LossOutput:
    """``chunked_distillation_loss`` for a teacher known only by its numbers (``RemoteTeacher.score``).

    Shapes:
        student_hidden:      (B, T, D), requires grad; student_weight (V, D); student_bias (V,) or None.
        tokens, mask:        (B, T), as in ``distillation_loss``; sampler_logprobs (B, T) optional.
        teacher_logq:        (B, T) log q(tokens[:, t]).
        topk_ids:            (B, T, k) the student's top-k ids (``student_topk_ids``), top-k methods only.
        teacher_topk_logits: (B, T, k) the teacher's logits at ``topk_ids``, top-k methods only.
        teacher_lse:         (B, T) the teacher's full-vocabulary log-sum-exp, ``rb-topk`` only.
    Methods: ``REMOTE_METHODS``; ``vopd``, ``opd-full`` and ``vopd-opt`` raise a ``UserError`` (they need the full
    distribution). The per-chunk math is ``vopd.chunked``'s own (``fused_head_loss``), with the teacher's numbers.
    """
    if method in FULL_VOCAB_METHODS:
        raise UserError(f"loss.method={method} needs the teacher's full distribution at every position (sums over "
                        "the whole vocabulary), which a remote teacher does not send; use vopd-topk (the same "
                        "unbiased gradient with a top-k baseline) or an in-process teacher")
    lead = tuple(student_hidden.shape[:-1])
    vocab = student_weight.shape[0]
    k = 0
    if method in TOPK_METHODS:
        if topk_ids is None or teacher_topk_logits is None:
            raise ValueError(f"method {method} needs topk_ids and teacher_topk_logits (B, T, k)")
        k = topk_ids.shape[-1]
        for name, x in (("topk_ids", topk_ids), ("teacher_topk_logits", teacher_topk_logits)):
            if tuple(x.shape) != lead + (k,):
                raise ValueError(f"{name} shape {tuple(x.shape)} must be (B, T, k) = {lead + (k,)}")
    if method in LSE_METHODS and (teacher_lse is None or tuple(teacher_lse.shape) != lead):
        raise ValueError(f"method {method} needs teacher_lse (B, T) = {lead}, the teacher's log-sum-exp "
                         "(RemoteTeacher.score(..., lse=True)); got "
                         f"{None if teacher_lse is None else tuple(teacher_lse.shape)}")
    check_inputs(method, k, vocab, vocab, tokens, mask, lead, tuple(teacher_logq.shape))
    if student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"hidden size mismatch: student hidden {student_hidden.shape[-1]} vs weight "
                         f"{tuple(student_weight.shape)}")
    idx = mask.reshape(-1).bool().nonzero().squeeze(-1)

    def rows_of(x: Tensor | None, width: int = 0) -> Tensor | None:
        if x is None:
            return None
        flat = x.detach().reshape(-1, width) if width else x.detach().reshape(-1)
        return flat.index_select(0, idx)

    ids = rows_of(topk_ids, k) if k else None  # opd needs no ids
    teacher = TeacherRows(logq=rows_of(teacher_logq), topk_ids=None if ids is None else ids.long(),
                          topk_logits=rows_of(teacher_topk_logits, k) if k else None,
                          lse=rows_of(teacher_lse) if method in LSE_METHODS else None)
    return fused_head_loss(student_hidden, student_weight, student_bias, tokens, mask, teacher, method=method,
                           top_k=k, normalizer=normalizer, sampler_logprobs=sampler_logprobs, ratio_cap=ratio_cap,
                           memory_budget_mb=memory_budget_mb)
