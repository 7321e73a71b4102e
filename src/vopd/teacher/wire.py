"""The wire protocol of ``vopd serve-teacher`` (``docs/teacher_server.md``), as the server and the client share it.

What it knows: the protocol version, the token environment variable, the default request limits (``Limits``), the
request and sequence field names and the two encodings, the base64 array codec (``b64_encode``/``b64_decode``: float32,
bfloat16 or int32, used by the server for its answers and by ``vopd.teacher.client`` for its requests), the model,
tokenizer and output-layer fingerprints that ``/health`` reports and the server's identity made of them (protocol 4:
every answer carries it), and what a valid ``/score`` body is: ``parse_request`` returns
the validated ``ScoreRequest`` (log-probs at ids, or, from protocol 3, the teacher's last hidden states) or raises an
``ApiError`` with the HTTP status (400/413/422) and a one-line message naming the problem, for a body of any
shape (invalid or too deeply nested JSON: 400). It also bounds the memory of one request: the body's JSON
structure is counted before it is parsed (no more arrays/objects/values than a request within the limits can
hold), and the answer's size is estimated before any scoring (``response_bytes`` against ``max_response_mb``).

What it does not know: HTTP, FastAPI or authentication, the model and its scoring (``vopd.teacher.server``), the
client's request splitting and retries (``vopd.teacher.client`` over ``vopd.teacher.http``), or what a valid answer is
(``vopd.teacher.replies``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vopd.loss.head import LogitTransform

if TYPE_CHECKING:
    from vopd.models import Tokenizer

#: 2 added the optional request field ``"lse"``; 3 added ``"hidden"`` (the teacher's last hidden states instead of
#: numbers at ids) and the output-layer fingerprint in ``/health``; 4 added the model fingerprint and the server's
#: ``identity`` to ``/health``, the identity to every ``/score`` answer, and to each hidden result its ``probe``
#: (log q of the next token at the first and the last scored position). A request without the request fields is answered as in version 1; the answer fields
#: that a version adds are ignored by older clients.
PROTOCOL_VERSION = 4
#: The first protocol that answers ``"lse": true``, the first that sends hidden states, the first whose answers carry
#: the server's identity (and probes with hidden states).
LSE_PROTOCOL, HIDDEN_PROTOCOL, IDENTITY_PROTOCOL = 2, 3, 4
#: The weight dtypes a server reports in ``/health`` (``dtype``).
SERVER_DTYPES = ("float32", "bfloat16", "float16")
TOKEN_ENV = "VOPD_TEACHER_TOKEN"
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_TOKENS = 65536
DEFAULT_MAX_K = 1024
DEFAULT_MAX_BODY_MB = 256.0
DEFAULT_MAX_RESPONSE_MB = 128.0
#: Bytes one returned float takes: base64 of float32 (4 x 4/3), or JSON text (a float's repr and ", ", at most).
_BYTES_PER_VALUE = {"base64": 16 / 3, "json": 24.0}
_ENCODINGS = ("json", "base64")
#: Hidden states travel as base64 of these little-endian floats (bfloat16: the upper half of a float32).
HIDDEN_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_REQUEST_FIELDS = {"sequences", "k", "encoding", "lse", "hidden"}
_SEQUENCE_FIELDS = {"ids", "start", "topk_ids"}


# --- array codec and tokenizer fingerprint ----------------------------------------------------------------------

def b64_encode(x: Tensor, dtype: torch.dtype | None = None) -> str:
    """Little-endian float32 (floating tensors; ``dtype=torch.bfloat16``: bfloat16) or int32 (integer tensors),
    flattened row-major, base64."""
    import numpy as np

    x = x.detach().cpu().contiguous()
    if dtype == torch.bfloat16:  # numpy has no bfloat16: send its bits as little-endian int16
        arr = x.to(torch.bfloat16).view(torch.int16).numpy().astype(np.dtype("<i2"))
    else:
        arr = (x.to(torch.float32) if x.is_floating_point() else x.to(torch.int32)).numpy()
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return base64.b64encode(arr.tobytes()).decode("ascii")


def b64_decode(text: str, dtype: torch.dtype, count: int) -> Tensor:
    """Inverse of ``b64_encode`` for ``count`` values of ``dtype`` (torch.float32, torch.bfloat16 or torch.int32),
    returned in that dtype; ValueError when the payload is not base64 or holds a different number of values."""
    import numpy as np

    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"is not valid base64 ({exc})") from None
    size = 2 if dtype == torch.bfloat16 else 4
    if len(raw) != size * count:
        raise ValueError(f"holds {len(raw) / size:g} values, expected {count}")
    if dtype == torch.bfloat16:
        bits = np.frombuffer(raw, dtype=np.dtype("<i2")).astype(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16)
    wire = np.dtype("<f4") if dtype == torch.float32 else np.dtype("<i4")
    return torch.from_numpy(np.frombuffer(raw, dtype=wire).astype(wire.newbyteorder("=")))


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the token->id map and the special tokens: equal fingerprints mean the student may use this teacher
    (``vopd.teacher.local.compare_tokenizers`` is the in-process version of this check, with a better message)."""
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    payload = json.dumps([sorted(tokenizer.get_vocab().items()), special], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def head_fingerprint(weight: Tensor, bias: Tensor | None, transform: LogitTransform) -> str:
    """sha256 of an output layer (weight (V, D) and bias in their own dtype, their shapes) and its logit transform:
    the server reports it in ``/health`` so that a trainer projecting the server's hidden states with a head it
    loaded itself (``RemoteTeacher(head=...)``) knows it is the same layer, cast to the same dtype."""
    digest = hashlib.sha256()
    digest.update(json.dumps([list(weight.shape), str(weight.dtype), None if bias is None else list(bias.shape),
                              transform.scale, transform.softcap]).encode())
    for t in (weight, bias):
        if t is not None:  # the raw bytes: any change of a value or of the dtype changes the hash
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's parameter names, shapes and dtypes and of a strided sample of at most 64 values of each
    parameter: two checkpoints of one architecture differ in every sampled tensor, so another model gets another
    hash, at the cost of a few hundred small copies (not a pass over the weights). Only the server computes it
    (``/health`` and every answer carry it in ``identity``): nothing needs to reproduce it elsewhere."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()  # fp32 bits: numpy has no bfloat16
        digest.update(json.dumps([name, list(p.shape), str(p.dtype)]).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def identity_of(model_sha256: str, tokenizer_sha256: str, head_sha256: str) -> str:
    """The server's identity (protocol 4): sha256 of its model, tokenizer and output-layer fingerprints, in
    ``/health`` beside them and in every ``/score`` answer (64 characters, where the three would take 200)."""
    return hashlib.sha256(json.dumps([model_sha256, tokenizer_sha256, head_sha256]).encode()).hexdigest()


# --- validation -------------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An HTTP error with a one-line message, returned as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Limits:
    max_batch: int = DEFAULT_MAX_BATCH    # sequences per request
    max_tokens: int = DEFAULT_MAX_TOKENS  # padded tokens per request: sequences x longest sequence
    max_k: int = DEFAULT_MAX_K            # ids per scored position
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    max_response_mb: float = DEFAULT_MAX_RESPONSE_MB  # the answer (its memory on the server: about 3x that)


def response_bytes(positions: int, k: int, lse: bool, encoding: str, hidden: str | None = None,
                   hidden_size: int = 0) -> float:
    """The most bytes the answer to ``positions`` scored positions takes: per position log q, k logits, lse; or,
    asking for ``hidden`` states, ``hidden_size`` floats of that dtype (base64: 4/3 of their bytes)."""
    if hidden is not None:
        return positions * hidden_size * HIDDEN_DTYPES[hidden].itemsize * 4 / 3
    return positions * (1 + k + int(lse)) * _BYTES_PER_VALUE[encoding]


def _structure_budget(limits: Limits) -> tuple[int, int]:
    """(JSON arrays + objects, JSON values) that a request within ``limits`` can hold, at most: every sequence an
    object with an ids array, one topk_ids row per scored position; ids, plus topk_ids sent as JSON numbers (no more
    than the positions x k that the answer's limit allows), plus field separators."""
    values = int(limits.max_response_mb * 2**20 / _BYTES_PER_VALUE["json"])
    return 4 + 3 * limits.max_batch + limits.max_tokens, limits.max_tokens + values + 8 * limits.max_batch + 16


@dataclass(frozen=True)
class ScoreRequest:
    """A validated ``/score`` body. ``hidden``: None (answer log q, logits at ``k`` ids, lse on request), or the
    dtype name of the hidden states to answer with instead (``HIDDEN_DTYPES``; then k is 0 and lse false)."""

    sequences: list[ParsedSequence]
    k: int
    encoding: str
    lse: bool
    hidden: str | None = None


@dataclass(frozen=True)
class ParsedSequence:
    ids: Tensor            # (n,) int64
    start: int             # first scored position; positions start..n-2 are scored
    topk_ids: Tensor | None  # (n-1-start, k) int64


def _int_tensor(value: object, where: str, dims: int) -> Tensor:
    try:
        t = torch.tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:  # ragged rows, strings, nested junk
        raise ApiError(422, f"{where} must be a {'list' if dims == 1 else 'rectangular list of lists'} of integer "
                            f"token ids ({str(exc).splitlines()[0]})") from None
    if dims == 1 and t.dim() == 1 and t.numel() == 0:
        return t.long()  # [] parses as float; the length check names the problem
    if t.dtype != torch.int64 or t.dim() != dims:
        raise ApiError(422, f"{where} must be a {dims}-d list of integer token ids, got {t.dim()}-d {t.dtype}")
    return t


def _check_range(t: Tensor, where: str, vocab: int) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        bad = int(t[(t < 0) | (t >= vocab)][0])
        raise ApiError(422, f"{where} holds token id {bad}, outside the teacher's vocabulary [0, {vocab})")

def _load_body(body: bytes, limits: Limits) -> dict[str, Any]:
    """The body as a JSON object, its structure counted against ``limits`` before it is parsed."""
    # Parsed JSON takes up to ~60 bytes per array/object/number: count them first (bytes.count runs at memory speed).
    max_containers, max_values = _structure_budget(limits)
    containers, separators = body.count(b"[") + body.count(b"{"), body.count(b",")
    if containers > max_containers and 2 * separators < containers:  # nesting, not width: no parser would take it
        raise ApiError(400, f"request body is not valid JSON for this server: it is nested too deeply ({containers} "
                            "arrays/objects, almost no separators)")
    if containers > max_containers or separators > max_values:
        raise ApiError(413, f"request body holds {containers} JSON arrays/objects and {separators} separators, more "
                            f"than any request within this server's limits ({max_containers}, {max_values}); split the "
                            "batch, or send topk_ids with encoding=base64")
    try:
        req = json.loads(body)
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON for this server: it is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(req, dict):
        raise ApiError(422, 'request body must be a JSON object {"sequences": [...], "k": K, "encoding": ...}')
    if unknown := sorted(set(req) - _REQUEST_FIELDS):
        raise ApiError(422, f"unknown request field(s) {unknown}; valid fields: {sorted(_REQUEST_FIELDS)}")
    return req


@dataclass(frozen=True)
class _Answer:
    """What the request asks back, the same for every sequence (the fields of ``ScoreRequest`` but the sequences)."""

    k: int
    encoding: str
    lse: bool
    hidden: str | None


def _parse_answer(req: dict[str, Any], limits: Limits, vocab: int) -> _Answer:
    """The request's encoding, lse, hidden and k fields, checked against each other and the limits."""
    encoding = req.get("encoding", "json")
    if encoding not in _ENCODINGS:
        raise ApiError(422, f"encoding={encoding!r}; valid encodings: {', '.join(_ENCODINGS)}")
    want_lse = req.get("lse", False)
    if type(want_lse) is not bool:
        raise ApiError(422, f"lse={want_lse!r} must be true or false (true: also return the teacher's log-sum-exp)")
    hidden = req.get("hidden")
    if hidden is not None:
        if not isinstance(hidden, str) or hidden not in HIDDEN_DTYPES:  # a list or object is not hashable
            raise ApiError(422, f"hidden={hidden!r}; valid values: {', '.join(map(repr, HIDDEN_DTYPES))} (the dtype of "
                                "the returned hidden states), or leave it out for log-probs at ids")
        if encoding != "base64":
            raise ApiError(422, "hidden states are sent as base64 only: set encoding=base64")
        if req.get("k", 0) != 0 or want_lse:
            raise ApiError(422, "a hidden request returns the teacher's last hidden states instead of numbers at ids: "
                                "leave out k and lse (the trainer forms every logit from the states)")
    k = req.get("k", 0)
    if type(k) is not int or k < 0:
        raise ApiError(422, f"k={k!r} must be a non-negative integer (0: no logits requested)")
    if k > limits.max_k:
        raise ApiError(413, f"k={k} exceeds this server's limit max_k={limits.max_k} ids per position")
    if k > vocab:
        raise ApiError(422, f"k={k} exceeds the vocabulary size {vocab}")
    return _Answer(k, encoding, want_lse, hidden)


def _sequence_ids(s: dict[str, Any], where: str) -> Tensor:
    """The ``ids`` of one sequence object, as integers; their length and range are checked after the padded-token
    limit (``_sequence_start``)."""
    if unknown := sorted(set(s) - _SEQUENCE_FIELDS):
        raise ApiError(422, f"unknown field(s) {unknown} in {where}; valid fields: {sorted(_SEQUENCE_FIELDS)}")
    if "ids" not in s:
        raise ApiError(422, f"{where} has no ids")
    return _int_tensor(s["ids"], f"{where}.ids", 1)


def _sequence_start(s: dict[str, Any], ids: Tensor, where: str, vocab: int) -> int:
    """The first scored position of a sequence with these ``ids``, once the ids themselves are checked."""
    n = ids.numel()
    if n < 2:
        raise ApiError(422, f"{where}.ids has {n} token(s); at least 2 are needed to score a next token")
    _check_range(ids, f"{where}.ids", vocab)
    start = s.get("start", 0)
    if type(start) is not int or not 0 <= start <= n - 2:
        raise ApiError(422, f"{where}.start={start!r} is outside the sequence: it must be an integer in "
                            f"[0, {n - 2}] (positions start..n-2 predict ids[start+1..n-1])")
    return start


def _check_answer_size(positions: int, answer: _Answer, limits: Limits, hidden_size: int) -> None:
    """413 when the answer to the ``positions`` scored so far would exceed ``max_response_mb``."""
    k, encoding, hidden = answer.k, answer.encoding, answer.hidden
    size = response_bytes(positions, k, answer.lse, encoding, hidden, hidden_size)
    if size > limits.max_response_mb * 2**20:
        values = f"{hidden_size} {hidden} hidden values" if hidden else f"{1 + k + int(answer.lse)} values as {encoding}"
        raise ApiError(413, f"the answer would take ~{size / 2**20:.3g} MiB ({positions} scored positions x "
                            f"{values}), over this server's limit "
                            f"max_response_mb={limits.max_response_mb:g}; send fewer positions or a smaller k per "
                            "request" + (", or use encoding=base64" if encoding == "json" else ""))


def _sequence_topk(topk: object, where: str, t: int, answer: _Answer, vocab: int) -> Tensor | None:
    """A sequence's ``topk_ids`` as (t, k) int64 for its ``t`` scored positions: present exactly when k > 0."""
    k = answer.k
    if k == 0 and topk is not None:
        raise ApiError(422, f"{where}.topk_ids given but k is 0; set k to the number of ids per position")
    if k == 0:
        return None
    if topk is None:
        raise ApiError(422, f"{where}.topk_ids missing: k={k} needs {t} rows of {k} ids")
    if answer.encoding == "base64":
        if not isinstance(topk, str):
            raise ApiError(422, f"{where}.topk_ids must be a base64 string of int32 with encoding=base64")
        try:
            topk_t = b64_decode(topk, torch.int32, t * k).to(torch.int64).reshape(t, k)
        except ValueError as exc:
            raise ApiError(422, f"{where}.topk_ids {exc} ({t} positions x k={k})") from None
    else:
        topk_t = _int_tensor(topk, f"{where}.topk_ids", 2)
    if tuple(topk_t.shape) != (t, k):
        raise ApiError(422, f"{where}.topk_ids has shape {tuple(topk_t.shape)}, expected ({t}, {k}): one row "
                            "of k ids per scored position start..n-2")
    _check_range(topk_t, f"{where}.topk_ids", vocab)
    return topk_t


def _parse_sequences(seqs: object, answer: _Answer, limits: Limits, vocab: int,
                     hidden_size: int) -> list[ParsedSequence]:
    """Every sequence of the request, checked in order; the padded tokens and the answer's size are totals, checked
    as each sequence adds to them (so the first sequence over a limit is the one the error comes at)."""
    if not isinstance(seqs, list) or not seqs:
        raise ApiError(422, "sequences must be a non-empty list of {\"ids\": [...], \"start\": int} objects")
    if len(seqs) > limits.max_batch:
        raise ApiError(413, f"{len(seqs)} sequences exceed this server's limit max_batch={limits.max_batch} per "
                            "request; split the batch")
    out: list[ParsedSequence] = []
    longest = positions = 0
    for i, s in enumerate(seqs):
        where = f"sequences[{i}]"
        if not isinstance(s, dict):
            raise ApiError(422, f"{where} must be an object with ids and start")
        ids = _sequence_ids(s, where)
        longest = max(longest, ids.numel())
        if longest * (i + 1) > limits.max_tokens:
            raise ApiError(413, f"request needs at least {longest * (i + 1)} padded tokens (sequences x longest "
                                f"sequence), over this server's limit max_tokens={limits.max_tokens}; split the batch")
        start = _sequence_start(s, ids, where, vocab)
        t = ids.numel() - 1 - start
        positions += t
        _check_answer_size(positions, answer, limits, hidden_size)
        out.append(ParsedSequence(ids, start, _sequence_topk(s.get("topk_ids"), where, t, answer, vocab)))
    return out


def parse_request(body: bytes, limits: Limits, vocab: int, hidden_size: int = 0) -> ScoreRequest:
    """The validated ``/score`` body, or an ``ApiError`` naming the problem. ``hidden_size``: the width of the
    teacher's hidden states (to bound the answer of a ``hidden`` request)."""
    req = _load_body(body, limits)
    answer = _parse_answer(req, limits, vocab)
    sequences = _parse_sequences(req.get("sequences"), answer, limits, vocab, hidden_size)
    return ScoreRequest(sequences, answer.k, answer.encoding, answer.lse, answer.hidden)
