"""What a vopd teacher server's answers must hold, checked before anything in them is used: a structural fault or an
impossible number is one line (``UserError``) naming the server, the field and what was expected, and nothing of that
answer is trained on.

What it knows: the fields of a ``/health`` answer (protocol, vocabulary, tokenizer fingerprint, limits, weight dtype;
from protocol 3 the hidden size and output-layer fingerprint; from protocol 4 the server's ``identity``) and of a
``/score`` answer (one result per sequence, base64 arrays of the expected lengths, the echoed ``encoding``, ``k`` and
``hidden``; from protocol 4 the ``identity`` and, per hidden result, the ``probe``); that every answer's identity must
be the one of the ``/health`` answer the pre-flight checked (a server restarted with another model or tokenizer
mid-run is refused); and what no teacher can send (``check_numbers``, ``check_hidden``, ``check_probe``): non-finite
numbers or magnitudes past ``ABSURD``, a positive log-probability, logits at the asked ids whose probabilities would
sum past 1 (given the log-sum-exp) or that put log q(y_t) above its share among them (y_t one of the ids), an all-zero
hidden state, and hidden states whose log q of the next token at the probed positions, formed here with the
teacher's output layer, is not the server's.

What it does not know: HTTP (``vopd.teacher.http`` reads bounded bytes and refuses what is not a JSON object), the
requests (``vopd.teacher.client``), or the loss. A wrong answer that is possible passes: scores of another plausible
teacher from a server whose identity did not change, or hidden states that are wrong only away from the probed
positions (a shuffle of positions moves the probed ones too, and is caught).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.loss.head import OutputHead
from vopd.teacher.wire import HIDDEN_PROTOCOL, IDENTITY_PROTOCOL, SERVER_DTYPES, b64_decode, identity_of

#: No language model's fp32 logits, log-sum-exps or log-probs reach this magnitude (real ones stay within a few
#: hundred); floats decoded from garbled bytes mostly do.
ABSURD = 1e4
#: What to do after a malformed ``/health`` answer (the pre-flight) and after a refused ``/score`` answer (a run).
HEALTH_ADVICE = "; is a vopd serve-teacher of this version listening there?"
SCORE_ADVICE = ("; nothing of that answer was trained on: check or restart the server (vopd serve-teacher) and "
                "run the command again (vopd train: --resume continues from the last checkpoint, "
                "which is kept)")
#: The ``/health`` fingerprints a protocol-4 identity is the hash of (``vopd.teacher.wire.identity_of``).
IDENTITY_FIELDS = ("model_sha256", "tokenizer_sha256", "head_sha256")
_MISSING = object()


# --- /health --------------------------------------------------------------------------------------------------------

def check_health(info: dict[str, Any], url: str) -> dict[str, Any]:
    """``info`` when it is a well-formed ``/health`` answer of a vopd server, else a one-line ``UserError``."""
    def need(ok: bool, field: str, value: object, expected: str) -> None:
        if not ok:
            raise UserError(f"teacher server at {url} sent a malformed /health answer: {field} is {_show(value)}, "
                            f"expected {expected}{HEALTH_ADVICE}")

    protocol = info.get("protocol", 1)  # protocol-1 servers may not say
    need(_count(protocol), "protocol", protocol, "a protocol version (an integer >= 1)")
    for key in ("vocab_size", *(["hidden_size"] if protocol >= HIDDEN_PROTOCOL else [])):
        need(_count(info.get(key, _MISSING)), key, info.get(key, _MISSING), "an integer >= 1")
    for key in ("tokenizer_sha256", *(["head_sha256"] if protocol >= HIDDEN_PROTOCOL else [])):
        need(_sha(info.get(key, _MISSING)), key, info.get(key, _MISSING), "a sha256 fingerprint (64 hex digits)")
    dtype = info.get("dtype", "float32")
    need(isinstance(dtype, str) and dtype in SERVER_DTYPES, "dtype", dtype, f"one of {', '.join(SERVER_DTYPES)}")
    limits = info.get("limits", _MISSING)
    need(isinstance(limits, dict), "limits", limits, "an object {max_batch, max_tokens, max_k, max_body_mb, ...}")
    assert isinstance(limits, dict)
    for key in ("max_batch", "max_tokens", "max_k"):
        need(_count(limits.get(key, _MISSING)), f"limits.{key}", limits.get(key, _MISSING), "an integer >= 1")
    for key in ("max_body_mb", *(["max_response_mb"] if "max_response_mb" in limits else [])):
        value = limits.get(key, _MISSING)
        need(_positive(value), f"limits.{key}", value, "a positive number of MiB")
    if protocol >= IDENTITY_PROTOCOL:
        model = info.get("model_sha256", _MISSING)
        need(_sha(model), "model_sha256", model, "a sha256 fingerprint (64 hex digits)")
        identity = info.get("identity", _MISSING)
        need(identity == identity_of(*(info[key] for key in IDENTITY_FIELDS)), "identity", identity,
             "the sha256 of its model, tokenizer and head fingerprints (vopd.teacher.wire.identity_of)")
    return info


# --- /score: structure and identity ---------------------------------------------------------------------------------

def another_teacher(reply: dict[str, Any], info: dict[str, Any]) -> bool:
    """Whether ``reply`` carries another identity than ``info``, the ``/health`` answer the pre-flight checked (a
    server before protocol 4 has none: there is nothing to compare)."""
    return info.get("identity") is not None and reply.get("identity", _MISSING) != info["identity"]


def refuse_another(url: str, path: str, reply: dict[str, Any], info: dict[str, Any],
                   now: dict[str, Any] | None) -> UserError:
    """The one line for an answer to ``path`` whose identity is not the one of ``info`` (``another_teacher``);
    ``now``: the server's ``/health`` answer of now, if it gave one, to name the fingerprints that changed."""
    got = reply.get("identity", _MISSING)
    if not _sha(got):
        return UserError(f"teacher server at {url} answered {path} with identity {_show(got)}, expected the "
                         f"sha256 that its /health (protocol {IDENTITY_PROTOCOL}) sent: was it restarted with "
                         f"another vopd?{SCORE_ADVICE}")
    changed = [f"{key} {str(info.get(key))[:12]} -> {str(now.get(key))[:12]}" for key in IDENTITY_FIELDS
               if now is not None and now.get(key) != info.get(key)]
    return UserError(f"teacher server at {url} now serves another teacher than the one the pre-flight checked "
                     f"(identity {str(info['identity'])[:12]} -> {str(got)[:12]}{': ' if changed else ''}"
                     f"{', '.join(changed)}): was it restarted with another model or tokenizer? Serve the run's "
                     f"teacher there again{SCORE_ADVICE}")


