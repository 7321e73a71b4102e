"""A stock SGLang server as the teacher (``model.teachers[].server=sglang``), against a recorded exchange: SGLang
0.5.23 cannot run on this machine (docs/teacher_server.md, "Stock SGLang servers"), so a small HTTP server here
answers SGLang's JSON shapes (read from its source: ``/generate`` with token-id batches, ``meta_info``'s
``input_token_logprobs``, ``input_top_logprobs`` and ``hidden_states``, ``/get_model_info``, ``/v1/models``,
``/tokenize``, its 400 answers) with the numbers of the micro world's real teacher run here (final-norm states,
log-softmax). Every method over the hidden-state route and ``opd`` / ``vopd-ttopk`` over the log-prob route give the
in-process teacher's loss and gradients; the bodies sent are SGLang's documented form; bad answers are one line."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch

from vopd import distributed as dist
from vopd.config import load_config
from vopd.errors import UserError
from vopd.loss.methods import METHODS, method_spec
from vopd.metrics import PhaseTimer
from vopd.models import last_hidden, output_layer
from vopd.step import accumulate_gradients
from vopd.teacher.base import open_teacher
from vopd.teacher.routing import Teachers
from vopd.teacher.stock_sglang import StockSglangTeacher
from vopd.teacher_config import TEACHER as ONLY

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
NOT_CONFIGURED = ("The server is not configured to return hidden states. Please set `--return-hidden-states-mode "
                  "last`, `--return-hidden-states-mode full`, or the legacy `--enable-return-hidden-states` flag.")


class _Sglang(BaseHTTPRequestHandler):
    """SGLang's HTTP answers, the numbers from ``model`` (the real teacher). Server flags as class attributes:
    ``hidden`` (``--enable-return-hidden-states``), ``context_len``, ``chunk`` (``--chunked-prefill-size``: the
    hidden rows of the last chunk only); ``mode`` garbles an answer; ``bodies`` records the /generate bodies."""

    model: Any = None
    head: Any = None
    tok: Any = None
    hidden, context_len, chunk, mode, max_top = True, 256, 0, "ok", 10**9
    bodies: list[dict[str, Any]] = []

    def log_message(self, *_args: object) -> None:  # quiet
        pass

    def _send(self, obj: Any, status: int = 200) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/get_model_info":
            self._send({"model_path": "/ckpt/tiny-teacher", "tokenizer_path": "/ckpt/tiny-teacher",
                        "is_generation": self.mode != "embedding", "preferred_sampling_params": None,
                        "weight_version": "default", "has_image_understanding": False,
                        "has_audio_understanding": False, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]})
        elif self.path == "/v1/models":
            self._send({"object": "list", "data": [{"id": "tiny-teacher", "object": "model", "created": 0,
                                                     "owned_by": "sglang", "root": "tiny-teacher", "parent": None,
                                                     "max_model_len": self.context_len}]})
        else:
            self._send({"detail": "Not Found"}, 404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path == "/tokenize":
            ids = list(self.tok(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"])
            self._send({"tokens": ids, "count": len(ids), "max_model_len": self.context_len})
            return
        type(self).bodies.append(body)
        if body.get("return_hidden_states") and not self.hidden:
            self._send({"error": {"message": NOT_CONFIGURED}}, 400)
            return
        seqs, starts = body["input_ids"], body["logprob_start_len"]
        for seq in seqs:
            if len(seq) >= self.context_len:
                self._send({"error": {"message": f"The input ({len(seq)} tokens) is longer than the model's context "
                                                 f"length ({self.context_len} tokens)."}}, 400)
                return
        results = [self._result(seq, s, body) for seq, s in zip(seqs, starts)]
        self._send({"meta": results} if self.mode == "object" else results)

    def _result(self, seq: list[int], start: int, body: dict[str, Any]) -> dict[str, Any]:
        """One prompt's answer, as SGLang's tokenizer manager writes it (entry 0 null from ``start`` on; the top-k
        sorted, the actual token not added; the prefill's rows as ``hidden_states[0]``, cut to the output's length)."""
        with torch.no_grad():
            x = torch.tensor([seq])
            h = last_hidden(self.model, x, torch.ones_like(x))[0]
            logp = torch.log_softmax(self.head.logits(h), dim=-1)
        vocab = logp.shape[-1]
        clip = [t if t < vocab - 1 else 0 for t in seq]  # SGLang's clipping of the last id
        tokens = [[None, clip[start], None]] + [[float(logp[j - 1, seq[j]]), clip[j], None]
                                               for j in range(start + 1, len(seq))]
        if self.mode == "positive":
            tokens[1][0] = 0.5
        if self.mode == "truncated":  # --allow-auto-truncate cut the prompt
            tokens = tokens[:-1]
        new = body["sampling_params"]["max_new_tokens"]
        nxt = int(logp[-1].argmax())
        meta: dict[str, Any] = {"id": "0", "finish_reason": {"type": "length", "length": new},
                                "prompt_tokens": len(seq), "weight_version": "default", "completion_tokens": new,
                                "cached_tokens": 0, "e2e_latency": 0.01, "input_token_logprobs": tokens,
                                "output_token_logprobs": [[float(logp[-1, nxt]), nxt, None]][:new]}
        k = body.get("top_logprobs_num") or 0
        if k:
            values, ids = logp.topk(min(k, self.max_top), dim=-1)
            meta["input_top_logprobs"] = [None] + [[[float(v), int(i), None] for v, i in zip(values[j - 1], ids[j - 1])]
                                                   for j in range(start + 1, len(seq))]
            meta["output_top_logprobs"] = []
        if body.get("return_hidden_states"):
            rows = h * 3 if self.mode == "rescaled" else h  # rescaled: not the final-norm states (e.g. pre-norm)
            if self.mode == "unit":  # an embedding pooler's rows: L2-normalised
                rows = torch.nn.functional.normalize(h, dim=-1)
            rows = rows[-self.chunk:] if self.chunk and len(seq) > self.chunk else rows
            meta["hidden_states"] = [rows.tolist()][:new]  # SGLang keeps hidden_states[:finished_len]
        return {"text": "", "output_ids": [nxt][:new], "meta_info": meta}


@pytest.fixture(scope="module")
def pair(micro_pair):
    return micro_pair


@pytest.fixture
def server(pair, micro_world):
    tok, _student, local = pair
    _Sglang.model, _Sglang.tok = local.model, tok
    _Sglang.head = output_layer(local.model, len(tok))
    _Sglang.bodies = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Sglang)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    _Sglang.hidden, _Sglang.context_len, _Sglang.chunk, _Sglang.mode, _Sglang.max_top = True, 256, 0, "ok", 10**9


def _step(cfg, student, teacher, rollout):
    wrapped = dist.wrap(student, student.config.vocab_size, "ddp", CPU)
    got = accumulate_gradients(cfg, wrapped, Teachers({ONLY: teacher}), rollout, CPU, PhaseTimer(CPU))
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return got.loss, grads


def _assert_same_step(cfg, student, remote, local, rollout) -> None:
    (loss, grads), (loss_l, grads_l) = _step(cfg, student, remote, rollout), _step(cfg, student, local, rollout)
    assert loss == pytest.approx(loss_l, rel=1e-5, abs=1e-6)
    assert grads.keys() == grads_l.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads_l[n], rtol=1e-4, atol=1e-5, msg=n)


def _config(train_overrides, method: str):
    return load_config(None, train_overrides + [f"loss.method={method}", "batch_size=6", "micro_batch_size=3",
                                                "grad_noise=false", "loss.top_k=5"])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_over_the_hidden_route_equals_in_process(method, server, pair, micro_world, train_overrides,
                                                                make_fake_rollout):
    tok, student, local = pair
    rollout = make_fake_rollout(tok)
    with StockSglangTeacher([server], vocab_size=len(tok), head=str(micro_world.teacher)) as remote:
        assert remote.full_distribution and remote.supports(method_spec(method)) is None
        scores, mine = remote.score(rollout), local.score(rollout)
        live = rollout.loss_mask
        torch.testing.assert_close(scores.hidden[live], mine.hidden[live], rtol=1e-5, atol=1e-6)
        assert not scores.hidden[~live].any()
        _assert_same_step(_config(train_overrides, method), student, remote, local, rollout)
    body = _Sglang.bodies[0]  # the hidden-state request: every row computed (start 0), one token generated
    assert body["sampling_params"] == {"max_new_tokens": 1} and body["return_hidden_states"] is True
    assert body["return_logprob"] is True and body["logprob_start_len"] == [0] * len(body["input_ids"])
    ends = [int(m.nonzero()[-1]) + 1 for m in rollout.loss_mask]
    assert body["input_ids"] == [rollout.input_ids[i, :e].tolist() for i, e in enumerate(ends)]


def test_pairing_checks_name_the_model_and_check_the_states(server, pair, micro_world):
    tok, student, _local = pair
    with StockSglangTeacher([server], vocab_size=len(tok), head=str(micro_world.teacher)) as remote:
        lines = remote.pairing_checks(student, tok)
        assert remote.position_limit() == (256, "SGLang --context-length")
    assert "tiny-teacher from /ckpt/tiny-teacher" in lines[0] and "context_len 256" in lines[0]
    assert "same tokenization" in lines[0] and "width 48" in lines[1] and "own log-probs" in lines[1]
    _Sglang.mode = "rescaled"
    with StockSglangTeacher([server], vocab_size=len(tok), head=str(micro_world.teacher)) as remote:
        with pytest.raises(UserError, match=r"nats off its own .*not that checkpoint's final-norm states"):
            remote.pairing_checks(student, tok)


@pytest.mark.parametrize("method", ["opd", "vopd-ttopk"])
def test_the_logprob_route_equals_in_process(method, server, pair, train_overrides, make_fake_rollout):
    tok, student, local = pair
    rollout = make_fake_rollout(tok)
    cfg = _config(train_overrides, method)
    with StockSglangTeacher([server], vocab_size=len(tok)) as remote:
        assert not remote.full_distribution and remote.supports(method_spec(method)) is None
        assert remote.position_limit() == (255, "SGLang --context-length")
        remote.serve_own_topk(cfg.loss.top_k if method_spec(method).teacher_topk else 0)
        remote.score(rollout)  # the whole rollout in one request: its body is checked below
        _assert_same_step(cfg, student, remote, local, rollout)
    body = _Sglang.bodies[0]
    assert body["sampling_params"] == {"max_new_tokens": 0} and body["return_logprob"] is True
    assert "return_hidden_states" not in body and body.get("top_logprobs_num", 0) == (5 if method != "opd" else 0)
    live = rollout.loss_mask
    starts = [int(m.nonzero()[0]) for m in live]  # = the prompt's length - 1: the completion starts at P = start + 1
    ends = [int(m.nonzero()[-1]) + 2 for m in live]
    assert body["logprob_start_len"] == starts
    assert body["input_ids"] == [rollout.input_ids[i, :e].tolist() for i, e in enumerate(ends)]


def test_teacher_topk_is_the_in_process_teachers_own_topk(server, pair, make_fake_rollout):
    tok, _student, local = pair
    rollout = make_fake_rollout(tok)
    mine = local.score(rollout)
    logp = torch.log_softmax(mine.hidden @ mine.weight.T, dim=-1)
    values, ids = logp.topk(4, dim=-1)
    live = rollout.loss_mask
    with StockSglangTeacher([server], vocab_size=len(tok)) as remote:
        got = remote.score_teacher_topk(rollout, 4)
        with pytest.raises(ValueError, match="k=0"):
            remote.score_teacher_topk(rollout, 0)
    assert got.topk_ids is not None and got.topk_logits is not None and got.lse is None
    assert torch.equal(got.topk_ids[live], ids[live]) and not got.topk_ids[~live].any()
    torch.testing.assert_close(got.topk_logits[live], values[live], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logq[live], logp.gather(-1, rollout.targets[..., None]).squeeze(-1)[live])


def test_refusals_are_one_line(server, pair, micro_world, vllm_teacher_dir, make_fake_rollout):
    tok, _student, _local = pair
    rollout = make_fake_rollout(tok)
    hidden = {"vocab_size": len(tok), "head": str(micro_world.teacher), "retries": 0}
    cases = [  # (server flags or answer, client keywords, the line)
        ({"hidden": False}, hidden, r"does not return hidden states .*restart it with --enable-return-hidden-states"),
        ({"chunk": 4}, hidden, r"hidden-state rows for a sequence of \d+ tokens .*--chunked-prefill-size"),
        ({}, {**hidden, "head": str(vllm_teacher_dir)}, r"width 48, but the output layer of .* takes 64"),
        ({"mode": "positive"}, {"vocab_size": len(tok)}, r"impossible log-prob 0.5 in input_token_logprobs\[1\]"),
        ({"mode": "truncated"}, {"vocab_size": len(tok)}, r"input_token_logprobs for the \d+ tokens .*truncated"),
        ({"mode": "object"}, {"vocab_size": len(tok)}, r"without 3 objects with a 'meta_info'"),
        ({"context_len": 8}, {"vocab_size": len(tok)}, r"not fit the SGLang server's context_len=8 .*--context-length"),
        ({"mode": "embedding"}, {"vocab_size": len(tok)}, r"embedding model .*without --is-embedding"),
        ({"mode": "unit"}, hidden, r"sends L2-normalised hidden states .*serve the causal LM itself"),
    ]
    for flags, kwargs, match in cases:
        for key, value in flags.items():
            setattr(_Sglang, key, value)
        with StockSglangTeacher([server], max_seqs=3, **kwargs) as remote:
            with pytest.raises(UserError, match=match) as err:
                remote.model_info()
                remote.score(rollout)
            assert "\n" not in str(err.value)
        _Sglang.hidden, _Sglang.context_len, _Sglang.chunk, _Sglang.mode = True, 256, 0, "ok"
    _Sglang.max_top = 2
    with StockSglangTeacher([server], vocab_size=len(tok), retries=0) as remote:
        with pytest.raises(UserError, match=r"sent 2 entries in input_top_logprobs\[1\], expected top_logprobs_num=3"):
            remote.score_teacher_topk(rollout, 3)
        refusal = remote.supports(method_spec("vopd-topk"))
        assert refusal is not None and "--enable-return-hidden-states" in refusal and "\n" not in refusal
        with pytest.raises(UserError, match=r"cannot score the student's top-k ids .*hidden-state route"):
            remote.score(rollout, torch.zeros(*rollout.targets.shape, 2, dtype=torch.long))


def test_the_config_names_an_sglang_server(train_overrides, micro_world):
    cfg = load_config(None, train_overrides + ["model.teacher=http://a:1,http://b:2", "model.teacher_server=sglang"])
    [entry] = cfg.model.teacher_configs
    assert (entry.model, entry.server) == ("http://a:1,http://b:2", "sglang")
    teacher = open_teacher(entry, vocab_size=10, device=CPU)
    assert isinstance(teacher, StockSglangTeacher) and teacher.urls == ["http://a:1", "http://b:2"]
    teacher.close()
    cfg = load_config(None, train_overrides + ["model.teacher=", "model.teachers=[{name: t, model: \"http://a:1\", "
                                               f"server: sglang, head: {micro_world.teacher}, request_seqs: 8}}]"])
    [entry] = cfg.model.teacher_configs
    assert (entry.server, entry.head, entry.request_seqs) == ("sglang", str(micro_world.teacher), 8)
    with pytest.raises(UserError, match=r"server=sglang names a kind of teacher server, but .* is not a URL"):
        load_config(None, train_overrides + ["model.teacher_server=sglang"])
