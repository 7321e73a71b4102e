"""The client of a `vopd serve-teacher` server: its protocols, over the shared HTTP transport (``vopd.teacher.http``).

What it knows: the vopd server's protocols. Numbers at ids (protocol 1; 2 adds the teacher's log-sum-exp): turning a
``Rollout`` (+ the student's top-k ids) into ``/score`` requests sized to the limits ``/health`` reports, and putting
the answers back on the rollout's (B, L-1) grid as ``TeacherNumbers``: log q(y_t), the teacher's logits at the asked
ids and (`rb-topk`) its log-sum-exp. Renormalising on the same ids cancels the teacher's log-sum-exp
(docs/estimators.md), so its logits at the ids suffice for the top-k KL. Hidden states (protocol 3), given the
teacher's output layer (``head``): it asks for the teacher's last hidden states and returns ``TeacherHidden`` with
the output layer it loaded from the teacher's checkpoint (only that layer: ``vopd.models.load_output_layer``), after
checking its fingerprint against the server's: the fused head then forms the teacher's logits exactly as for an
in-process teacher, so every method works, the full-vocabulary ones included. Which methods a server can serve, by
form and protocol version (``supports``), and the identity checks of the pre-flight (tokenizer and output-layer
fingerprints: the teacher's tokenizer is never loaded here). Each answer is checked before anything in it is used
(``vopd.teacher.replies``: its structure, its numbers, the server's identity against the pre-flight's, hidden states
against the server's probes with the output layer), and read no further than twice what it should take.

What it does not know: HTTP (sessions, tokens, retries, byte counts, packing requests, bounded reads:
``vopd.teacher.http``), the codec (``vopd.teacher.wire``), what a valid answer holds (``vopd.teacher.replies``), the
training loop, the loss math (``vopd.loss.chunked`` takes the numbers),
checkpoints (it only tells the user to resume), or the server side (``vopd.teacher.server``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.loss.head import OutputHead
from vopd.loss.scores import TeacherHidden, TeacherNumbers
from vopd.rollout import Rollout
from vopd.teacher.answers import Answers, lacks
from vopd.teacher.http import Item, Limits, Session, pack
from vopd.teacher.replies import (HEALTH_ADVICE, SCORE_ADVICE, another_teacher, check_health, check_hidden,
                                  check_numbers, check_probe, decode, refuse_another, score_results)
from vopd.teacher.wire import (HIDDEN_DTYPES, HIDDEN_PROTOCOL, IDENTITY_PROTOCOL, LSE_PROTOCOL, TOKEN_ENV,
                               b64_encode, head_fingerprint, response_bytes, tokenizer_fingerprint)

if TYPE_CHECKING:
    from vopd.loss.methods import MethodSpec
    from vopd.models import Model, Tokenizer

#: A span of one sequence sent for scoring: (row, first scored position, one past the last).
Span = tuple[int, int, int]
#: The most bytes read of a ``/health`` answer (a real one is under 1 KiB).
HEALTH_BYTES = 2**20


class RemoteTeacher:
    """Client of ``vopd serve-teacher``.

    url: ``http://host:port``. token: bearer token; None reads ``$VOPD_TEACHER_TOKEN`` (unset or empty: none).
    ``timeout_s``, ``retries``, ``backoff_s``: the transport's (``vopd.teacher.http.Session``, ``self.http``, which
    also counts the bytes sent and received). ``head``: the local directory of the checkpoint the server serves
    (config.json + safetensors): only its output layer is loaded, at the server's dtype, and the server is asked for
    hidden states (``hidden_dtype``: "float32", "bfloat16", or "auto": bfloat16 when the server's weights are half
    precision, else float32); ``score`` then returns the full distribution (``full_distribution`` is true).
    """

    #: The server's tokenizer is not here: its fingerprint stands in for it (``pairing_checks``).
    tokenizer: Tokenizer | None = None

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5, head: str | None = None, hidden_dtype: str = "auto",
                 trust_remote_code: bool = False) -> None:
        self.http = Session(url, token=token, token_env=TOKEN_ENV, timeout_s=timeout_s, retries=retries,
                            backoff_s=backoff_s)
        self.url = self.http.url
        self._info: dict[str, Any] | None = None
        if hidden_dtype != "auto" and hidden_dtype not in HIDDEN_DTYPES:
            raise UserError(f"hidden_dtype={hidden_dtype!r}; valid: auto, {', '.join(HIDDEN_DTYPES)}")
        if head is not None:
            from vopd.models import _check_model_dir

            _check_model_dir(head, "teacher_head")  # a wrong path fails now, not at the first step
        self.head_path, self._hidden_dtype, self._trust_remote_code = head, hidden_dtype, trust_remote_code
        self._head: OutputHead | None = None  # loaded once the server's dtype is known (``_output_layer``)

    @property
    def full_distribution(self) -> bool:
        """With the teacher's output layer here, the server's hidden states give its whole distribution."""
        return self.head_path is not None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "RemoteTeacher":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        """The server's ``/health``: model, vocab_size, limits (cached for request splitting), checked
        (``vopd.teacher.replies.check_health``); asked again, the server's identity must not have changed."""
        info = self._fetch_health()
        if self._info is not None and another_teacher(info, self._info):
            raise refuse_another(self.url, "/health", info, self._info, info)
        self._info = info
        return info

    def _fetch_health(self) -> dict[str, Any]:
        answer = self.http.request("GET", "/health", max_answer=HEALTH_BYTES, advice=HEALTH_ADVICE)
        return check_health(answer, self.url)

    @property
    def vocab_size(self) -> int:
        return int((self._info or self.health())["vocab_size"])

    def supports(self, spec: MethodSpec) -> str | None:
        """Hidden states (``head``): every method, from a protocol-3 server. Numbers at ids: the methods that need
        no full distribution (the others refused without asking the server), ``rb-topk`` (the teacher's
        log-sum-exp) from a protocol-2 server."""
        if self.head_path is not None:
            return _no_hidden(self._info or self.health(), self.url)
        need = lacks(spec, Answers(at_ids=True, lse=True))  # the log-sum-exp depends on the version: below
        if need is not None:
            return (f"loss.method={spec.name} needs {need}, which a teacher server ({self.url}) sends only as hidden "
                    "states: set its head (model.teachers[].head=DIR, the served checkpoint's directory: only its output "
                    "layer is loaded here), or use loss.method=vopd-topk (the same unbiased gradient with a top-k baseline), "
                    "or a local teacher directory")
        if lacks(spec, Answers(at_ids=True)) is None:  # log q(y_t) and logits at ids: every protocol sends them
            return None
        version = _version(self._info or self.health())
        if version < LSE_PROTOCOL:
            return (f"loss.method={spec.name} needs the teacher's log-sum-exp, which the teacher server at {self.url} "
                    f"sends from protocol {LSE_PROTOCOL} on; it speaks protocol {version}: update vopd on the server "
                    "and restart it, or use loss.method=vopd-topk")
        return None

    def pairing_checks(self, student: Model, student_tok: Tokenizer) -> list[str]:
        """The tokenizer fingerprint from ``/health`` stands in for comparing the tokenizers."""
        health = self.health()
        lines = [_same_tokenizer(health, student_tok, self.url)]
        if _version(health) < IDENTITY_PROTOCOL:
            lines[0] += (f"; protocol {_version(health)} answers carry no identity, so a restart of the server with "
                         "another teacher would go unnoticed: update vopd on the server")
        if self.head_path is not None:
            head = self._output_layer()
            lines.append(f"teacher output layer from {self.head_path} is the server's ({tuple(head.weight.shape)}, "
                         f"{str(head.weight.dtype).removeprefix('torch.')}, logit transform: "
                         f"{head.transform.describe()}; fingerprint {str(health.get('head_sha256'))[:12]}): hidden "
                         f"states as {self._wire_dtype()}, every method exact")
        return lines

    def score(self, rollout: Rollout, topk_ids: Tensor | None = None, *,
              lse: bool = False) -> TeacherNumbers | TeacherHidden:
        """log q(y_t) at every completion position of ``rollout``; given ``topk_ids`` (B, L-1, k) aligned with
        ``rollout.targets``, the teacher's logits at those ids; with ``lse``, its full-vocabulary log-sum-exp
        (protocol 2). With ``head``: the teacher's hidden states (B, L-1, D), 0 outside completion positions, and its
        output layer (``topk_ids`` and ``lse`` are not needed). Results are on the rollout's device."""
        if self.head_path is not None:
            return self._score_hidden(rollout)
        return self._score_numbers(rollout, topk_ids, lse)

    # -- numbers at ids (protocols 1 and 2) -----------------------------------------------------------------------

    def _score_numbers(self, rollout: Rollout, topk_ids: Tensor | None, lse: bool) -> TeacherNumbers:
        info = self._info or self.health()
        limits = info["limits"]
        if lse and _version(info) < LSE_PROTOCOL:
            raise UserError(f"teacher server at {self.url} speaks protocol {info.get('protocol')}, which does not send "
                            f"the teacher's log-sum-exp that rb-topk needs (protocol {LSE_PROTOCOL}); update vopd on "
                            "the server and restart it, or use loss.method=vopd-topk")
        ids, mask = rollout.input_ids.cpu(), rollout.loss_mask.cpu()
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
        for group in _groups(_spans(rollout), k, limits, lse):
            body = _numbers_request(ids, group, k, topk_ids, lse)
            results = self._ask(body, group, {"encoding": "base64", "k": k}, k, lse)
            for j, ((i, start, end), res) in enumerate(zip(group, results)):
                n, url = end - start, self.url
                got = decode(res, j, "logq", torch.float32, n, url)
                got_logits = decode(res, j, "logits", torch.float32, n * k, url).reshape(n, k) if k else None
                got_lse = decode(res, j, "lse", torch.float32, n, url) if lse else None
                check_numbers(url, j, got, ids[i, start + 1: end + 1], got_logits,
                              None if topk_ids is None else topk_ids[i, start:end], got_lse)
                logq[i, start:end] = got
                if logits is not None and got_logits is not None:
                    logits[i, start:end] = got_logits
                if lse_out is not None and got_lse is not None:
                    lse_out[i, start:end] = got_lse
        return TeacherNumbers(logq, topk_ids, logits, lse_out).to(rollout.input_ids.device)

    def _ask(self, body: dict[str, Any], group: list[Span], echo: dict[str, object], k: int = 0, lse: bool = False,
             hidden: str | None = None, hidden_size: int = 0) -> list[dict[str, Any]]:
        """The checked results of one ``/score`` request for the spans of ``group``: the answer is read up to twice
        the bytes it should take (the server's own estimate, ``response_bytes``, plus JSON framing), carries the
        identity of the ``/health`` answer the pre-flight checked, echoes ``echo`` and holds one result per span."""
        expected = sum(response_bytes(end - start, k, lse, "base64", hidden, hidden_size) for _i, start, end in group)
        cap = 2 * expected + 1024 * len(group) + 2**16
        reply = self.http.request("POST", "/score", body, max_answer=cap, advice=SCORE_ADVICE)
        info = self._info or self.health()
        if another_teacher(reply, info):
            try:
                now: dict[str, Any] | None = self._fetch_health()  # to name what changed
            except UserError:
                now = None
            raise refuse_another(self.url, "/score", reply, info, now)
        return score_results(reply, self.url, len(group), echo)

    # -- hidden states (protocol 3) ------------------------------------------------------------------------------

    def _wire_dtype(self) -> str:
        """The dtype name the hidden states travel in."""
        if self._hidden_dtype != "auto":
            return self._hidden_dtype
        return "bfloat16" if (self._info or self.health()).get("dtype") in ("bfloat16", "float16") else "float32"

    def _output_layer(self) -> OutputHead:
        """The teacher's output layer, loaded from ``head`` at the server's dtype (so that the fingerprints compare
        like with like) and checked against the server's ``/health``, once."""
        if self._head is not None:
            return self._head
        info = self._info or self.health()
        refusal = _no_hidden(info, self.url)
        if refusal is not None:
            raise UserError(refusal)
        head = _same_head(str(self.head_path), info, self.url, self._trust_remote_code)
        self._head = head  # equal fingerprints: equal shapes, so the server's hidden_size is this layer's width
        return head

    def _score_hidden(self, rollout: Rollout) -> TeacherHidden:
        head = self._output_layer()
        device = rollout.input_ids.device
        if head.weight.device != device:  # moved once: the layer stays where the loss runs (and the probes)
            head = self._head = OutputHead(head.weight.to(device), None if head.bias is None else head.bias.to(device),
                                           head.transform)
        info = self._info or self.health()
        wire = self._wire_dtype()
        probed = _version(info) >= IDENTITY_PROTOCOL
        rounded = wire != info.get("dtype", "float32")  # the states travel narrower than the server holds them
        ids = rollout.input_ids.cpu()
        b, t = rollout.loss_mask.shape
        d = head.weight.shape[1]
        hidden = torch.zeros(b, t, d, dtype=HIDDEN_DTYPES[wire])
        for group in _groups(_spans(rollout), 0, info["limits"], hidden=wire, hidden_size=d):
            seqs = [{"ids": ids[i, : end + 1].tolist(), "start": start} for i, start, end in group]
            body = {"sequences": seqs, "encoding": "base64", "hidden": wire}
            results = self._ask(body, group, {"encoding": "base64", "hidden": wire}, hidden=wire, hidden_size=d)
            for j, ((i, start, end), res) in enumerate(zip(group, results)):
                got = decode(res, j, "hidden", HIDDEN_DTYPES[wire], (end - start) * d, self.url).reshape(-1, d)
                check_hidden(self.url, j, got)
                if probed:  # the first and the last scored position: a shift or a shuffle moves them too
                    check_probe(self.url, j, res, head, got[[0, -1]], ids[i, [start + 1, end]], rounded)
                hidden[i, start:end] = got
        return TeacherHidden(hidden.to(device), head.weight, head.bias, head.transform)