def score_results(reply: dict[str, Any], url: str, count: int, echo: dict[str, object]) -> list[dict[str, Any]]:
    """The ``count`` results of a ``/score`` answer, in order, each an object; the answer's ``echo`` fields
    (``encoding``, ``k``, ``hidden``), where it has them, must be the request's."""
    for key, want in echo.items():
        if key in reply and reply[key] != want:
            raise _malformed(url, key, reply[key], f"{want!r}, the request's")
    results = reply.get("results", _MISSING)
    expected = f"a list of {count} results, one per sequence sent"
    if not isinstance(results, list):
        raise _malformed(url, "results", results, expected)
    if len(results) != count:
        raise _malformed(url, "results", f"a list of {len(results)}", expected, shown=True)
    for i, res in enumerate(results):
        if not isinstance(res, dict):
            raise _malformed(url, f"results[{i}]", res, "an object")
    return results


def decode(res: dict[str, Any], i: int, name: str, dtype: torch.dtype, count: int, url: str) -> Tensor:
    """Result ``i``'s field ``name``: ``count`` values of ``dtype`` in base64 (``vopd.teacher.wire.b64_decode``)."""
    value = res.get(name, _MISSING)
    expected = f"base64 of {count} {str(dtype).removeprefix('torch.')} values"
    if not isinstance(value, str):
        raise _malformed(url, f"results[{i}].{name}", value, expected)
    try:
        return b64_decode(value, dtype, count)
    except ValueError as exc:
        raise UserError(f"teacher server at {url} sent a malformed /score answer: results[{i}].{name} {exc} "
                        f"({expected}){SCORE_ADVICE}") from None


