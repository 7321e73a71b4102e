"""`vopd serve-teacher`: a frozen teacher behind an HTTP API (FastAPI + uvicorn) that scores token sequences.

What it knows: answering the wire protocol (``vopd.teacher.wire``, ``docs/teacher_server.md``): per sequence, the token ids,
the first scored position and optionally k token ids per scored position; back, log q(next token) at each scored
position, the teacher's logits at the requested ids and, on request, its log-sum-exp over the whole vocabulary (one
float per position). That is all `opd` (log q(y_t)) and the top-k methods need: renormalising both models on the same
ids cancels the teacher's log-sum-exp, so its logits suffice for the top-k KL (docs/estimators.md, "Key equations"); `rb-topk` weighs the
ids by the exact log q_v = z_v - lse, hence the lse. Or (protocol 3, ``"hidden"``) the teacher's last hidden states at
the scored positions, bf16 or fp32, which the trainer projects with the same output layer loaded from the teacher's
checkpoint (its fingerprint is in ``/health``): the whole distribution at D instead of V numbers per position, so
every method works remotely. It also knows the HTTP side: the request body limit (413), the
errors as one-line JSON, an optional bearer token (401), batched padded forwards under a lock, fp32 head math whatever
the model's dtype (through its logit transform: softcapping, scaling), and the command line. Every request is
bounded: the body (``max_body_mb``), its JSON structure and the answer's size (``max_response_mb``, checked before
scoring; ``vopd.teacher.wire``), the forward (``max_tokens`` padded tokens) and the head's fp32 chunk
(``HEAD_MEMORY_MB``). Every answer carries the server's identity (protocol 4: the hash of its model, tokenizer and
head fingerprints), and a hidden answer a probe per sequence (log q of the next token at its first and last scored
position, from the same states) so that a client can check what it received. The command line binds its socket
before the model loads (``bind``): a bad port, host or token ends it within seconds, in one line.

What it does not know: the protocol's fields, codec and request validation (``vopd.teacher.wire``); estimators, students or
training (``vopd.teacher.client`` is the client side and the loss); TLS (put it behind a reverse proxy to cross machines); the
full logits, which it never sends (hidden states carry them D/V times smaller).

This module deliberately does not use ``from __future__ import annotations``: FastAPI reads the endpoint
annotations (``Request``) at runtime, and they are local to ``create_app`` so that fastapi stays an optional import
(the module-level helpers quote theirs).
"""

import argparse
import errno
import hmac
import ipaddress
import json
import os
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.teacher.http import check_token, one_line
from vopd.teacher.wire import (DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_MB, DEFAULT_MAX_K, DEFAULT_MAX_RESPONSE_MB,
                               DEFAULT_MAX_TOKENS, PROTOCOL_VERSION, TOKEN_ENV, ApiError, Limits, ParsedSequence,
                               HIDDEN_DTYPES, b64_encode, head_fingerprint, identity_of, model_fingerprint,
                               parse_request,
                               tokenizer_fingerprint)

if TYPE_CHECKING:  # quoted below: this module's annotations are evaluated at run time (see the docstring)
    from fastapi import FastAPI, Request

    from vopd.models import Model, Tokenizer

#: Budget of the fp32 (rows x V) logits chunk of the head; the forward itself is bounded by ``max_tokens``.
HEAD_MEMORY_MB = 512


# --- scoring ----------------------------------------------------------------------------------------------------

