"""A stock SGLang server (``python -m sglang.launch_server``, no vopd on it) as the teacher: its two routes.

What it knows: what SGLang's ``POST /generate`` answers that OPD can use (docs/teacher_server.md, "Stock SGLang
servers"; SGLang 0.5.23 read from its source, not run here: see the docs for why). Prompts go as token ids, a batch
at a time (``input_ids``: a list of lists, answered by a JSON array of one object per prompt, in order). The log-prob
route: ``return_logprob: true``, ``sampling_params: {max_new_tokens: 0}`` (prefill only), ``logprob_start_len: S``
per prompt: ``meta_info.input_token_logprobs`` holds one ``[logprob, id, text]`` per prompt token from S on, the
first always null, so S = P - 1 scores the tokens from P on; with ``top_logprobs_num: k``,
``meta_info.input_top_logprobs`` holds the teacher's own top k at each of those positions (the actual token is not
added, unlike vLLM's, so the set is the state's alone; the first k are kept). The hidden-state route (a server
started with ``--enable-return-hidden-states``): ``return_hidden_states: true`` returns the final-norm states
(Qwen, Llama) of the prefill in ``meta_info.hidden_states[0]`` (T rows of D JSON floats), which the teacher's output
layer loaded here (``head``) turns into its whole distribution: ``TeacherHidden``, every method exact. It asks
``max_new_tokens: 1`` there (SGLang cuts the rows to the output's length: none at 0) and ``logprob_start_len: 0``
with ``return_logprob`` (no prefix-cache reuse, so no row is skipped); a server that still sends fewer rows than
tokens (chunked prefill) is refused naming ``--chunked-prefill-size``. The pre-flight (``pairing_checks``): every
replica serves a generation model of the same name and context length (``GET /get_model_info``, ``/v1/models``),
its tokenizer (``/tokenize``) encodes probe texts as the student's does, and on the hidden-state route a probe's
states have the head's width, are not L2-normalised, and through the head give the server's own input log-probs
(pre-norm states, which SGLang returns for some architectures, or another checkpoint's head do not).

What it does not know: logits at the student's top-k ids (SGLang's ``token_ids_logprob`` is one id list for every
position of a prompt: refused, naming the hidden-state route), a live SGLang server (tested against a recorded
exchange: tests/test_stock_sglang.py), the transport over replicas (``vopd.teacher.stock``), the loss math, or the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.rollout import Rollout
from vopd.teacher.answers import Answers, lacks
from vopd.teacher.http import Item, Rejected, pack
from vopd.teacher.replies import ABSURD, check_hidden, probe_logq
from vopd.teacher.stock import PROBE_TEXTS, StockTeacher, unit_rows

if TYPE_CHECKING:
    from vopd.loss.methods import MethodSpec
    from vopd.models import Model, Tokenizer

HIDDEN_FLAG = "--enable-return-hidden-states"


def generate_body(seqs: list[list[int]], starts: list[int], *, k: int = 0, hidden: bool = False) -> dict[str, Any]:
    """One ``/generate`` body: the input log-probs of ``seqs`` from ``starts`` on (the teacher's top ``k`` too), or
    with ``hidden`` their hidden states (``max_new_tokens: 1``: at 0 SGLang sends no rows)."""
    body: dict[str, Any] = {"input_ids": seqs, "sampling_params": {"max_new_tokens": 1 if hidden else 0},
                            "return_logprob": True, "logprob_start_len": starts, "return_text_in_logprobs": False,
                            "stream": False}
    if k:
        body["top_logprobs_num"] = k
    if hidden:
        body["return_hidden_states"] = True
    return body


class StockSglangTeacher(StockTeacher):
    """Client of one or more stock SGLang servers serving one teacher (replicas; ``vopd.teacher.stock``).

    urls: ``http://host:port`` each. ``head``: the local checkpoint the servers serve; given, the servers are asked for
    hidden states (they need ``--enable-return-hidden-states``) and ``score`` returns ``TeacherHidden``; else
    log-probs. ``max_seqs``, ``max_mb``: the most sequences and request/answer megabytes of one request. ``token``:
    the API key (``--api-key``), None reads ``$VOPD_TEACHER_TOKEN``.
    """

    engine, logprob_server = "SGLang", "log-prob (no head)"
    hidden_route = f"the hidden-state route ({HIDDEN_FLAG})"
    limit_name, limit_flag = "context_len", "--context-length"
    hidden_bytes = 26  # a JSON float: up to ~24 characters and a comma

    def model_info(self) -> dict[str, Any]:
        """The served model's name and context length (``GET /v1/models``: its first card; LoRA adapters follow),
        the same on every replica, and its path (``GET /get_model_info``), which must be a generation model."""
        if self._model is not None:
            return self._model
        paths = {}
        for url, answer in self._ask_replicas("/get_model_info"):
            if answer.get("is_generation") is False:
                raise UserError(f"the SGLang server at {url} serves an embedding model (is_generation false): serve "
                                "the teacher's causal LM without --is-embedding")
            paths[url] = str(answer.get("model_path", "?"))
        seen = []
        for url, answer in self._ask_replicas("/v1/models"):
            data = answer.get("data")
            if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "id" not in data[0]:
                raise UserError(f"SGLang server at {url} answered GET /v1/models without a model in 'data' (got "
                                f"{str(data)[:100]}): is it an SGLang server?")
            seen.append((url, str(data[0]["id"]), int(data[0].get("max_model_len") or 0)))
        self._model = {**self._agree(seen), "path": paths.get(seen[0][0], "?")}
        return self._model

    def position_limit(self) -> tuple[int, str]:
        """(the longest prompt + completion the servers take, the flag that sets it), for the run's prompt budget
        (``vopd.check.prompt_budget``): SGLang takes prompts shorter than its context length, and the hidden-state
        route generates one token: the context length there, one less on the log-prob route."""
        length = self._limit() or 2**62
        return (length if self.head_path is not None else length - 1), "SGLang --context-length"

    def supports(self, spec: MethodSpec) -> str | None:
        """Hidden-state route (``head``): every method. Log-prob route: the methods that need log q(y_t) only, and
        the teacher's own top-k (``vopd-ttopk``); logits at the student's ids are refused, naming the other route."""
        if self.head_path is not None:
            return None
        need = lacks(spec, Answers(own_topk=True))  # input_top_logprobs: the teacher's own top-k
        if need is None:
            return None
        return (f"loss.method={spec.name} needs {need}, which a stock SGLang server without head ({self.url}) does "
                "not send (its token_ids_logprob asks one id list for every position, not the student's top-k at "
                f"each): start the server with {HIDDEN_FLAG} and set the teacher's head (model.teachers[].head=DIR), "
                "or use loss.method=opd")

    def pairing_checks(self, student: Model, student_tok: Tokenizer) -> list[str]:
        """The served model, its tokenizer against the student's (``/tokenize`` of probe texts) and, on the
        hidden-state route, a probe's states: the head's width, not L2-normalised, the server's own log-probs."""
        info = self.model_info()
        self.tokenizer_checks(student_tok)
        line = (f"SGLang teacher {self.url} ({info['name']} from {info['path']}, context_len {info['max_model_len']}, "
                f"{len(self.urls)} replica(s)): same tokenization of {len(PROBE_TEXTS)} probe texts")
        return [line] if self.head_path is None else [line, self._probe(list(student_tok(PROBE_TEXTS[1])["input_ids"]))]

    def _probe(self, ids: list[int]) -> str:
        """The hidden-state route's check on probe ``ids``: its states through the output layer here give the
        server's own input log-probs (``_hidden`` checks width and scale)."""
        head = self._output_layer()
        [(h, theirs)] = self._hidden([ids], head.weight.shape[1])
        mine, lse = probe_logq(head, h[:-1], torch.tensor(ids[1:]))
        gap = float((mine - theirs).abs().max())
        # Generous (a bf16 server's own logits against an fp32 layer here); pre-norm states are nats off.
        if bool(((mine - theirs).abs() > 0.25 + 0.02 * lse.abs()).any()):
            raise UserError(f"the SGLang server at {self.url} sends hidden states that give log-probs up to "
                            f"{gap:.3g} nats off its own through the output layer of {self.head_path}: they are "
                            "not that checkpoint's final-norm states (another model, or an architecture whose "
                            "states SGLang returns before the final norm): point the head at the served "
                            "checkpoint, or drop it for the log-prob route (loss.method=opd)")
        return (f"hidden-state route: states of width {head.weight.shape[1]}, not L2-normalised, give the server's "
                f"own log-probs through the output layer of {self.head_path} within {gap:.2g} nats: every method "
                "exact")

    # -- scoring (``StockTeacher.score``) -------------------------------------------------------------------------

    def _generate(self, body: dict[str, Any], count: int, cap: float, k: int = 0) -> list[dict[str, Any]]:
        """The ``meta_info`` of each of the ``count`` prompts of one ``/generate`` request."""
        try:
            answer = self._post("/generate", body, cap, array_key="results")
        except Rejected as exc:
            raise _reworded(exc, k, self.url) from None
        results = answer.get("results", [answer] if count == 1 and "meta_info" in answer else None)
        if not isinstance(results, list) or len(results) != count or not all(
                isinstance(r, dict) and isinstance(r.get("meta_info"), dict) for r in results):
            raise UserError(f"SGLang server at {self.url} answered /generate without {count} objects with a "
                            f"'meta_info' (got {str(results)[:80]}): is it an SGLang server?{self.advice}")
        return [r["meta_info"] for r in results]

    def _score_logprobs(self, rollout: Rollout, k: int) -> tuple[Tensor, Tensor, Tensor]:
        ids = rollout.input_ids.cpu()
        b, t = rollout.loss_mask.shape
        logq = torch.zeros(b, t, dtype=torch.float32)
        top_ids = torch.zeros(b, t, k, dtype=torch.long)
        top_lp = torch.zeros(b, t, k, dtype=torch.float32)
        spans = self._spans(rollout, self._limit(), extra=1)  # a prompt must be shorter than the context length
        per_pos = 48 + 48 * k  # [logprob, id, null] per entry, generous
        items = [Item(tokens=e + 1, body=8 * (e + 1) + 64, answer=per_pos * (e + 1 - s) + 512) for _i, s, e in spans]
        for group in (([spans[j] for j in g]) for g in pack(items, self.limits)):
            # Position pos predicts ids[pos + 1]; entry 0 (token ``start``) is null: S = start scores from start + 1.
            body = generate_body([ids[i, : e + 1].tolist() for i, _s, e in group], [s for _i, s, _e in group], k=k)
            cap = 2 * sum(per_pos * (e + 1 - s) + 512 for _i, s, e in group) + 2**16
            for (i, start, end), meta in zip(group, self._generate(body, len(group), cap, k)):
                sent = ids[i, start : end + 1].tolist()
                logq[i, start:end] = self._token_logprobs(meta, sent)
                if k:
                    top_ids[i, start:end], top_lp[i, start:end] = self._top_logprobs(meta, len(sent), k)
        mask = rollout.loss_mask.cpu()
        return logq * mask, top_ids * mask[..., None], top_lp * mask[..., None]

    def _token_logprobs(self, meta: dict[str, Any], sent: list[int]) -> Tensor:
        """log q of ``sent[1:]`` from ``input_token_logprobs`` (one entry per sent token, the first null)."""
        rows = meta.get("input_token_logprobs")
        if not isinstance(rows, list) or len(rows) != len(sent):
            raise UserError(f"SGLang server at {self.url} answered /generate with {_count(rows)} input_token_logprobs "
                            f"for the {len(sent)} tokens from logprob_start_len on (was the prompt truncated? "
                            f"--allow-auto-truncate cuts it){self.advice}")
        out = torch.zeros(len(sent) - 1)
        for m in range(1, len(sent)):
            entry = rows[m]
            if not isinstance(entry, list) or len(entry) < 2 or not _is_token(entry[1], sent[m], self.vocab_size):
                raise UserError(f"SGLang server at {self.url} sent input_token_logprobs[{m}] = {str(entry)[:60]}, not "
                                f"[logprob, {sent[m]}, text] for the token it was sent{self.advice}")
            out[m - 1] = self._logprob(entry[0], f"input_token_logprobs[{m}]")
        return out

    def _top_logprobs(self, meta: dict[str, Any], n: int, k: int) -> tuple[Tensor, Tensor]:
        """(ids, log-probs) (n - 1, k) of the first k entries of ``input_top_logprobs`` at each position after the
        first (null) one: the teacher's own top-k, sorted by SGLang, the actual token not added."""
        rows = meta.get("input_top_logprobs")
        if not isinstance(rows, list) or len(rows) != n:
            raise UserError(f"SGLang server at {self.url} answered /generate with {_count(rows)} input_top_logprobs "
                            f"for {n} tokens (is it an SGLang server? top_logprobs_num is its field){self.advice}")
        ids, lps = torch.zeros(n - 1, k, dtype=torch.long), torch.zeros(n - 1, k)
        for m in range(1, n):
            top = rows[m]
            where = f"input_top_logprobs[{m}]"
            if not isinstance(top, list) or len(top) < k:
                raise UserError(f"SGLang server at {self.url} sent {_count(top)} entries in {where}, expected "
                                f"top_logprobs_num={k}{self.advice}")
            for r, entry in enumerate(top[:k]):
                if not isinstance(entry, list) or len(entry) < 2 or not _is_token(entry[1], None, self.vocab_size):
                    raise UserError(f"SGLang server at {self.url} sent {where}[{r}] = {str(entry)[:60]}, not "
                                    f"[logprob, id, text] with an id below {self.vocab_size}{self.advice}")
                ids[m - 1, r], lps[m - 1, r] = int(entry[1]), self._logprob(entry[0], f"{where}[{r}]")
        return ids, lps

    def _logprob(self, value: Any, where: str) -> float:
        """``value`` as a log-prob (a number <= 0, a rounding above), else one line naming ``where``."""
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not -ABSURD < value <= 1e-4:
            raise UserError(f"SGLang server at {self.url} sent an impossible log-prob {str(value)[:30]} in {where}"
                            f"{self.advice}")
        return float(value)

    def _hidden(self, seqs: list[list[int]], width: int) -> list[tuple[Tensor, Tensor]]:
        """Per sequence of ``seqs`` (one ``/generate`` request): its final-norm states (T, D), checked (one row per
        token, width ``width``, finite, not all zero, not L2-normalised), and the server's log q of its tokens
        1..T-1."""
        cap = 2 * sum(len(s) * (width * self.hidden_bytes + 64) + 512 for s in seqs) + 2**16
        body = generate_body(seqs, [0] * len(seqs), hidden=True)  # start 0: every row computed, none from the cache
        out = []
        for j, (seq, meta) in enumerate(zip(seqs, self._generate(body, len(seqs), cap))):
            h = self._rows(meta.get("hidden_states"), len(seq), j)
            if h.shape[1] != width:
                raise UserError(f"the SGLang server at {self.url} sends hidden states of width {h.shape[1]}, but the "
                                f"output layer of {self.head_path} takes {width}: point the head "
                                "(model.teachers[].head) at the checkpoint the server serves")
            check_hidden(self.url, j, h)
            if unit_rows(h):
                raise UserError(f"the SGLang server at {self.url} sends L2-normalised hidden states (every row norm "
                                "1.0: the logits' scale is gone): serve the causal LM itself, not an embedding model")
            out.append((h, self._token_logprobs(meta, seq)))
        return out

    def _rows(self, states: Any, n: int, j: int) -> Tensor:
        """The prefill's rows (n, D) of one answer's ``hidden_states`` (its first item: the prefill's rows; one row
        per generated token may follow)."""
        if not isinstance(states, list) or not states:
            raise UserError(f"SGLang server at {self.url} answered /generate without meta_info.hidden_states for "
                            f"result {j}: restart it with {HIDDEN_FLAG}, or drop the teacher's head "
                            "(model.teachers[].head) for the log-prob route (loss.method=opd)")
        try:
            h = torch.tensor(states[0], dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"SGLang server at {self.url} sent hidden_states[0] of result {j} that is not a list of "
                            f"rows of numbers ({str(exc)[:80]}){self.advice}") from None
        if h.dim() != 2 or h.shape[0] != n:
            raise UserError(f"SGLang server at {self.url} sent {h.shape[0] if h.dim() == 2 else 'no'} hidden-state "
                            f"rows for a sequence of {n} tokens (result {j}): SGLang returns the rows of a request's "
                            f"last prefill chunk only: restart it with --chunked-prefill-size {n} or more (or -1)"
                            f"{self.advice}")
        return h

    def _states(self, seqs: list[list[int]], width: int) -> list[Tensor]:
        return [h for h, _logq in self._hidden(seqs, width)]


def _is_token(value: Any, sent: int | None, vocab: int) -> bool:
    """Whether ``value`` is the id ``sent`` (any id below ``vocab`` when None). SGLang reports the model's last id
    as 0 in ``input_token_logprobs`` (it clips ids at vocab_size - 1 for image padding), so 0 stands for an id there."""
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    if sent is None:
        return 0 <= value < vocab
    return value == sent or (value == 0 and sent >= vocab - 1)


def _count(rows: Any) -> str:
    return str(len(rows)) if isinstance(rows, list) else "no"


def _reworded(exc: Rejected, k: int, url: str) -> UserError:
    """A refused ``/generate`` request in one line with its fix: hidden states from a server started without the
    flag, a prompt past the context length."""
    detail = exc.detail.lower()
    if "hidden states" in detail or "hidden_states" in detail:
        return UserError(f"the SGLang server at {url} does not return hidden states ({exc.detail}): restart it with "
                         f"{HIDDEN_FLAG}, or drop the teacher's head (model.teachers[].head) for the log-prob route "
                         "(loss.method=opd)")
    if "context length" in detail:
        return UserError(f"the SGLang server at {url} refuses a prompt past its context length ({exc.detail}): restart "
                         "it with a larger --context-length, or lower data.max_prompt_tokens")
    return UserError(f"the SGLang server at {url} rejected a /generate request (HTTP {exc.status}: {exc.detail}"
                     f"{f'; top_logprobs_num={k}' if k else ''}): is it an SGLang server of a causal LM?")