# --- /score: impossible numbers -------------------------------------------------------------------------------------

def check_numbers(url: str, i: int, logq: Tensor, y: Tensor, logits: Tensor | None = None,
                  topk: Tensor | None = None, lse: Tensor | None = None) -> None:
    """Result ``i``'s numbers at ids, refused when no teacher can send them. ``logq`` (T,): log q(y_t) at the next
    ids ``y`` (T,); ``logits`` (T, k): the logits at ``topk`` (T, k); ``lse`` (T,): the log-sum-exp. Sums over the
    ids skip rows that name an id twice (the zero rows of positions outside the completion mask)."""
    for name, x in (("logq", logq), ("logits", logits), ("lse", lse)):
        if x is not None:
            _finite(url, f"results[{i}].{name}", x)
    _refuse(url, i, "logq", logq > 1e-4, logq, "is a positive log-probability")
    if logits is None or topk is None:
        return
    ordered = topk.sort(-1).values
    distinct = ~(ordered[:, 1:] == ordered[:, :-1]).any(-1)
    here = topk == y.unsqueeze(-1)
    has_y = here.any(-1) & distinct
    z_y = (logits * here).sum(-1)
    if lse is None:  # the scale is unknown: log q(y_t) is at most its share among the asked ids
        share = z_y - logits.logsumexp(-1)
        _refuse(url, i, "logq", has_y & (logq > share + _tol(logits)), logq,
                "is above log(softmax over the asked ids) of the next token, which is one of them: a probability "
                "cannot exceed its share among the asked ids")
        return
    tol = _tol(lse.unsqueeze(-1))
    mass = (logits - lse.unsqueeze(-1)).logsumexp(-1)
    mass = torch.where(has_y, mass, torch.logaddexp(mass, logq))  # y_t counted once
    _refuse(url, i, "logits", distinct & (mass > tol), mass.exp(),
            "is the probability that the logits and lse give the asked ids (and y_t) in all: more than 1")
    _refuse(url, i, "logq", has_y & ((logq + lse - z_y).abs() > tol), logq,
            "is not the next token's logit minus lse, though it is one of the asked ids")


def check_hidden(url: str, i: int, hidden: Tensor) -> None:
    """Result ``i``'s hidden states (T, D), refused when non-finite or when a row is all zeros (what a server that
    sends nothing at a position looks like)."""
    _finite(url, f"results[{i}].hidden", hidden)
    zero = (hidden == 0).all(-1)
    if zero.any():
        raise UserError(f"teacher server at {url} sent impossible numbers in a /score answer: results[{i}].hidden at "
                        f"scored position {int(zero.nonzero()[0])} is an all-zero hidden state, which a decoder's "
                        f"final norm never outputs{SCORE_ADVICE}")


