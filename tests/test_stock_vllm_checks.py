"""A stock vLLM teacher's refusals that need no vLLM process (a fake server on 127.0.0.1 speaking vLLM's answers):
a garbled or slow answer, a garbled log-prob, a sequence past ``max_model_len``, the API key, the prompt budget
cut to ``max_model_len``, the tolerance of the head's probe against a generate server (``head_reference``) by the
precision of the pooled states; and the config rules of ``server: vllm``. The real-server tests are test_stock_vllm.py."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from vopd.config import load_config
from vopd.errors import UserError
from vopd.teacher.routing import Teachers
from vopd.teacher.stock_vllm import StockVllmTeacher
from vopd.teacher_config import TEACHER as ONLY

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher_dir(vllm_teacher_dir) -> Path:
    return vllm_teacher_dir


@pytest.fixture(scope="module")
def pair(vllm_pair):
    return vllm_pair


class _Fake(BaseHTTPRequestHandler):
    """A fake vLLM server: /v1/models answers; /pooling answers per ``mode``: garbled base64, too slowly, or
    L2-normalised rows of width 64 (what the default ``use_activation`` sends)."""

    mode = "garbled"
    offset = 0.0  # mode "probe": nats added to the served model's log-probs on /v1/completions
    key = ""  # an API key the requests must carry (vllm serve --api-key)
    max_model_len = 256

    def log_message(self, *_args):  # quiet
        pass

    def _send(self, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refused(self) -> bool:
        if self.key and self.headers.get("authorization") != f"Bearer {self.key}":
            data = json.dumps({"error": "Unauthorized"}).encode()
            self.send_response(401)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return True
        return False

    def do_GET(self):
        if self._refused():
            return
        self._send({"data": [{"id": "tiny-teacher", "max_model_len": self.max_model_len}]})

    def do_POST(self):
        if self._refused():
            return
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.mode == "slow":
            time.sleep(3)
        if self.mode.startswith("probe"):
            self._send(_probe_answer(self.path, body, self.mode == "probe-half", self.offset))
            return
        if self.path == "/v1/completions":  # garbled: a positive log-prob at the second prompt position
            self._send({"choices": [{"index": j, "prompt_logprobs": [None] + [{str(t): {"logprob": 0.5, "rank": 1}}
                                                                               for t in p[1:]]}
                                    for j, p in enumerate(body["prompt"])]})
            return
        if self.mode == "unit":
            import base64

            rows = [torch.nn.functional.normalize(torch.randn(len(seq), 64), dim=-1) for seq in body["input"]]
            self._send({"data": [{"index": j, "data": base64.b64encode(r.numpy().tobytes()).decode()}
                                 for j, r in enumerate(rows)]})
            return
        self._send({"data": [{"index": j, "data": "not base64!"} for j in range(len(body["input"]))]})


@pytest.fixture
def fake_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    _Fake.mode, _Fake.key, _Fake.max_model_len, _Fake.offset = "garbled", "", 256, 0.0


#: The served model of mode "probe" (the in-process teacher's HF model) and its tokenizer, set by the test using it.
SERVED: dict[str, Any] = {}


def _probe_answer(path: str, body: dict, half: bool, offset: float) -> dict:
    """The served model's own numbers: /tokenize its tokenizer's ids, /pooling its final-norm states (rounded to bf16 and sent as fp32 when
    ``half``: what a bf16 server's pooler sends), /v1/completions its log q(y_t) plus ``offset``."""
    import base64

    if path == "/tokenize":
        return {"tokens": list(SERVED["tok"](body["prompt"])["input_ids"])}
    model = SERVED["model"]
    prompts = body["input"] if path == "/pooling" else body["prompt"]
    out = []
    for j, ids in enumerate(prompts):
        with torch.no_grad():
            res = model(torch.tensor([ids]), output_hidden_states=True)
        if path == "/pooling":
            h = res.hidden_states[-1][0].float()
            h = h.to(torch.bfloat16).float() if half else h
            out.append({"index": j, "data": base64.b64encode(h.numpy().tobytes()).decode()})
        else:
            logp = torch.log_softmax(res.logits[0].float(), -1)
            rows = [None] + [{str(y): {"logprob": float(logp[t, y]) + offset, "rank": 1}} for t, y in enumerate(ids[1:])]
            out.append({"index": j, "prompt_logprobs": rows})
    return {"data": out} if path == "/pooling" else {"choices": out}


def test_a_garbled_or_slow_answer_is_one_line(fake_server, pair, teacher_dir, make_fake_rollout):
    tok, _student, _local = pair
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    rollout = make_fake_rollout(tok)
    with StockVllmTeacher([url], vocab_size=len(tok), head=str(teacher_dir), retries=0) as remote:
        with pytest.raises(UserError, match=r"data\[0\] of a /pooling answer that is not base64 .*nothing of that "
                                            r"answer was trained on") as err:
            remote.score(rollout)
        assert "\n" not in str(err.value)
    _Fake.mode = "slow"
    with StockVllmTeacher([url], vocab_size=len(tok), head=str(teacher_dir), retries=0, timeout_s=1) as remote:
        t0 = time.monotonic()
        with pytest.raises(UserError, match=r"unreachable after 1 tries \(last error ReadTimeout"):
            remote.score(rollout)
        assert time.monotonic() - t0 < 3
    _Fake.mode = "unit"
    with StockVllmTeacher([url], vocab_size=len(tok), head=str(teacher_dir), retries=0) as remote:
        with pytest.raises(UserError, match=r"L2-normalises its hidden states .*use_activation\": false"):
            remote.score(rollout)


def test_the_api_key_is_sent_and_a_wrong_one_is_one_line(fake_server, pair, teacher_dir):
    tok, _student, _local = pair
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    _Fake.key = "s3cret"
    with StockVllmTeacher([url], vocab_size=len(tok), head=str(teacher_dir), token="s3cret") as remote:
        assert remote.model_info()["name"] == "tiny-teacher"
    with StockVllmTeacher([url], vocab_size=len(tok), head=str(teacher_dir), token="wrong") as remote:
        with pytest.raises(UserError, match=r"refused the token \(401\): set \$VOPD_TEACHER_TOKEN"):
            remote.model_info()


@pytest.mark.parametrize("overrides,match", [
    (["model.teacher=http://a:1,http://b:2"], r"several servers, which only a stock vLLM or SGLang teacher takes"),
    (["model.teacher=http://a:1,nota", "model.teacher_server=vllm"], r"a URL http://HOST:PORT, or several"),
    (["model.teacher_server=tgi"], r"teacher_server|server"),
    (["model.teacher=", "model.teachers=[{name: t, model: \"http://a:1\", server: vllm, request_seqs: 0}]"],
     r"request_seqs=0 .*>= 1"),
    (["model.teacher=", "model.teachers=[{name: t, model: \"http://a:1\", server: vllm, head_reference: "
      "\"http://b:2\"}]"], r"head_reference checks the output layer of a stock vLLM pooling teacher.*head=DIR"),
    (["model.teacher=", "model.teachers=[{name: t, model: \"http://a:1\", head: /x, head_reference: \"http://b:2\"}]"],
     r"head_reference .* \(it needs server=vllm"),
    (["model.teacher=", "model.teachers=[{name: t, model: \"http://a:1\", server: vllm, head: /x, head_reference: "
      "\"http://b:2,http://c:3\"}]"], r"head_reference='http://b:2,http://c:3' is invalid: .*one URL"),
])
def test_config_rules(overrides, match, train_overrides):
    with pytest.raises(UserError, match=match):
        load_config(None, train_overrides + overrides)


def test_the_shorthand_and_the_entry_read_alike(train_overrides, caplog):
    a = load_config(None, train_overrides + ["model.teacher=http://a:1,http://b:2", "model.teacher_server=vllm"])
    assert [(t.model, t.server) for t in a.model.teacher_configs] == [("http://a:1,http://b:2", "vllm")]
    assert "old spelling" not in caplog.text  # the shorthand is today's spelling
    with pytest.raises(UserError, match=r"server=vllm names a kind of teacher server, but .* is not a URL"):
        load_config(None, train_overrides + ["model.teacher_server=vllm"])


def test_a_garbled_log_prob_and_a_too_long_sequence_are_one_line(fake_server, pair, make_fake_rollout):
    tok, _student, _local = pair
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    rollout = make_fake_rollout(tok)
    with StockVllmTeacher([url], vocab_size=len(tok), retries=0) as remote:
        with pytest.raises(UserError, match=r"impossible log-prob 0.5 in prompt_logprobs\[\d+\].*nothing of that "
                                            r"answer was trained on"):
            remote.score(rollout)
    _Fake.max_model_len = 8
    with StockVllmTeacher([url], vocab_size=len(tok), retries=0) as remote:
        with pytest.raises(UserError, match=r"does not fit the vLLM server's max_model_len=8 .*--max-model-len"):
            remote.score(rollout)


def test_the_prompt_budget_fits_the_servers_max_model_len(fake_server, pair, teacher_dir, train_overrides):
    from vopd.check import prompt_budget

    tok, student, _local = pair
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    _Fake.max_model_len = 40
    cfg = load_config(None, train_overrides + ["data.max_prompt_tokens=1000", "rollout.max_new_tokens=12"])
    with StockVllmTeacher([url], vocab_size=len(tok)) as generate:  # one slot for the token it generates
        budget, why = prompt_budget(cfg, student, Teachers({ONLY: generate}))
    assert budget == 40 - 1 - 12 and "vLLM --max-model-len=39" in why
    with StockVllmTeacher([url], vocab_size=len(tok), head=str(teacher_dir)) as pooling:
        assert prompt_budget(cfg, student, Teachers({ONLY: pooling}))[0] == 40 - 12


def test_the_probe_tolerance_follows_the_precision_of_the_pooled_states(fake_server, pair, teacher_dir):
    """The served model's own numbers, the generate side 0.1 nats off: refused from fp32 states (tolerance 1e-3),
    passed from states that are bf16 values (a half-precision server: tolerance 0.25); exact numbers pass from fp32
    states. The real servers' probe (a right and a wrong head) is in test_stock_vllm.py."""
    tok, student, local = pair
    SERVED.update(model=local.model, tok=tok)
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    _Fake.mode = "probe"
    with StockVllmTeacher([url], vocab_size=len(tok), head=str(teacher_dir), head_reference=url) as remote:
        line = remote.pairing_checks(student, tok)[-1]
    assert "tolerance 0.001, fp32 states" in line and float(line.split("within ")[1].split()[0]) < 1e-4
    _Fake.offset = 0.1
    with StockVllmTeacher([url], vocab_size=len(tok), head=str(teacher_dir), head_reference=url) as remote:
        with pytest.raises(UserError, match=r"up to 0.1 nats away .*tolerance 0.001 for fp32 states") as err:
            remote.pairing_checks(student, tok)
    assert "\n" not in str(err.value) and str(teacher_dir) in str(err.value)
    _Fake.mode = "probe-half"
    with StockVllmTeacher([url], vocab_size=len(tok), head=str(teacher_dir), head_reference=url) as remote:
        line = remote.pairing_checks(student, tok)[-1]
    assert "tolerance 0.25, half-precision states" in line