# --- the pre-flight's identity checks ---------------------------------------------------------------------------

def _same_tokenizer(health: dict[str, Any], student_tok: Tokenizer, url: str) -> str:
    """The pre-flight line of a server (``/health`` answer ``health``) whose tokenizer fingerprint is the student's;
    a ``UserError`` when it is not."""
    vocab = len(student_tok)
    mine, theirs = tokenizer_fingerprint(student_tok), health.get("tokenizer_sha256")
    if mine != theirs:
        raise UserError(f"the teacher server at {url} uses another tokenizer than the student (fingerprint "
                        f"{str(theirs)[:12]}... vs {mine[:12]}..., {health.get('vocab_size')} vs {vocab} tokens); "
                        "OPD needs one shared tokenizer: serve a teacher from the student's model family")
    return (f"teacher server {url} ({health.get('model')}, protocol {health.get('protocol')}): same "
            f"tokenizer ({vocab} tokens, fingerprint {mine[:12]})")


def _no_hidden(info: dict[str, Any], url: str) -> str | None:
    """Why the server that answered ``/health`` with ``info`` cannot send hidden states (a protocol before 3),
    or None."""
    if _version(info) >= HIDDEN_PROTOCOL:
        return None
    return (f"teacher server at {url} speaks protocol {info.get('protocol')}, which does not "
            f"send hidden states (protocol {HIDDEN_PROTOCOL}); update vopd on the server and restart it, or drop "
            "its head (model.teachers[].head) and use a method servers score at ids (opd, vopd-topk, opd-topk, rb-topk)")