def check_probe(url: str, i: int, res: dict[str, Any], head: OutputHead, rows: Tensor, y: Tensor,
                rounded: bool) -> None:
    """Result ``i``'s ``probe`` (protocol 4: base64 of the server's log q of the next ids ``y`` (2,) at the first
    and the last scored position, float32) against log q formed here from its hidden states there (``rows``
    (2, D)) with the teacher's output layer ``head``. ``rounded``: the states travelled in a narrower dtype than
    the server's weights (a float32 server asked for bfloat16), which moves log q by up to a few 0.01."""
    theirs = decode(res, i, "probe", torch.float32, len(y), url)
    _finite(url, f"results[{i}].probe", theirs)
    logq, lse = probe_logq(head, rows, y)
    # Generous: another matmul order (or TF32 on a GPU) moves fp32 logits by ~1e-3 of their size; garbage moves
    # them by far more.
    tol = (0.25 + 0.02 * lse.abs()) if rounded else (0.05 + 3e-3 * lse.abs())
    off = ((logq - theirs).abs() > tol).nonzero()
    if off.numel():
        j = int(off[0])
        raise UserError(f"teacher server at {url} sent impossible numbers in a /score answer: results[{i}].hidden "
                        f"gives log q = {float(logq[j]):.4g} at its {('first', 'last')[j]} scored position with the "
                        f"teacher's output layer, but its probe says {float(theirs[j]):.4g}: these are not that "
                        f"teacher's states there{SCORE_ADVICE}")


@torch.no_grad()
def probe_logq(head: OutputHead, rows: Tensor, y: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """(log q(y), log-sum-exp) in fp32 on the CPU of the final-norm states ``rows`` (m, D) through ``head``, over
    ``chunk`` vocabulary rows at a time (no (V, D) fp32 copy of a half-precision layer)."""
    h = rows.to(head.weight.device, torch.float32)
    y = y.to(h.device)
    lse = torch.full((h.shape[0],), -math.inf, device=h.device)
    z_y = torch.zeros(h.shape[0], device=h.device)
    for lo in range(0, head.weight.shape[0], chunk):
        z = h @ head.weight[lo: lo + chunk].float().t()
        if head.bias is not None:
            z += head.bias[lo: lo + chunk].float()
        z = head.transform.apply_(z)
        lse = torch.logaddexp(lse, z.logsumexp(-1))
        inside = (y >= lo) & (y < lo + z.shape[1])
        z_y[inside] = z[inside, y[inside] - lo]
    return (z_y - lse).cpu(), lse.cpu()


# --- helpers ------------------------------------------------------------------------------------------------------

def _finite(url: str, field: str, x: Tensor) -> None:
    bad = (~torch.isfinite(x)) | (x.abs() > ABSURD)
    if bad.any():
        at = tuple(int(v) for v in bad.nonzero()[0])
        value = float(x[at])
        what = "is not finite" if not math.isfinite(value) else f"is beyond +-{ABSURD:g}, which no teacher reaches"
        raise UserError(f"teacher server at {url} sent impossible numbers in a /score answer: {field}"
                        f"{list(at)} = {value:.4g} {what}{SCORE_ADVICE}")


def _refuse(url: str, i: int, name: str, bad: Tensor, value: Tensor, why: str) -> None:
    """A ``UserError`` at the first scored position ``j`` where ``bad`` (T,) holds: results[i].name[j] = value."""
    if bad.any():
        j = int(bad.nonzero()[0])
        raise UserError(f"teacher server at {url} sent impossible numbers in a /score answer: results[{i}].{name} "
                        f"at scored position {j}: {float(value[j]):.4g} {why}{SCORE_ADVICE}")


def _tol(scale: Tensor) -> Tensor:
    """fp32 rounding of logit arithmetic at the magnitude of ``scale`` (..., k), per row, generously."""
    return 1e-3 + 1e-4 * scale.abs().amax(-1)


def _malformed(url: str, field: str, value: object, expected: str, *, shown: bool = False) -> UserError:
    got = value if shown else _show(value)
    return UserError(f"teacher server at {url} sent a malformed /score answer: {field} is {got}, expected "
                     f"{expected}{SCORE_ADVICE}")


def _show(value: object) -> str:
    if value is _MISSING:
        return "missing"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}... ({type(value).__name__})"


def _count(value: object) -> bool:
    return type(value) is int and value >= 1


def _positive(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0  # type: ignore[arg-type,operator]


def _sha(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


