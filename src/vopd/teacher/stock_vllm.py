"""A stock vLLM server (``vllm serve``, no vopd on it) as the teacher: its two routes, over the shared transport.

What it knows: the two things a stock vLLM server answers that OPD can use (docs/teacher_server.md, "Stock vLLM
servers"; the measured facts are ../shared/spec/stock-engines.md). The pooling route (a server started with
``--runner pooling --convert embed`` and ``use_activation: false``): ``POST /pooling`` with ``task: token_embed``
returns every position's final-norm hidden state, which the teacher's output layer loaded here (``head``) turns into
its whole distribution: ``TeacherHidden``, every method exact. The generate route (``POST /v1/completions`` with
``prompt_logprobs``): log q(y_t) (``prompt_logprobs: 0``, method ``opd``) and the teacher's own top-k
(``score_teacher_topk``: entries with ``rank <= k`` only; the extra entry of the actual token would bias a baseline).
Requests are cut by sequences and bytes (``vopd.teacher.http.pack``) and spread over several replicas of one
teacher (``vopd.teacher.stock``, shared with the SGLang client). The pre-flight (``pairing_checks``): every
replica serves the same model name and ``max_model_len``, its tokenizer (``/tokenize``) encodes probe texts as the
student's does, and on the pooling route a probe's hidden states have the head's width and are not L2-normalised
rows, and with a generate server of the same model (``head_reference``) their log-probs through the head are that
server's (``vopd.teacher.stock_probe``); the longest sequence the servers take (``position_limit``, for the run's
prompt budget); per-replica counts (``server_metrics``).

What it does not know: the student's top-k ids on the generate route (``prompt_logprob_token_ids`` needs vLLM's
Model Runner V2 behind ``/inference/v1/generate``, not reachable on the CPU build: refused, naming the pooling
route), SGLang (``vopd.teacher.stock_sglang``), the loss math, or the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vopd.errors import UserError
from vopd.rollout import Rollout
from vopd.teacher.answers import Answers, lacks
from vopd.teacher.http import Item, Rejected, Session, pack
from vopd.teacher.replies import ABSURD, check_hidden
from vopd.teacher.stock import ADVICE as _ADVICE
from vopd.teacher.stock import PROBE_TEXTS, StockTeacher, unit_rows
from vopd.teacher.wire import TOKEN_ENV

if TYPE_CHECKING:
    from vopd.loss.methods import MethodSpec
    from vopd.models import Model, Tokenizer

ADVICE = _ADVICE.format(engine="vLLM")


class StockVllmTeacher(StockTeacher):
    """Client of one or more stock vLLM servers serving one teacher (replicas; ``vopd.teacher.stock``).

    urls: ``http://host:port`` each. ``head``: the local checkpoint the servers serve; given, the servers are asked for
    hidden states (pooling route) and ``score`` returns ``TeacherHidden``; else the generate route (log-probs).
    ``max_seqs``, ``max_mb``: the most sequences and request/answer megabytes of one request. ``token``: the API key
    (``vllm serve --api-key``), None reads ``$VOPD_TEACHER_TOKEN``. ``head_reference``: the URL of a generate-route
    server of the same model, which the pre-flight checks the head against (``pairing_checks``).
    """

    engine, logprob_server, hidden_route = "vLLM", "generate", "the pooling route"

    def __init__(self, urls: list[str], *, head_reference: str | None = None, token: str | None = None,
                 timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5, **kw: Any) -> None:
        super().__init__(urls, token=token, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, **kw)
        self.reference = None if not head_reference else Session(
            head_reference, token=token, token_env=TOKEN_ENV, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)

    def close(self) -> None:
        super().close()
        if self.reference is not None:
            self.reference.close()

    def model_info(self) -> dict[str, Any]:
        """The served model's name and ``max_model_len`` (``GET /v1/models``), the same on every replica."""
        if self._model is not None:
            return self._model
        seen = []
        for url, answer in self._ask_replicas("/v1/models"):
            data = answer.get("data")
            if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict) or "id" not in data[0]:
                raise UserError(f"vLLM server at {url} answered GET /v1/models without exactly one model in 'data' "
                                f"(got {str(data)[:100]}): serve one teacher per server (is it a vLLM server?)")
            seen.append((url, str(data[0]["id"]), int(data[0].get("max_model_len") or 0)))
        self._model = self._agree(seen)
        return self._model

    def position_limit(self) -> tuple[int, str]:
        """(the longest prompt + completion the servers take, the flag that sets it), for the run's prompt budget
        (``vopd.check.prompt_budget``): ``max_model_len``, one less on the generate route (it generates a token)."""
        length = int(self.model_info()["max_model_len"]) or 2**62
        return (length if self.head_path is not None else length - 1), "vLLM --max-model-len"

    # -- what it serves -----------------------------------------------------------------------------------------

    def supports(self, spec: MethodSpec) -> str | None:
        """Pooling route (``head``): every method. Generate route: the methods that need log q(y_t) only, and the
        teacher's own top-k (``vopd-ttopk``); logits at the student's ids are refused, naming the pooling route."""
        if self.head_path is not None:
            return None
        need = lacks(spec, Answers(own_topk=True))  # prompt_logprobs: k is the teacher's own top-k
        if need is None:
            return None
        return (f"loss.method={spec.name} needs {need}, which a stock vLLM generate server ({self.url}) does not send "
                "(prompt_logprob_token_ids needs vLLM's Model Runner V2 behind /inference/v1/generate): serve the "
                "teacher with the pooling runner (vllm serve MODEL --runner pooling --convert embed --pooler-config "
                "'{\"task\": \"token_embed\", \"use_activation\": false}') and set its head (model.teachers[].head=DIR), "
                "or use loss.method=opd")

    def pairing_checks(self, student: Model, student_tok: Tokenizer) -> list[str]:
        """The served model, its tokenizer against the student's (``/tokenize`` of probe texts) and, on the pooling
        route, the output layer against a probe's hidden states: width, not L2-normalised, and its log-probs against
        the generate server ``head_reference`` (``vopd.teacher.stock_probe``; without one, a line says so)."""
        info = self.model_info()
        self.tokenizer_checks(student_tok)
        lines = [f"vLLM teacher {self.url} ({info['name']}, max_model_len {info['max_model_len']}, "
                 f"{len(self.urls)} replica(s)): same tokenization of {len(PROBE_TEXTS)} probe texts"]
        if self.head_path is not None:
            head = self._output_layer()
            ids = list(student_tok(PROBE_TEXTS[1])["input_ids"])
            states = self._pooled([ids], head.weight.shape[1])[0]  # checks width and scale
            lines.append(f"pooling route: hidden states of width {head.weight.shape[1]} with the output layer of "
                         f"{self.head_path} ({tuple(head.weight.shape)}), not L2-normalised: every method exact")
            from vopd.teacher.stock_probe import check_head, unchecked

            lines.append(unchecked(self.head_path) if self.reference is None else
                         check_head(head, self.head_path, states, ids, self.url, self.reference, ADVICE))
        return lines

    # -- scoring (``StockTeacher.score``) -------------------------------------------------------------------------

    def _score_logprobs(self, rollout: Rollout, k: int) -> tuple[Tensor, Tensor, Tensor]:
        from vopd.teacher.stock_answers import completion_requests, read_prompt_logprobs

        info = self.model_info()
        ids = rollout.input_ids.cpu()
        b, t = rollout.loss_mask.shape
        logq = torch.zeros(b, t, dtype=torch.float32)
        top_ids = torch.zeros(b, t, k, dtype=torch.long)
        top_lp = torch.zeros(b, t, k, dtype=torch.float32)
        spans = self._spans(rollout, info["max_model_len"], extra=1)  # max_tokens=1 needs one slot more
        per_pos = 64 + 90 * (k + 1)  # a JSON entry {"id": {"logprob", "rank", "decoded_token"}} per id, generous
        items = [Item(tokens=e + 1, body=8 * (e + 1) + 64, answer=per_pos * (e + 1) + 512) for _i, _s, e in spans]
        for group in (([spans[j] for j in g]) for g in pack(items, self.limits)):
            body = completion_requests(info["name"], [ids[i, : e + 1].tolist() for i, _s, e in group], k)
            cap = 2 * sum(per_pos * (e + 1) + 512 for _i, _s, e in group) + 2**16
            try:
                answer = self._post("/v1/completions", body, cap)
            except Rejected as exc:
                raise _reworded(exc, k, self.url) from None
            for (i, start, end), rows in zip(group, read_prompt_logprobs(answer, len(group), self.url, ADVICE)):
                for pos in range(start, end):  # position pos predicts ids[i, pos + 1]: prompt_logprobs[pos + 1]
                    y = int(ids[i, pos + 1])
                    entry = rows[pos + 1]
                    lq, tid, tlp = _entry(entry, y, k, self.url, pos + 1)
                    logq[i, pos] = lq
                    if k:
                        top_ids[i, pos], top_lp[i, pos] = tid, tlp
        mask = rollout.loss_mask.cpu()
        logq = logq * mask
        return logq, top_ids * mask[..., None], top_lp * mask[..., None]

    def _pooled(self, seqs: list[list[int]], width: int) -> list[Tensor]:
        """The final-norm hidden states (T, D) of each sequence of ``seqs`` in one ``/pooling`` request, checked:
        one per token, width ``width``, finite, not all zero, not L2-normalised rows."""
        from vopd.teacher.stock_answers import read_pooled

        info = self.model_info()
        body = {"model": info["name"], "input": seqs, "task": "token_embed", "use_activation": False,
                "encoding_format": "base64", "embed_dtype": "float32"}
        cap = 2 * sum(len(s) * width * 4 * 4 / 3 + 512 for s in seqs) + 2**16
        try:
            answer = self._post("/pooling", body, cap)
        except Rejected as exc:
            raise UserError(f"the vLLM server at {self.url} refused a hidden-state (pooling) request "
                            f"(HTTP {exc.status}: {exc.detail}): is it a generate server? Start the teacher with "
                            "--runner pooling --convert embed --pooler-config '{\"task\": \"token_embed\", "
                            "\"use_activation\": false}', or drop its head (model.teachers[].head) for the "
                            "generate route (loss.method=opd)") from None
        states = read_pooled(answer, [len(s) for s in seqs], self.url, ADVICE)
        for j, h in enumerate(states):
            if h.shape[1] != width:
                raise UserError(f"the vLLM server at {self.url} ({info['name']}) sends hidden states of width "
                                f"{h.shape[1]}, but the output layer of {self.head_path} takes {width}: point the head "
                                "(model.teachers[].head) at the checkpoint the server serves")
            check_hidden(self.url, j, h)
            if unit_rows(h):
                raise UserError(f"the vLLM server at {self.url} L2-normalises its hidden states (every row norm 1.0: "
                                "the logits' scale is gone): restart it with --pooler-config '{\"task\": "
                                "\"token_embed\", \"use_activation\": false}'")
        return states

    _states = _pooled  # the hidden-state route of ``StockTeacher._score_hidden``


