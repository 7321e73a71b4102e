"""A stock vLLM pooling teacher's output layer checked against the served model: one probe sequence, scored two ways.

What it knows: one probe sequence's log q(y_t) at every position computed from the pooling route's hidden states
through the output layer loaded here (``head``), and the same numbers from a generate-route vLLM server of the same
model (``model.teachers[].head_reference``: ``/v1/completions`` with ``prompt_logprobs: 0``); the tolerance of their
largest difference, from the precision the pooling server computed in (read off the bits of the states it sent);
one line when they agree, else one ``UserError`` naming both servers and the head directory. Without a reference,
the one line saying what was not checked and how to check it. What it does not know: the teacher's other pre-flight
checks or its transport over replicas (``vopd.teacher.stock_vllm``, whose ``pairing_checks`` calls this), scoring a
rollout, or the loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.loss.head import OutputHead
from vopd.teacher.http import Rejected, Session
from vopd.teacher.replies import ABSURD, probe_logq
from vopd.teacher.stock_answers import completion_requests, read_prompt_logprobs

#: Largest |difference| of log q(y_t) allowed between the two routes when the pooling server computes in fp32: both
#: are the same fp32 forward (measured ~4e-6 on the CPU build, docs/teacher_server.md "Stock vLLM servers"), while
#: the output layer of another checkpoint is off by tenths of a nat or more.
FP32_TOLERANCE = 1e-3
#: The same with a half-precision (bf16/fp16) server: each route's bf16 trunk is ~0.05-0.08 nats off an fp32
#: forward (measured on every route, docs/teacher_server.md "Stock vLLM servers"), and the two routes round
#: differently (the local output layer is fp32, the generate server's is not; other kernels and batch shapes), so
#: they may differ by twice that: 0.25 nats leaves a margin. It still refuses another model, not always a close
#: fine-tune of the served one.
HALF_TOLERANCE = 0.25
#: The low 13 mantissa bits of a float32: zero in every value upcast from bf16 (16 zero bits) or fp16 (13).
_HALF_BITS = 0x1FFF


def computed_in_half(states: Tensor) -> bool:
    """Whether every value of ``states`` (float32, as the pooling route sends them) is a bf16 or fp16 value upcast:
    the server's forward ran in half precision (its states are cast to fp32 on the way out)."""
    bits = states.detach().to(torch.float32).contiguous().view(torch.int32)
    return bool(((bits & _HALF_BITS) == 0).all())


def reference_logprobs(reference: Session, ids: list[int], advice: str) -> tuple[str, Tensor]:
    """(the reference's model name, log q(ids[j]) for j = 1..T-1 from its ``prompt_logprobs: 0``)."""
    url = reference.url
    data = reference.request("GET", "/v1/models", max_answer=2**20, advice=advice).get("data")
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict) or "id" not in data[0]:
        raise UserError(f"the head reference at {url} answered GET /v1/models without exactly one model in 'data' "
                        f"(got {str(data)[:100]}): point model.teachers[].head_reference at a vLLM generate server")
    name = str(data[0]["id"])
    try:
        answer = reference.request("POST", "/v1/completions", completion_requests(name, [ids], 0),
                                   max_answer=2**20 + 400 * len(ids), advice=advice)
    except Rejected as exc:
        raise UserError(f"the head reference at {url} rejected a /v1/completions request (HTTP {exc.status}: "
                        f"{exc.detail}): is it a pooling server? model.teachers[].head_reference needs a server "
                        "started without --runner pooling") from None
    rows = read_prompt_logprobs(answer, 1, url, advice)[0]
    if len(rows) != len(ids):
        raise UserError(f"the head reference at {url} sent {len(rows)} prompt_logprobs for a prompt of {len(ids)} "
                        f"tokens{advice}")
    return name, torch.tensor([_logprob(rows[j], ids[j], url, j, advice) for j in range(1, len(ids))])


def _logprob(entry: Any, y: int, url: str, pos: int, advice: str) -> float:
    try:
        value = float(entry[str(y)]["logprob"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"the head reference at {url} sent prompt_logprobs[{pos}] without the log-prob of the token "
                        f"{y} it was sent{advice}") from None
    if not -ABSURD < value <= 1e-4:  # a log-prob is <= 0 (a rounding above); NaN fails too
        raise UserError(f"the head reference at {url} sent an impossible log-prob {value} in prompt_logprobs[{pos}]"
                        f"{advice}")
    return value


def check_head(head: OutputHead, head_path: str, states: Tensor, ids: list[int], pooled_by: str,
               reference: Session, advice: str) -> str:
    """The passed line of the probe ``ids`` whose hidden ``states`` (T, D) the pooling server(s) ``pooled_by`` sent:
    their log q(y_t) through ``head`` against ``reference``'s; a ``UserError`` naming both servers and ``head_path``
    when they differ by more than the tolerance of the server's precision."""
    name, theirs = reference_logprobs(reference, ids, advice)
    # log q(ids[t + 1]) from the state at t through the head, in fp32 (sliced to the tokenizer, as every vopd teacher
    # is; vLLM normalises over its padded rows too, whose mass is negligible in a trained model).
    mine, _lse = probe_logq(head, states[:-1], torch.tensor(ids[1:], dtype=torch.long))
    diff = (mine - theirs).abs()
    half = computed_in_half(states)
    tolerance = HALF_TOLERANCE if half else FP32_TOLERANCE
    worst = float(diff.max())
    kind = "half-precision" if half else "fp32"
    if not worst <= tolerance:  # NaN fails too
        at = int(torch.nan_to_num(diff, nan=math.inf).argmax())
        raise UserError(f"the output layer of {head_path} with the hidden states of the vLLM server at {pooled_by} "
                        f"gives log-probs up to {worst:.3g} nats away from the generate server at {reference.url} "
                        f"({name}) on a probe sequence (position {at + 1} of {len(ids)}; tolerance {tolerance:g} for "
                        f"{kind} states): the head is not the served model's: point model.teachers[].head at the "
                        "checkpoint both servers serve (and start them with the same --dtype)")
    return (f"pooling route: the output layer of {head_path} gives the log-probs of the generate server at "
            f"{reference.url} ({name}) on a {len(ids)}-token probe within {worst:.1e} nats (tolerance {tolerance:g}, "
            f"{kind} states)")


def unchecked(head_path: str) -> str:
    """The line saying that the head was checked for its width only, and how to check it against the served model."""
    return (f"pooling route: the output layer of {head_path} was checked for its width only, not against the served "
            "model's log-probs (another checkpoint of that width would pass): to check it, serve the same model on a "
            "generate-route vLLM server too and set model.teachers[].head_reference=http://HOST:PORT")
