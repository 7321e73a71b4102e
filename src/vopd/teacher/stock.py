"""What the clients of stock inference servers share (``vopd.teacher.stock_vllm``, ``vopd.teacher.stock_sglang``).

What it knows: several replicas of one teacher over the shared transport (``vopd.teacher.http``): each request
goes to the next live replica, one that stays unreachable after its retries is skipped for the rest of the run and
the request goes to another, and per-replica counts (``server_metrics``); the two routes every stock engine offers
and what ``score`` answers on each (hidden states projected by the teacher's output layer loaded here from
``head``: ``TeacherHidden``, every method; or log-probs: log q(y_t), and the teacher's own top-k for
``vopd-ttopk``, ``serve_own_topk``); the spans of a rollout that are sent, refused when they pass the server's
context length (naming the engine's flag); the pre-flight's tokenizer probes (``POST /tokenize``, which vLLM and
SGLang both answer with ``tokens``). What it does not know: any engine's request bodies or answers, which methods
a route serves (each subclass's ``supports``), the loss math, or the loop.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.loss.head import OutputHead
from vopd.loss.scores import TeacherHidden, TeacherNumbers
from vopd.rollout import Rollout
from vopd.teacher.http import Item, Limits, Session, Unreachable, pack
from vopd.teacher.wire import TOKEN_ENV

if TYPE_CHECKING:
    from vopd.models import Tokenizer

#: Texts whose encodings by the server's tokenizer and the student's must agree (``tokenizer_checks``).
PROBE_TEXTS = ("1 + 2 = 3", "What is 7 + 5? Think step by step.")
#: Row norms of hidden states within this of 1 at every position: L2-normalised rows (an embedding pooler's), whose
#: logits' scale is gone (docs/teacher_server.md, "Stock vLLM servers").
UNIT_NORM = 1e-3


def unit_rows(h: Tensor) -> bool:
    """Whether the hidden states ``h`` (T, D) of a sequence longer than one token are L2-normalised rows."""
    return h.shape[0] > 1 and bool(((h.norm(dim=-1) - 1).abs() < UNIT_NORM).all())
#: What to do after a refused answer, for an engine's name.
ADVICE = ("; nothing of that answer was trained on: check or restart the {engine} server and run again (vopd train: "
          "--resume continues from the last checkpoint, which is kept)")


class StockTeacher:
    """Base of a client of one or more stock servers serving one teacher (replicas).

    urls: ``http://host:port`` each. ``head``: the local checkpoint the servers serve; given, the servers are asked
    for hidden states and ``score`` returns ``TeacherHidden``; else log-probs. ``max_seqs``, ``max_mb``: the most
    sequences and request/answer megabytes of one request. ``token``: the API key, None reads
    ``$VOPD_TEACHER_TOKEN``. A subclass names its engine and its flags (the class attributes), and gives
    ``_states`` (hidden states of sequences), ``_score_logprobs`` and ``_limit`` (the server's context length).
    """

    engine = "stock"  #: the engine's name in messages
    limit_name, limit_flag = "max_model_len", "--max-model-len"  #: the server's context length and its flag
    logprob_server = "generate"  #: what the log-prob route's server is called
    hidden_route = "the hidden-state route"  #: how to reach hidden states, in a refusal
    hidden_bytes = 6  #: answer bytes per hidden-state number, generous (for packing and the answer cap)
    tokenizer: Tokenizer | None = None  # the server's tokenizer is compared through /tokenize (tokenizer_checks)

    def __init__(self, urls: list[str], *, vocab_size: int, head: str | None = None, token: str | None = None,
                 timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5, max_seqs: int = 64,
                 max_mb: float = 64.0, trust_remote_code: bool = False) -> None:
        if not urls:
            raise UserError(f"a stock {self.engine} teacher needs at least one URL (model.teacher=http://HOST:PORT)")
        self.advice = ADVICE.format(engine=self.engine)
        self.sessions = [Session(u, token=token, token_env=TOKEN_ENV, timeout_s=timeout_s, retries=retries,
                                 backoff_s=backoff_s) for u in urls]
        self.urls = [s.url for s in self.sessions]
        self.url = ",".join(self.urls)
        self.head_path, self.vocab_size, self._trust = head, vocab_size, trust_remote_code
        self.own_topk = 0  # > 0: the log-prob route answers with the teacher's own top-k (``serve_own_topk``)
        self.limits = Limits(max_batch=max_seqs, max_tokens=2**62, max_body=max_mb * 2**20, max_answer=max_mb * 2**20)
        self._head: OutputHead | None = None
        self._model: dict[str, Any] | None = None  # {"name", "max_model_len", ...}, the same on every replica
        self._next = 0  # the replica the next request goes to
        self.dead: set[int] = set()  # replicas that stayed unreachable: skipped from then on
        #: Per server: requests answered, seconds spent, failovers away from it (``metrics``).
        self.stats = {u: {"requests": 0, "seconds": 0.0, "failovers": 0} for u in self.urls}

    @property
    def full_distribution(self) -> bool:
        return self.head_path is not None

    def close(self) -> None:
        for s in self.sessions:
            s.close()

    def __enter__(self) -> "StockTeacher":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def server_metrics(self) -> dict[str, float]:
        """Per replica ``I`` (its place in ``urls``), totals since the start: ``I/requests``, ``I/seconds``,
        ``I/failovers`` (requests it could not answer, handed to another), ``I/sent_mb``, ``I/received_mb``; the
        trainer logs them as ``teacher_server/NAME/I/...`` (docs/metrics.md)."""
        out: dict[str, float] = {}
        for i, s in enumerate(self.sessions):
            st = self.stats[s.url]
            for key, value in (*st.items(), ("sent_mb", s.bytes_sent / 2**20), ("received_mb", s.bytes_received / 2**20)):
                out[f"{i}/{key}"] = float(value)
        return out

    # -- transport over the replicas --------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any], max_answer: float, array_key: str | None = None) -> dict[str, Any]:
        """The JSON answer of one request, from the next live replica; an unreachable one hands it to another.
        ``array_key``: an answer that is a JSON array comes back as ``{array_key: it}``."""
        last: Unreachable | None = None
        for _ in range(len(self.sessions)):
            live = [i for i in range(len(self.sessions)) if i not in self.dead]
            if not live:
                break
            i = live[self._next % len(live)]
            self._next += 1
            session, start = self.sessions[i], time.monotonic()
            try:
                answer = session.request("POST", path, body, max_answer=max_answer, advice=self.advice,
                                         array_key=array_key)
            except Unreachable as exc:
                self.stats[session.url]["failovers"] += 1
                self.dead.add(i)
                last = exc
                continue
            self.stats[session.url]["requests"] += 1
            self.stats[session.url]["seconds"] += time.monotonic() - start
            return answer
        assert last is not None
        raise last if len(self.sessions) == 1 else self._all_down(last)

    def _all_down(self, last: UserError) -> UserError:
        return UserError(f"every {self.engine} replica of this teacher is unreachable ({self.url}; last: {last}); "
                         "restart them and run again (vopd train: --resume continues from the last checkpoint, which "
                         "is kept)")

    def _ask_replicas(self, path: str) -> list[tuple[str, dict[str, Any]]]:
        """(url, answer) of ``GET path`` from every replica; one down at the start is skipped (the others serve, as
        for one down later); every one down is one line."""
        seen = []
        last: Unreachable | None = None
        for index, s in enumerate(self.sessions):
            if index in self.dead:
                continue
            try:
                seen.append((s.url, s.request("GET", path, max_answer=2**20, advice=self.advice)))
            except Unreachable as exc:
                self.dead.add(index)
                self.stats[s.url]["failovers"] += 1
                last = exc
        if not seen:
            assert last is not None
            raise last if len(self.sessions) == 1 else self._all_down(last)
        return seen

    def _agree(self, seen: list[tuple[str, str, int]]) -> dict[str, Any]:
        """``{"name", "max_model_len"}`` of (url, model name, context length) per replica, which must agree."""
        for url, name, length in seen[1:]:
            if (name, length) != seen[0][1:]:
                raise UserError(f"the {self.engine} replicas of one teacher differ: {seen[0][0]} serves "
                                f"{seen[0][1]!r} ({self.limit_name} {seen[0][2]}), {url} serves {name!r} "
                                f"({self.limit_name} {length}): start every replica with the same model and flags")
        return {"name": seen[0][1], "max_model_len": seen[0][2]}

    def model_info(self) -> dict[str, Any]:
        raise NotImplementedError

    def tokenizer_checks(self, student_tok: Tokenizer) -> None:
        """The server's tokenizer (``POST /tokenize`` of probe texts) encodes as the student's does."""
        info = self.model_info()
        for text in PROBE_TEXTS:
            mine = list(student_tok(text)["input_ids"])
            answer = self._post("/tokenize", {"model": info["name"], "prompt": text}, 2**20)
            if answer.get("tokens") != mine:
                raise UserError(f"the {self.engine} server at {self.url} ({info['name']}) tokenizes {text!r} as "
                                f"{str(answer.get('tokens'))[:80]}, the student as {mine}: OPD needs one shared "
                                "tokenizer: serve a teacher from the student's model family")

    # -- scoring ------------------------------------------------------------------------------------------------

    def score(self, rollout: Rollout, topk_ids: Tensor | None = None, *,
              lse: bool = False) -> TeacherNumbers | TeacherHidden:
        """Hidden-state route: hidden states (B, L-1, D), 0 outside completion positions, with the output layer.
        Log-prob route: log q(y_t) (``topk_ids`` or ``lse`` refused: ``supports`` names the hidden-state route)."""
        if self.head_path is not None:
            return self._score_hidden(rollout)
        if topk_ids is not None or lse:
            raise UserError(f"a stock {self.engine} {self.logprob_server} server ({self.url}) cannot score the "
                            "student's top-k ids or the teacher's log-sum-exp: use "
                            f"{self.hidden_route} (model.teachers[].head) or loss.method=opd")
        if self.own_topk:
            return self.score_teacher_topk(rollout, self.own_topk)
        logq, _ids, _lp = self._score_logprobs(rollout, 0)
        return TeacherNumbers(logq).to(rollout.input_ids.device)

    def serve_own_topk(self, k: int) -> None:
        """From now on the log-prob route answers with the teacher's own top-k at every position (``vopd-ttopk``,
        ``loss.top_k`` = k; ``vopd.teacher.base.prepare_for``); the hidden-state route sends hidden states anyway."""
        self.own_topk = 0 if self.head_path is not None else k

    def score_teacher_topk(self, rollout: Rollout, k: int) -> TeacherNumbers:
        """The teacher's own top-k at every completion position (log-prob route):
        ``TeacherNumbers(logq, topk_ids = its top-k ids, topk_logits = its log-probs there, lse=None)``, (B, L-1[, k]),
        zeros outside the completion positions."""
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        logq, ids, lp = self._score_logprobs(rollout, k)
        device = rollout.input_ids.device
        return TeacherNumbers(logq.to(device), ids.to(device), lp.to(device))

    def _score_logprobs(self, rollout: Rollout, k: int) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _states(self, seqs: list[list[int]], width: int) -> list[Tensor]:
        raise NotImplementedError

    def _limit(self) -> int:
        """The server's context length (0: unknown)."""
        return int(self.model_info()["max_model_len"])

    def _output_layer(self) -> OutputHead:
        if self._head is None:
            from vopd.models import load_output_layer

            self._head = load_output_layer(str(self.head_path), vocab_size=self.vocab_size, dtype=torch.float32,
                                           trust_remote_code=self._trust)
        return self._head

    def _score_hidden(self, rollout: Rollout) -> TeacherHidden:
        head = self._output_layer()
        device = rollout.input_ids.device
        if head.weight.device != device:  # moved once: the layer stays where the loss runs
            head = self._head = OutputHead(head.weight.to(device), None if head.bias is None else head.bias.to(device),
                                           head.transform)
        d = head.weight.shape[1]
        ids = rollout.input_ids.cpu()
        b, t = rollout.loss_mask.shape
        hidden = torch.zeros(b, t, d, dtype=torch.float32)
        # Position p's state predicts ids[p + 1]: positions 0..end-1 are sent, rows start..end-1 kept.
        spans = self._spans(rollout, self._limit())
        items = [Item(tokens=e, body=8 * e + 64, answer=e * d * self.hidden_bytes + 512) for _i, _s, e in spans]
        for group in (([spans[j] for j in g]) for g in pack(items, self.limits)):
            states = self._states([ids[i, :e].tolist() for i, _s, e in group], d)
            for (i, start, end), h in zip(group, states):
                hidden[i, start:end] = h[start:end]
        return TeacherHidden(hidden.to(device), head.weight, head.bias, head.transform)

    def _spans(self, rollout: Rollout, limit: int, extra: int = 0) -> list[tuple[int, int, int]]:
        """(row, first scored position, one past the last) per sequence with completion tokens; a sequence longer
        than the server's context length ``limit`` (0: unknown) is refused naming the flag."""
        mask = rollout.loss_mask.cpu()
        spans = []
        for i in range(mask.shape[0]):
            live = mask[i].nonzero().squeeze(-1)
            if live.numel():
                end = int(live[-1]) + 1
                if limit and end + 1 + extra > limit:
                    raise UserError(f"a sequence of {end + 1} tokens does not fit the {self.engine} server's "
                                    f"{self.limit_name}={limit} ({self.url}): restart it with {self.limit_flag} "
                                    f"{end + 1 + extra} or more")
                spans.append((i, int(live[0]), end))
        return spans