def _entry(entry: Any, y: int, k: int, url: str, pos: int) -> tuple[float, Tensor, Tensor]:
    """(log q(y), the top-k ids by rank, their log-probs) of one ``prompt_logprobs`` entry; one line if it lacks
    them or holds impossible numbers."""
    where = f"prompt_logprobs[{pos}]"
    if not isinstance(entry, dict) or str(y) not in entry:
        raise UserError(f"vLLM server at {url} sent a /v1/completions answer whose {where} lacks the token {y} it "
                        f"was sent{ADVICE}")
    try:
        ranked = sorted((int(e["rank"]), int(tid), float(e["logprob"])) for tid, e in entry.items())
        lq = float(entry[str(y)]["logprob"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"vLLM server at {url} sent a malformed {where} ({exc}){ADVICE}") from None
    bad = [v for _r, _t, v in ranked if not (-ABSURD < v <= 1e-4)]  # a log-prob is <= 0 (a rounding above)
    if bad:
        raise UserError(f"vLLM server at {url} sent an impossible log-prob {bad[0]} in {where}{ADVICE}")
    top = [(tid, v) for r, tid, v in ranked if r <= k][:k]
    if len(top) < k:
        raise UserError(f"vLLM server at {url} sent {len(top)} entries of rank <= {k} in {where}, expected {k}{ADVICE}")
    return lq, torch.tensor([t for t, _v in top], dtype=torch.long), torch.tensor([v for _t, v in top])


def _reworded(exc: Rejected, k: int, url: str) -> UserError:
    """A refused ``/v1/completions`` request in one line with its fix: k above ``--max-logprobs`` names the flag."""
    if k and "logprobs" in exc.detail.lower():
        return UserError(f"the vLLM server at {url} refuses prompt_logprobs={k} ({exc.detail}): restart it with "
                         f"--max-logprobs {k} (or more) or lower the method's top-k")
    return UserError(f"the vLLM server at {url} rejected a /v1/completions request (HTTP {exc.status}: {exc.detail}): "
                     "is it a pooling server? The generate route needs a server started without --runner pooling")