class TeacherScorer:
    """The model side: one padded forward per request, then the fp32 head over the scored rows only (or, for a
    hidden request, those rows' last hidden states as they are)."""

    def __init__(self, model: "Model", vocab_size: int) -> None:
        from vopd.models import output_layer

        self.model = model.eval().requires_grad_(False)  # frozen: no gradient is ever taken through the teacher
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        head = output_layer(model, vocab_size)
        weight, self.bias, self.transform = head.weight, head.bias, head.transform  # softcapping/scaling included
        self.hidden_size = int(weight.shape[1])
        # In the weights' own dtype: a trainer loading the same checkpoint at this dtype gets the same hash.
        self.head_sha256 = head_fingerprint(weight, head.bias, head.transform)
        self.half_cuda = self.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16)
        # fp32 head math (docs/estimators.md, "API": fp32 math); on CUDA half weights are accumulated into fp32 by the matmul itself.
        self.weight = weight if self.half_cuda else weight.to(torch.float32)
        self.lock = threading.Lock()  # one forward at a time: the threadpool may run several requests

    def _rows(self, seqs: list[ParsedSequence]) -> tuple[Tensor, Tensor, list[int]]:
        """(the last hidden states of every scored position (N, D) in the model's dtype, the next ids there (N,),
        positions per sequence): one padded forward; the caller holds the lock."""
        from vopd.models import last_hidden

        b, width = len(seqs), max(s.ids.numel() for s in seqs)
        ids = torch.zeros(b, width, dtype=torch.long)
        attention = torch.zeros(b, width, dtype=torch.long)
        rows, sizes = [], []
        for i, s in enumerate(seqs):
            n = s.ids.numel()
            ids[i, :n], attention[i, :n] = s.ids, 1
            rows.append(torch.arange(s.start, n - 1) + i * width)  # flat positions; each predicts the next id
            sizes.append(n - 1 - s.start)
        idx = torch.cat(rows)
        hidden = last_hidden(self.model, ids.to(self.device), attention.to(self.device))
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx.to(self.device))
        return h, ids.reshape(-1)[idx + 1], sizes

    @torch.inference_mode()
    def hidden(self, seqs: list[ParsedSequence]) -> list[tuple[Tensor, Tensor]]:
        """Per sequence: the teacher's last hidden states (t, D) at its scored positions (after the final norm, before
        the output layer), on the CPU in the model's dtype, which the client projects with the same output layer;
        and its probe, log q of the next token at the first and the last scored position (protocol 4: the client
        checks the states against it)."""
        with self.lock:
            h, y, sizes = self._rows(seqs)
            ends = torch.tensor(sizes).cumsum(0)
            at = torch.stack([ends - torch.tensor(sizes), ends - 1], -1).reshape(-1)  # first and last row of each
            probe, _lse, _ = self._head(h.index_select(0, at.to(h.device)), y[at], None)
            return list(zip(h.cpu().split(sizes), probe.reshape(-1, 2)))

    @torch.inference_mode()
    def score(self, seqs: list[ParsedSequence], k: int) -> list[tuple[Tensor, Tensor | None, Tensor]]:
        """Per sequence: (logq (t,), logits at the requested ids (t, k) or None, log-sum-exp (t,)), fp32 on the
        CPU."""
        b = len(seqs)
        topk_rows = [s.topk_ids for s in seqs if s.topk_ids is not None]
        assert len(topk_rows) == (b if k else 0)  # parse_request requires topk_ids exactly when k > 0
        with self.lock:
            h, y, sizes = self._rows(seqs)
            logq, lse, logits = self._head(h, y, torch.cat(topk_rows) if k else None)
        lg = logits.split(sizes) if logits is not None else [None] * b
        return list(zip(logq.split(sizes), lg, lse.split(sizes)))

    def _head(self, h: Tensor, y: Tensor, topk: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(log q(y), log-sum-exp, logits at ``topk`` (N, k) or None) of the rows ``h`` (N, D) with next ids ``y``
        (N,), fp32 on the CPU: the output layer in fp32 chunks of ``HEAD_MEMORY_MB``; the caller holds the lock."""
        from vopd.loss.head import chunk_rows, raw_logits

        n_rows = h.shape[0]
        logq = torch.empty(n_rows, dtype=torch.float32)
        lse = torch.empty(n_rows, dtype=torch.float32)
        logits = torch.empty(n_rows, topk.shape[1], dtype=torch.float32) if topk is not None else None
        step = chunk_rows(self.vocab_size, HEAD_MEMORY_MB)
        for lo in range(0, n_rows, step):
            hi = min(n_rows, lo + step)
            z = self.transform.apply_(raw_logits(h[lo:hi], self.weight, self.bias, torch.float32))
            z_y = z.gather(-1, y[lo:hi].to(self.device).unsqueeze(-1)).squeeze(-1)
            lse_c = z.logsumexp(-1)
            logq[lo:hi], lse[lo:hi] = (z_y - lse_c).cpu(), lse_c.cpu()
            if logits is not None and topk is not None:
                logits[lo:hi] = z.gather(-1, topk[lo:hi].to(self.device)).cpu()
            del z
        return logq, lse, logits


def _encode(x: Tensor, encoding: str) -> str | list[Any]:
    return b64_encode(x) if encoding == "base64" else x.tolist()


# --- the HTTP side, one function per concern (``create_app`` wires them to the routes) -----------------------------

def _authorize(authorization: str, token: str | None) -> None:
    """Nothing when ``token`` is unset or the ``Authorization`` header carries it; else a 401."""
    if not token:
        return
    scheme, _, value = authorization.partition(" ")
    # Constant-time comparison: the token must not leak through response timing.
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise ApiError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the "
                            f"server's token (${TOKEN_ENV})")


def _health(scorer: TeacherScorer, limits: Limits, model_name: str, fingerprints: dict[str, str],
            identity: str) -> dict[str, Any]:
    """The ``/health`` answer: what a client checks before it sends anything (protocol, tokenizer, head), and the
    ``identity`` (of the ``fingerprints``) that every ``/score`` answer carries too."""
    return {"status": "ok", "protocol": PROTOCOL_VERSION, "model": model_name, "vocab_size": scorer.vocab_size,
            "dtype": str(scorer.dtype).removeprefix("torch."), "device": str(scorer.device), "limits": limits.__dict__,
            "hidden_size": scorer.hidden_size,
            "logit_transform": {"scale": scorer.transform.scale, "softcap": scorer.transform.softcap},
            **fingerprints, "identity": identity}


async def _read_body(request: "Request", max_body_mb: float) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed ``max_body_mb``."""
    max_body = int(max_body_mb * 2**20)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise ApiError(413, f"request body of {int(declared)} bytes exceeds this server's limit max_body_mb="
                            f"{max_body_mb:g}")
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: chunked uploads have no content-length
        size += len(chunk)
        if size > max_body:
            raise ApiError(413, f"request body exceeds this server's limit max_body_mb={max_body_mb:g}")
        chunks.append(chunk)
    return b"".join(chunks)


def _answer(body: bytes, scorer: TeacherScorer, limits: Limits, identity: str) -> bytes:
    """The ``/score`` answer to ``body`` as JSON bytes: parse, score (or take hidden states), encode; it carries
    the server's ``identity``."""
    req = parse_request(body, limits, scorer.vocab_size, scorer.hidden_size)
    seqs, k, encoding = req.sequences, req.k, req.encoding
    try:
        if req.hidden is not None:
            states = scorer.hidden(seqs)
        else:
            scored = scorer.score(seqs, k)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # Not a 5xx: retrying the same request cannot help, a smaller one can.
        raise ApiError(413, "request ran out of teacher memory; send fewer tokens per request or restart the "
                            "server with a smaller --max-tokens") from None
    if req.hidden is not None:
        dtype = HIDDEN_DTYPES[req.hidden]
        answer = [{"hidden": b64_encode(h, dtype), "probe": b64_encode(probe)} for h, probe in states]
        return json.dumps({"encoding": encoding, "hidden": req.hidden, "results": answer,
                           "identity": identity}).encode()
    results = []
    for lq, lg, ls in scored:
        res = {"logq": _encode(lq, encoding), "logits": None if lg is None else _encode(lg, encoding)}
        if req.lse:
            res["lse"] = _encode(ls, encoding)
        results.append(res)
    return json.dumps({"encoding": encoding, "k": k, "results": results, "identity": identity}).encode()


def create_app(model: "Model", tokenizer: "Tokenizer", *, token: str | None, max_batch: int = DEFAULT_MAX_BATCH,
               max_tokens: int = DEFAULT_MAX_TOKENS, max_k: int = DEFAULT_MAX_K,
               max_body_mb: float = DEFAULT_MAX_BODY_MB, max_response_mb: float = DEFAULT_MAX_RESPONSE_MB,
               name: str | None = None) -> "FastAPI":
    """The FastAPI app serving ``model`` (a frozen HF causal LM) with ``GET /health`` and ``POST /score``.

    ``token``: bearer token required on every endpoint (None or "": no authentication). Limits: see ``Limits``.
    """
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, Response
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException
    except ImportError as exc:
        raise UserError(f"the teacher server needs fastapi and uvicorn ({exc}); pip install 'vopd[serve]'") from None

    limits = Limits(max_batch, max_tokens, max_k, max_body_mb, max_response_mb)
    if min(max_batch, max_tokens, max_k) < 1 or max_body_mb <= 0 or max_response_mb <= 0:
        raise UserError(f"server limits must be positive, got {limits}")
    scorer = TeacherScorer(model, len(tokenizer))
    fingerprints = {"model_sha256": model_fingerprint(model), "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
                    "head_sha256": scorer.head_sha256}
    identity = identity_of(**fingerprints)
    model_name = name or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
    app = FastAPI(title="vopd teacher server", version=str(PROTOCOL_VERSION), docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:  # 404, 405 from routing
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:  # a bug: still one JSON line
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/health")
    def health(request: Request) -> dict[str, Any]:
        _authorize(request.headers.get("authorization", ""), token)
        return _health(scorer, limits, model_name, fingerprints, identity)

    @app.post("/score")
    async def score(request: Request) -> Response:
        _authorize(request.headers.get("authorization", ""), token)
        body = await _read_body(request, max_body_mb)
        # JSON parsing, the forward and encoding run in the threadpool so the event loop keeps serving /health.
        content = await run_in_threadpool(_answer, body, scorer, limits, identity)
        return Response(content=content, media_type="application/json")

    return app


# --- command line -----------------------------------------------------------------------------------------------

def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("model", help="local Hugging Face model directory of the teacher (nothing is downloaded)")
    a("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    a("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    a("--port", type=int, default=8000, help="port (default 8000)")
    a("--token-env", default=TOKEN_ENV, help=f"environment variable holding the bearer token (default {TOKEN_ENV})")
    a("--token", default=None, help="bearer token (visible in the process list: prefer --token-env)")
    a("--insecure-no-token", action="store_true", help="allow binding a non-loopback address without a token")
    a("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help=f"sequences per request (default {DEFAULT_MAX_BATCH})")
    a("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
      help=f"padded tokens (sequences x longest) per request (default {DEFAULT_MAX_TOKENS})")
    a("--max-k", type=int, default=DEFAULT_MAX_K, help=f"ids per scored position (default {DEFAULT_MAX_K})")
    a("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
      help=f"request body size limit in MiB (default {DEFAULT_MAX_BODY_MB:g})")
    a("--max-response-mb", type=float, default=DEFAULT_MAX_RESPONSE_MB,
      help=f"answer size limit in MiB, checked before scoring (default {DEFAULT_MAX_RESPONSE_MB:g})")
    a("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    a("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
      help="model weights; the head's log-softmax is fp32 always (auto: bfloat16 on cuda, float32 on cpu)")
    a("--trust-remote-code", action="store_true", help="allow model code from the model directory")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port``, before the model loads so that a wrong address fails within seconds: a
    one-line ``UserError`` for a port outside 1..65535, a host that does not resolve, an address of another machine,
    a port in use or one that needs privileges (uvicorn logged its own ERROR line once the model had loaded, and
    listened on ``port`` modulo 65536). Not listening yet: until the server runs, a client is refused at once (and
    retries) instead of waiting on a socket nobody answers."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port: give one in 1..65535 (e.g. 8000)")
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"--host {host} does not resolve ({one_line(exc)}): give an address of this machine, e.g. "
                        "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    family, kind, proto, _, address = next((a for a in found if a[0] == socket.AF_INET), found[0])
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may rebind while old links close
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise _cannot_listen(host, port, exc) from None
    return sock


def _cannot_listen(host: str, port: int, exc: OSError) -> UserError:
    fix = {errno.EADDRINUSE: "another process listens there: stop it or pick another --port",
           errno.EADDRNOTAVAIL: "it is not an address of this machine: give one of its own, or 0.0.0.0",
           errno.EACCES: "ports below 1024 need privileges: pick a port above 1023"}.get(exc.errno or 0, "")
    return UserError(f"cannot listen on {host}:{port}: {exc.strerror or one_line(exc)}" + (f"; {fix}" if fix else ""))


def cli_main(args: argparse.Namespace) -> int:
    from vopd.models import load_model, load_tokenizer, resolve_device, torch_dtype

    token = check_token(args.token or os.environ.get(args.token_env) or None,
                        "--token" if args.token else f"${args.token_env}")
    if not token and not _is_loopback(args.host) and not args.insecure_no_token:
        raise UserError(f"--host {args.host} exposes the teacher beyond this machine without a token; set "
                        f"${args.token_env} (or pass --insecure-no-token behind a trusted proxy)")
    try:
        import uvicorn
    except ImportError as exc:
        raise UserError(f"the teacher server needs fastapi and uvicorn ({exc}); pip install 'vopd[serve]'") from None
    sock = bind(args.host, args.port)
    device = resolve_device(args.device)
    tok = load_tokenizer(args.tokenizer or args.model, role="teacher", trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, role="teacher", dtype=torch_dtype(args.dtype, device), device=device,
                       trust_remote_code=args.trust_remote_code)
    name = os.path.basename(os.path.normpath(args.model))
    app = create_app(model, tok, token=token, max_batch=args.max_batch, max_tokens=args.max_tokens,
                     max_k=args.max_k, max_body_mb=args.max_body_mb, max_response_mb=args.max_response_mb, name=name)
    auth = f"bearer token (${args.token_env})" if token and not args.token else ("bearer token" if token else "none")
    host, port = sock.getsockname()[:2]
    where = f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
    print(f"vopd serve-teacher: serving {args.model} ({len(tok)} tokens, {next(model.parameters()).dtype}, {device}) "
          f"on http://{where}; auth: {auth}", file=sys.stderr, flush=True)
    try:
        sock.listen(2048)
    except OSError as exc:  # another process bound the port too (SO_REUSEADDR) and listened first
        raise _cannot_listen(args.host, args.port, exc) from None
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])  # the socket bound above
    return 0
