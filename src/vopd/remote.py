"""The client side of a remote teacher (``vopd serve-teacher``) and the loss that uses its per-token numbers.

What it knows:
- ``RemoteTeacher``: turning a ``Rollout`` (+ the student's top-k ids) into ``/score`` requests split to the
  server's limits, retrying with exponential back-off, and putting the answers back on the rollout's (B, L-1) grid.
- ``student_topk_ids``: the student's top-k ids per completion position, chunk-wise, without gradient (the ids the
  teacher must be asked about; the same chunking as ``vopd.chunked``, so the same ids).
- ``remote_distillation_loss``: `opd`, `vopd-topk` and `opd-topk` from the student's hidden states and output layer
  plus the teacher's log q(y_t) and logits at the top-k ids, with closed-form gradients chunked over positions
  (the formulas of ``vopd.chunked``). Renormalising on the same ids cancels the teacher's log-sum-exp (spec, notes),
  so its logits at the ids suffice; `vopd` and `opd-full` need KL_t over the whole vocabulary and are refused.

What it does not know: the training loop, checkpoints (it only tells the user to resume), or the server side.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vopd.chunked import _logits, chunk_rows
from vopd.errors import UserError
from vopd.estimators import (
    FULL_VOCAB_METHODS,
    SAMPLED_METHODS,
    TOPK_METHODS,
    LossOutput,
    Method,
    check_inputs,
    compute_dtype,
    importance_ratio,
    token_normalizer,
)
from vopd.rollout import Rollout
from vopd.serve import b64_decode, b64_encode

#: Methods a remote teacher can serve: the teacher's numbers at y_t and at the student's top-k ids are enough.
REMOTE_METHODS: frozenset[str] = frozenset({"opd", "vopd-topk", "opd-topk"})
TOKEN_ENV = "VOPD_TEACHER_TOKEN"


@dataclass(frozen=True)
class RemoteScores:
    """The teacher's numbers for one rollout, aligned with ``rollout.targets`` (0 outside completion positions).

    logq:        (B, L-1) fp32, log q(targets[:, t]).
    topk_logits: (B, L-1, k) fp32, the teacher's logits at the requested ids, or None when none were requested.
    """

    logq: Tensor
    topk_logits: Tensor | None


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

    def score(self, rollout: Rollout, topk_ids: Tensor | None = None) -> RemoteScores:
        """log q(y_t) at every completion position of ``rollout`` and, given ``topk_ids`` (B, L-1, k) aligned with
        ``rollout.targets``, the teacher's logits at those ids. Results are on the rollout's device."""
        limits = (self._info or self.health())["limits"]
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
            reply = self._request("POST", "/score", {"sequences": seqs, "k": k, "encoding": "base64"})
            self._unpack(reply, group, k, logq, logits)
        dev = rollout.input_ids.device
        return RemoteScores(logq.to(dev), None if logits is None else logits.to(dev))

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
                logits: Tensor | None) -> None:
        results = reply.get("results", [])
        if len(results) != len(group):
            raise RuntimeError(f"teacher server at {self.url} answered {len(results)} results for {len(group)} "
                               "sequences; client and server protocol versions differ")
        for (i, start, end), res in zip(group, results):
            n = end - start
            logq[i, start:end] = b64_decode(res["logq"], torch.float32, n)
            if logits is not None:
                logits[i, start:end] = b64_decode(res["logits"], torch.float32, n * k).reshape(n, k)

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


# Columns of the per-row statistics.
_LOGP, _LOGQ, _KL_TOPK, _MASS, _RATIO, _ADV = range(6)


class _RemoteHead(torch.autograd.Function):
    """Forward computes the loss and its closed-form gradients chunk by chunk (``vopd.chunked``'s formulas with the
    teacher's side given as numbers); backward rescales the stored gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hs: Tensor, ws: Tensor, bs: Tensor | None, y: Tensor, logq: Tensor, ids: Tensor | None,
        tk: Tensor | None, sampler_lp: Tensor | None, method: str, inv_n: float, ratio_cap: float | None, rows: int,
    ) -> tuple[Tensor, Tensor]:
        cd = compute_dtype(hs.dtype)
        half_cuda = hs.is_cuda and hs.dtype in (torch.bfloat16, torch.float16) and cd == torch.float32
        ws_c = ws if half_cuda else ws.to(cd)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, dev = hs.shape[0], hs.device
        gdt = torch.float32 if half_cuda else cd
        grad_h = torch.zeros(hs.shape, dtype=gdt, device=dev) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=gdt, device=dev) if need_w else None
        grad_b = torch.zeros(ws.shape[0], dtype=cd, device=dev) if need_b else None
        stats = torch.zeros(n, 6, dtype=cd, device=dev)
        loss = torch.zeros((), dtype=cd, device=dev)
        topk = method in TOPK_METHODS
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            h_c, y_c, st = hs[lo:hi], y[lo:hi].unsqueeze(-1), stats[lo:hi]
            zs = _logits(h_c, ws_c, bs, cd)  # (c, V): the only vocabulary-sized buffer
            zs_y = zs.gather(-1, y_c).squeeze(-1)
            if topk:
                # KL~_t between p and q renormalised on K: each model's own log-softmax over its k logits.
                ids_c = ids[lo:hi]  # type: ignore[index]
                zs_k = zs.gather(-1, ids_c)
                logp_k, logq_k = zs_k.log_softmax(-1), tk[lo:hi].to(cd).log_softmax(-1)  # type: ignore[index]
                p_k = logp_k.exp()
                kl_k = (p_k * (logp_k - logq_k)).sum(-1)
                st[:, _KL_TOPK] = kl_k
            m_s = zs.amax(-1, keepdim=True)
            e = zs.sub_(m_s).exp_()
            sum_e = e.sum(-1, keepdim=True)
            lse_s = (m_s + sum_e.log()).squeeze(-1)
            p = e.div_(sum_e)
            logp, lq = zs_y - lse_s, logq[lo:hi].to(cd)
            st[:, _LOGP], st[:, _LOGQ] = logp, lq
            if topk:
                st[:, _MASS] = (zs_k - lse_s.unsqueeze(-1)).exp().sum(-1)
            if method in SAMPLED_METHODS:
                adv = lq - logp  # r_t
                if method == "vopd-topk":
                    adv = adv + kl_k  # A_t = r_t + KL~_t (spec `vopd-topk`)
                st[:, _ADV] = adv
                ratio = importance_ratio(logp, None if sampler_lp is None else sampler_lp[lo:hi], ratio_cap)
                coef = adv if ratio is None else adv * ratio
                if ratio is not None:
                    st[:, _RATIO] = ratio
                loss += -(coef * logp).sum() * inv_n
                g = p.mul_((coef * inv_n).unsqueeze(-1))  # dL/dz = w A_t (p - onehot(y))
                g.scatter_add_(-1, y_c, -(coef * inv_n).unsqueeze(-1))
            else:  # opd-topk: dL/dz = w p~ (log p~ - log q~ - KL~_t) on K, 0 elsewhere
                loss += kl_k.sum() * inv_n
                g = p.zero_().scatter_(-1, ids_c, p_k * (logp_k - logq_k - kl_k.unsqueeze(-1)) * inv_n)
            if need_h:
                grad_h[lo:hi] = (torch.mm(g.to(ws.dtype), ws, out_dtype=torch.float32)  # type: ignore[index]
                                 if half_cuda else g @ ws_c)
            if need_w:
                if half_cuda:
                    grad_w += torch.mm(g.t().to(h_c.dtype), h_c, out_dtype=torch.float32)  # type: ignore[operator]
                else:
                    grad_w.addmm_(g.t(), h_c.to(cd))  # type: ignore[union-attr]
            if need_b:
                grad_b += g.sum(0)  # type: ignore[operator]
            del zs, e, p, g
        ctx.grads = (
            None if grad_h is None else grad_h.to(hs.dtype),
            None if grad_w is None else grad_w.to(ws.dtype),
            None if grad_b is None else grad_b.to(bs.dtype),  # type: ignore[union-attr]
        )
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_stats: Tensor) -> tuple[Tensor | None, ...]:
        scale = grad_loss.to(torch.float32)
        gh, gw, gb = (None if g is None else g * scale.to(g.dtype) for g in ctx.grads)
        return (gh, gw, gb) + (None,) * 9


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
    Methods: ``opd``, ``vopd-topk``, ``opd-topk``; ``vopd`` and ``opd-full`` raise (a ``ValueError``).
    """
    if method in FULL_VOCAB_METHODS:
        raise UserError(f"loss.method={method} needs the teacher's full distribution at every position (KL_t over the "
                        "whole vocabulary), which a remote teacher does not send; use vopd-topk (the same unbiased "
                        "gradient with a top-k baseline) or an in-process teacher")
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
    check_inputs(method, k, vocab, vocab, tokens, mask, lead, tuple(teacher_logq.shape))
    if student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"hidden size mismatch: student hidden {student_hidden.shape[-1]} vs weight "
                         f"{tuple(student_weight.shape)}")
    cd = compute_dtype(student_hidden.dtype)
    idx = mask.reshape(-1).bool().nonzero().squeeze(-1)
    n = token_normalizer(mask, normalizer)
    zeros = torch.zeros(lead, dtype=cd, device=student_hidden.device)
    if n is None or idx.numel() == 0:
        loss = torch.nan_to_num(student_hidden).sum() * 0.0  # graph stays connected, zero gradient
        return LossOutput(loss=loss.to(cd), num_tokens=mask.sum().detach(), logp=zeros, logq=zeros, reward=zeros)

    def rows_of(x: Tensor | None, width: int = 0) -> Tensor | None:
        if x is None:
            return None
        flat = x.detach().reshape(-1, width) if width else x.detach().reshape(-1)
        return flat.index_select(0, idx)

    hs = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, idx)
    ids, tk = (rows_of(topk_ids, k), rows_of(teacher_topk_logits, k)) if k else (None, None)  # opd needs no ids
    slp = rows_of(sampler_logprobs)
    loss, stats = _RemoteHead.apply(
        hs, student_weight, student_bias, rows_of(tokens).long(), rows_of(teacher_logq),  # type: ignore[union-attr]
        None if ids is None else ids.long(), tk, None if slp is None else slp.to(cd),
        method, 1.0 / float(n), ratio_cap if method in SAMPLED_METHODS else None, chunk_rows(vocab, memory_budget_mb),
    )

    def per_token(col: int) -> Tensor:
        out = zeros.reshape(-1).clone()
        out[idx] = stats[:, col]
        return out.reshape(lead)

    logp, logq = per_token(_LOGP), per_token(_LOGQ)
    reward = logq - logp
    topk = method in TOPK_METHODS
    advantage = per_token(_ADV) if method in SAMPLED_METHODS else None
    return LossOutput(
        loss=loss, num_tokens=mask.sum().detach(), logp=logp, logq=logq, reward=reward,
        baseline=None if advantage is None else reward - advantage, advantage=advantage,
        kl_topk=per_token(_KL_TOPK) if topk else None, topk_mass=per_token(_MASS) if topk else None,
        ratio=per_token(_RATIO) if (method in SAMPLED_METHODS and sampler_logprobs is not None) else None,
    )