def _same_head(path: str, info: dict[str, Any], url: str, trust_remote_code: bool) -> OutputHead:
    """The output layer of the checkpoint in ``path``, refused (``UserError``) unless its fingerprint is the one the
    server reports in ``/health`` (``info``)."""
    from vopd.models import load_output_layer, torch_dtype

    # At the server's weight dtype, so that the fingerprints compare like with like.
    dtype = torch_dtype(str(info.get("dtype", "float32")), torch.device("cpu"))
    head = load_output_layer(path, vocab_size=int(info["vocab_size"]), dtype=dtype,
                             trust_remote_code=trust_remote_code)
    mine, theirs = head_fingerprint(head.weight, head.bias, head.transform), info.get("head_sha256")
    if mine != theirs:
        raise UserError(f"the output layer in {path} is not the one the teacher server at {url} "
                        f"uses (fingerprint {mine[:12]}... vs {str(theirs)[:12]}..., {tuple(head.weight.shape)} "
                        f"{head.weight.dtype}, logit transform {head.transform.describe()}); point its head (model.teachers[].head; "
                        "model.teacher_head in older configs) at the directory of the checkpoint the server serves")
    return head


# --- requests -----------------------------------------------------------------------------------------------------

def _groups(spans: list[Span], k: int, limits: dict[str, Any], lse: bool = False, *, hidden: str | None = None,
            hidden_size: int = 0) -> list[list[Span]]:
    """Consecutive sequences packed into requests within the server's limits (``/health``): max_batch,
    max_tokens (padded), the body limit and the answer's limit (``max_response_mb``, from protocol-2 servers that
    report it); a sequence that alone passes max_tokens or the answer's limit is refused, naming the fix."""
    bounds = Limits(max_batch=limits["max_batch"], max_tokens=limits["max_tokens"],
                    max_body=0.9 * limits["max_body_mb"] * 2**20,
                    max_answer=0.9 * float(limits.get("max_response_mb", float("inf"))) * 2**20)
    items = []
    for _row, start, end in spans:
        n = end + 1
        if n > bounds.max_tokens:
            raise UserError(f"a sequence of {n} tokens exceeds the teacher server's max_tokens="
                            f"{limits['max_tokens']}; restart the server with a larger --max-tokens")
        size = 8 * n + (16 * (n - 1 - start) * k) // 3 + 64  # JSON ids + base64 int32 top-k, generous
        reply = response_bytes(end - start, k, lse, "base64", hidden, hidden_size)
        if reply > bounds.max_answer:
            asked = f"hidden states ({hidden_size} x {hidden})" if hidden else f"k={k}"
            raise UserError(f"scoring a sequence of {end - start} positions with {asked} needs a "
                            f"{reply / 2**20:.3g} MiB answer, over the teacher server's max_response_mb="
                            f"{limits['max_response_mb']}; restart it with a larger --max-response-mb or lower "
                            "loss.top_k")
        items.append(Item(tokens=n, body=size, answer=reply))
    return [[spans[j] for j in group] for group in pack(items, bounds)]


def _numbers_request(ids: Tensor, group: list[Span], k: int, topk_ids: Tensor | None, lse: bool) -> dict[str, Any]:
    """The ``/score`` body asking for numbers at ids for the spans of ``group`` (``ids``: the rollout's input ids on
    the CPU; ``topk_ids``: (B, L-1, k) on the CPU when k > 0)."""
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
    return body


def _version(info: dict[str, Any]) -> int:
    """The protocol version a server's ``/health`` answer ``info`` states (1 when it does not say)."""
    return int(info.get("protocol", 1))


def _spans(rollout: Rollout) -> list[Span]:
    """Per sequence with completion tokens, only tokens up to its last completion target are sent: positions
    start..end-1 are scored."""
    attention, mask = rollout.attention_mask.cpu(), rollout.loss_mask.cpu()
    spans: list[Span] = []
    for i in range(mask.shape[0]):
        live = mask[i].nonzero().squeeze(-1)
        if live.numel():
            end = int(live[-1]) + 1
            if end >= int(attention[i].sum()):
                raise ValueError(f"loss_mask of sequence {i} reaches past its attention mask")
            spans.append((i, int(live[0]), end))
    return spans
