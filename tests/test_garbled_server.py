"""A teacher server's answers are checked, not trusted (issue #25, items 2 and 6): a garbling proxy in front of real
``vopd serve-teacher`` processes turns their answers into every kind of malformed or impossible answer (both
protocols, and ``/health``), and each is one line naming the server and the field; a server whose identity changes
between answers is caught; an oversized answer is refused without being read; a run against a hung server ends
within seconds of Ctrl-C; bad ports, hosts and tokens are one line at the server's start and in the client."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import httpx
import numpy as np
import pytest
import torch

from vopd.errors import UserError
from vopd.models import load_tokenizer
from vopd.teacher.client import RemoteTeacher

pytestmark = pytest.mark.usefixtures("one_thread")

K = 4
Garble = Callable[[bytes], bytes]


@dataclass
class Flood:
    """An answer of ``total`` bytes, its length declared in a header or not (the connection's end delimits it)."""

    declared: bool
    total: int = 300 * 2**20


HANG = "hang"  # answer nothing until the proxy closes


class Proxy:
    """A tiny HTTP server on 127.0.0.1 that forwards to ``upstream`` (a real server) and passes its answers through
    ``garble[path]`` (bytes to bytes), or hangs, or floods. ``seen`` is set when a request hits a hanging path;
    ``sent`` counts a flood's bytes that got out."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.garble: dict[str, Garble | Flood | str] = {}
        self.seen, self.release = threading.Event(), threading.Event()
        self.sent = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy.serve(self, None)

            def do_POST(self) -> None:
                proxy.serve(self, self.rfile.read(int(self.headers.get("Content-Length", 0))))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, handler: BaseHTTPRequestHandler, body: bytes | None) -> None:
        what = self.garble.get(handler.path)
        if what == HANG:
            self.seen.set()
            self.release.wait(300)
            return
        if isinstance(what, Flood):
            self.flood(handler, what)
            return
        r = httpx.request(handler.command, self.upstream + handler.path, content=body,
                          headers={"Content-Type": "application/json"}, timeout=60)
        out = r.content if what is None or not callable(what) else what(r.content)
        handler.send_response(r.status_code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(out)))
        handler.end_headers()
        handler.wfile.write(out)

    def flood(self, handler: BaseHTTPRequestHandler, flood: Flood) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        if flood.declared:
            handler.send_header("Content-Length", str(flood.total))
        handler.end_headers()
        chunk = b'{"results": [' + b" " * (2**20 - 13)
        try:
            while self.sent < flood.total:
                handler.wfile.write(chunk)
                self.sent += len(chunk)
        except OSError:  # the client hung up: what it had not read stayed here
            pass

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def servers(launch_teacher_servers, micro_world):
    """The micro world's teacher, and its student served as another teacher (same tokenizer, other weights)."""
    return launch_teacher_servers({"teacher": ([], None), "other": ([], None, micro_world.student)})


@pytest.fixture
def proxy(servers):
    p = Proxy(servers["teacher"][1])
    yield p
    p.close()


@pytest.fixture(scope="module")
def tok(micro_world):
    return load_tokenizer(str(micro_world.teacher))


@pytest.fixture(scope="module")
def rollout(tok, make_fake_rollout):
    return make_fake_rollout(tok)


@pytest.fixture(scope="module")
def topk(rollout, tok):
    """K distinct ids per position, the next token first: every consistency check of an answer applies."""
    return torch.stack([(rollout.targets + j) % len(tok) for j in range(K)], -1)


def refused(call: Callable[[], object], url: str, *fragments: str) -> str:
    """The one-line ``UserError`` of ``call``, which names the server ``url`` and every fragment."""
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and url in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- garbling helpers: real answers, one fault each ------------------------------------------------------------

def as_json(change: Callable[[Any], Any]) -> Garble:
    return lambda body: json.dumps(change(json.loads(body))).encode()


def first_result(change: Callable[[dict[str, Any]], None]) -> Garble:
    def garble(answer: Any) -> Any:
        change(answer["results"][0])
        return answer
    return as_json(garble)


def floats(field: str, change: Callable[[np.ndarray], np.ndarray], dtype: str = "<f4") -> Garble:
    """Every result's base64 ``field`` decoded, changed, encoded back."""
    def garble(answer: Any) -> Any:
        for res in answer["results"]:
            values = np.frombuffer(base64.b64decode(res[field]), dtype).copy()
            res[field] = base64.b64encode(np.ascontiguousarray(change(values), dtype).tobytes()).decode()
        return answer
    return as_json(garble)


def put(key: str, value: object) -> Garble:
    return as_json(lambda answer: {**answer, key: value})


def drop(key: str) -> Garble:
    return as_json(lambda answer: {k: v for k, v in answer.items() if k != key})


def setitem(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    return lambda res: res.__setitem__(key, value)


NUMBERS_FAULTS: dict[str, tuple[Garble, tuple[str, ...]]] = {
    "not JSON": (lambda _b: b"<html>Bad Gateway</html>", ("POST /score", "not JSON", "another kind of server")),
    "cut short": (lambda b: b[: len(b) // 2], ("not JSON",)),
    "a list": (lambda _b: b"[1, 2]", ("a JSON list, expected a JSON object",)),
    "null": (lambda _b: b"null", ("a JSON null",)),
    "no results": (drop("results"), ("results is missing",)),
    "results an object": (put("results", {}), ("results is {}", "a list of 6 results")),
    "too few results": (as_json(lambda a: {**a, "results": a["results"][:-1]}), ("results is a list of 5",)),
    "a result not an object": (as_json(lambda a: {**a, "results": [7] + a["results"][1:]}),
                               ("results[0] is 7, expected an object",)),
    "logq missing": (first_result(lambda r: r.pop("logq")), ("results[0].logq is missing", "float32")),
    "logq a number": (first_result(setitem("logq", 3.5)), ("results[0].logq is 3.5",)),
    "logq null": (first_result(setitem("logq", None)), ("results[0].logq is None",)),
    "logq bad base64": (first_result(setitem("logq", "%%%")), ("results[0].logq is not valid base64",)),
    "logq too short": (floats("logq", lambda v: v[:-1]), ("results[0].logq holds", "expected")),
    "logits missing": (first_result(lambda r: r.pop("logits")), ("results[0].logits is missing",)),
    "logits too long": (floats("logits", lambda v: np.concatenate([v, v[:1]])), ("results[0].logits holds",)),
    "lse missing": (first_result(lambda r: r.pop("lse")), ("results[0].lse is missing",)),
    "lse as a list": (first_result(setitem("lse", [1.0, 2.0])), ("results[0].lse is [1.0, 2.0]",)),
    "another encoding": (put("encoding", "json"), ("encoding is 'json', expected 'base64'",)),
    "another k": (put("k", 3), ("k is 3, expected 4",)),
    "no identity": (drop("identity"), ("identity missing", "restarted with another vopd")),
    "another identity": (put("identity", "f" * 64), ("now serves another teacher", "identity")),
    # impossible numbers
    "positive logq": (floats("logq", lambda v: np.abs(v) + 0.5), ("results[0].logq", "positive log-probability")),
    "nan logits": (floats("logits", lambda v: np.where(np.arange(v.size) == 2, np.nan, v)),
                   ("results[0].logits[0, 2] = nan is not finite",)),
    "inf lse": (floats("lse", lambda v: v + np.inf), ("results[0].lse[0] = inf is not finite",)),
    "absurd logits": (floats("logits", lambda v: v * 1e6 + 1e5), ("results[0].logits", "beyond +-10000",)),
    "logits above lse": (floats("lse", lambda v: v - 20), ("results[0].logits", "more than 1")),
    "logq off its logit": (floats("logq", lambda v: v - 1.0), ("results[0].logq", "logit minus lse")),
}


@pytest.mark.parametrize("fault", NUMBERS_FAULTS)
def test_malformed_or_impossible_numbers_are_one_line(fault, proxy, rollout, topk):
    garble, fragments = NUMBERS_FAULTS[fault]
    remote = RemoteTeacher(proxy.url, retries=0)
    remote.score(rollout, topk, lse=True)  # the real answer passes every check
    proxy.garble["/score"] = garble
    message = refused(lambda: remote.score(rollout, topk, lse=True), proxy.url, *fragments)
    assert message.endswith("run the command again (vopd train: --resume continues from the last checkpoint, "
                            "which is kept)"), message


def test_without_lse_log_q_cannot_pass_its_share_among_the_ids(proxy, rollout, topk):
    """Numbers at ids without the log-sum-exp: log q(y_t) = 0 is a valid log-probability, but not next to logits
    that give y_t only part of the asked ids' mass."""
    remote = RemoteTeacher(proxy.url, retries=0)
    remote.score(rollout, topk)
    proxy.garble["/score"] = floats("logq", lambda v: v * 0)
    refused(lambda: remote.score(rollout, topk), proxy.url, "results[0].logq", "share among the asked ids")


def _shuffle_rows(width: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda v: v.reshape(-1, width)[::-1].reshape(-1)


def hidden_faults(width: int) -> dict[str, tuple[Garble, tuple[str, ...]]]:
    return {
        "hidden missing": (first_result(lambda r: r.pop("hidden")), ("results[0].hidden is missing",)),
        "hidden a list": (first_result(setitem("hidden", [0.0])), ("results[0].hidden is [0.0]",)),
        "hidden bad base64": (first_result(setitem("hidden", "abc")), ("results[0].hidden is not valid base64",)),
        "hidden short": (floats("hidden", lambda v: v[:-width]), ("results[0].hidden holds",)),
        "hidden another dtype": (put("hidden", "bfloat16"), ("hidden is 'bfloat16', expected 'float32'",)),
        "hidden nan": (floats("hidden", lambda v: np.where(np.arange(v.size) == 5, np.nan, v)),
                       ("results[0].hidden[0, 5] = nan is not finite",)),
        "hidden zeros": (floats("hidden", lambda v: v * 0), ("results[0].hidden", "all-zero hidden state")),
        "hidden rows shuffled": (floats("hidden", _shuffle_rows(width)), ("results[0].hidden", "its probe says")),
        "hidden values shuffled": (floats("hidden", lambda v: np.random.default_rng(0).permutation(v)),
                                   ("results[0].hidden", "its probe says")),
        "hidden scaled": (floats("hidden", lambda v: v * 30), ("results[0].hidden", "its probe says")),
        "probe missing": (first_result(lambda r: r.pop("probe")), ("results[0].probe is missing",)),
        "probe nan": (floats("probe", lambda v: v * np.nan), ("results[0].probe[0] = nan is not finite",)),
        "no identity": (drop("identity"), ("identity missing",)),
    }


def test_malformed_or_impossible_hidden_states_are_one_line(proxy, rollout, micro_world, tok):
    remote = RemoteTeacher(proxy.url, retries=0, head=str(micro_world.teacher), hidden_dtype="float32")
    remote.score(rollout)  # the real answer passes every check, its probes included
    width = int(remote.health()["hidden_size"])
    for fault, (garble, fragments) in hidden_faults(width).items():
        proxy.garble["/score"] = garble
        message = refused(lambda: remote.score(rollout), proxy.url, *fragments)
        assert "nothing of that answer was trained on" in message, (fault, message)


HEALTH_FAULTS: dict[str, tuple[Garble, tuple[str, ...]]] = {
    "not JSON": (lambda _b: b"<!doctype html><title>Jupyter</title>", ("GET /health", "not JSON",
                                                                       "another kind of server")),
    "a list": (lambda _b: b"[]", ("a JSON list",)),
    "a string": (lambda _b: b'"ok"', ("a JSON str",)),
    "no limits": (drop("limits"), ("limits is missing",)),
    "limits a list": (put("limits", [64]), ("limits is [64]",)),
    "max_batch a string": (as_json(lambda a: {**a, "limits": {**a["limits"], "max_batch": "64"}}),
                           ("limits.max_batch is '64', expected an integer >= 1",)),
    "max_body_mb negative": (as_json(lambda a: {**a, "limits": {**a["limits"], "max_body_mb": -1}}),
                             ("limits.max_body_mb is -1",)),
    "no max_k": (as_json(lambda a: {**a, "limits": {k: v for k, v in a["limits"].items() if k != "max_k"}}),
                 ("limits.max_k is missing",)),
    "unknown dtype": (put("dtype", "float8"), ("dtype is 'float8', expected one of float32, bfloat16, float16",)),
    "vocab_size null": (put("vocab_size", None), ("vocab_size is None",)),
    "vocab_size a bool": (put("vocab_size", True), ("vocab_size is True",)),
    "protocol a string": (put("protocol", "4"), ("protocol is '4'",)),
    "tokenizer fingerprint": (put("tokenizer_sha256", "abc"), ("tokenizer_sha256 is 'abc'", "64 hex digits")),
    "no hidden_size": (drop("hidden_size"), ("hidden_size is missing",)),
    "identity not its fingerprints'": (put("identity", "0" * 64), ("identity is", "identity_of")),
}


@pytest.mark.parametrize("fault", HEALTH_FAULTS)
def test_a_malformed_health_answer_is_one_line(fault, proxy):
    garble, fragments = HEALTH_FAULTS[fault]
    proxy.garble["/health"] = garble
    message = refused(lambda: RemoteTeacher(proxy.url, retries=0).health(), proxy.url, *fragments)
    assert "is a vopd serve-teacher of this version listening there?" in message, message


def test_a_server_restarted_with_another_teacher_is_caught_on_its_next_answer(proxy, servers, rollout, topk, tok,
                                                                               micro_world):
    """The same port, now served by another model with the same tokenizer (the student's weights): the pre-flight
    passed, the first answer was used, the next ones are refused, naming the fingerprints that changed."""
    from vopd.models import load_model

    student = load_model(str(micro_world.student), role="student", dtype=torch.float32, device=torch.device("cpu"))
    remote = RemoteTeacher(proxy.url, retries=0)
    assert "same tokenizer" in remote.pairing_checks(student, tok)[0]
    remote.score(rollout, topk, lse=True)
    proxy.upstream = servers["other"][1]  # "restarted" with another model
    refused(lambda: remote.score(rollout, topk, lse=True), proxy.url, "now serves another teacher",
            "model_sha256", "head_sha256", "run the command again")
    refused(remote.health, proxy.url, "now serves another teacher", "model_sha256")
    hidden = RemoteTeacher(proxy.url, retries=0, head=str(micro_world.student))
    hidden.score(rollout)  # the student's head checks against the server it now is
    proxy.upstream = servers["teacher"][1]
    refused(lambda: hidden.score(rollout), proxy.url, "now serves another teacher")


def test_a_protocol_3_server_still_serves_without_identity_or_probes(proxy, rollout, topk, tok, micro_world):
    """An older server's answers (no identity, no probes) are used, with every other check; the pre-flight says
    that a restart with another teacher would go unnoticed."""
    from vopd.models import load_model

    def older(answer: Any) -> Any:
        answer.pop("identity")
        answer.pop("model_sha256", None)
        for res in answer.get("results", []):
            res.pop("probe", None)
        return {**answer, "protocol": 3} if "limits" in answer else answer

    proxy.garble["/health"] = proxy.garble["/score"] = as_json(older)
    student = load_model(str(micro_world.student), role="student", dtype=torch.float32, device=torch.device("cpu"))
    with RemoteTeacher(proxy.url, retries=0) as remote:
        assert "answers carry no identity" in remote.pairing_checks(student, tok)[0]
        assert remote.score(rollout, topk, lse=True).lse is not None
    with RemoteTeacher(proxy.url, retries=0, head=str(micro_world.teacher)) as remote:
        assert remote.score(rollout).hidden.abs().sum() > 0
    proxy.garble["/score"] = floats("logq", lambda v: v + 5)  # the number checks do not depend on the version
    refused(lambda: RemoteTeacher(proxy.url, retries=0).score(rollout, topk, lse=True), proxy.url,
            "positive log-probability")


@pytest.mark.parametrize("declared", [True, False], ids=["declared length", "streamed"])
def test_an_oversized_answer_is_refused_without_reading_it(declared, proxy, rollout, topk):
    """A server that answers 300 MB where its limits allow a few KiB: refused from the declared length, or after
    reading a little more than the limit; what the client did not read never left the server's socket buffers."""
    remote = RemoteTeacher(proxy.url, retries=0)
    remote.health()
    proxy.garble["/score"] = Flood(declared)
    t0 = time.monotonic()
    refused(lambda: remote.score(rollout, topk, lse=True), proxy.url, "POST /score of at least", "not read")
    assert time.monotonic() - t0 < 10 and proxy.sent < 64 * 2**20, proxy.sent
    proxy.garble["/health"], proxy.sent = Flood(declared), 0
    refused(lambda: RemoteTeacher(proxy.url, retries=0).health(), proxy.url, "GET /health of at least")
    assert proxy.sent < 64 * 2**20


@pytest.mark.parametrize("token, fragment", [
    ("s3cret ", "has whitespace around it"),
    ("\ts3cret", "has whitespace around it"),
    ("s3\x7fcret", "holds the character '\\x7f'"),
    ("s3crét", "holds the character 'é'"),
])
def test_the_client_refuses_a_token_that_cannot_travel(token, fragment, monkeypatch):
    """Before anything is sent: a trailing space would be reported as an unreachable server, a non-ASCII
    character as a traceback."""
    for source in ("the teacher's token", "$VOPD_TEACHER_TOKEN"):
        monkeypatch.setenv("VOPD_TEACHER_TOKEN", token)
        with pytest.raises(UserError) as info:
            RemoteTeacher("http://127.0.0.1:9", token=token if source.startswith("the") else None)
        message = str(info.value)
        assert message.startswith(f"{source} {fragment}") and "\n" not in message, message


# --- the server's start-up: one line and a non-zero exit within seconds ----------------------------------------

def test_bad_ports_and_hosts_stop_the_server_process_at_once_with_one_line(micro_world):
    """Real `vopd serve-teacher` processes: before this, port 99999 printed ':99999' and listened on 34463, and a
    port in use or an unknown host was uvicorn's ERROR line after the model had loaded."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = {
            "port 99999": (["--port", "99999"], "--port 99999 is not a TCP port: give one in 1..65535"),
            "port in use": (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}: Address already in use; "
                                                   "another process listens there"),
            "unknown host": (["--host", "no-such-host.invalid", "--token", "t0ken"],
                             "--host no-such-host.invalid does not resolve"),
        }
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("VOPD_TEACHER_TOKEN", None)
        t0 = time.monotonic()
        procs = {name: subprocess.Popen([sys.executable, "-m", "vopd", "serve-teacher", str(micro_world.teacher),
                                         "--device", "cpu", *args], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                 for name, (args, _) in cases.items()}  # together: their start-ups overlap
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            lines = [line for line in (out + err).splitlines() if line.strip()]
            assert proc.returncode == 2 and len(lines) == 1, (name, out, err)
            assert lines[0].startswith("vopd serve-teacher: error: ") and cases[name][1] in lines[0], (name, lines)
    # Python's and torch's imports are most of it (5 s on an idle 2-core machine, all three).
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("args, env, message", [
    (["--port", "0"], {}, "--port 0 is not a TCP port"),
    (["--host", "192.0.2.1", "--token", "t0ken"], {}, "cannot listen on 192.0.2.1:8000: Cannot assign requested "
                                                      "address; it is not an address of this machine"),
    (["--token", "t0ken "], {}, "--token has whitespace around it"),
    (["--token", " "], {}, "--token has whitespace around it"),
    ([], {"VOPD_TEACHER_TOKEN": "t0k\u00e9n"}, "$VOPD_TEACHER_TOKEN holds the character 'é'"),
    (["--token-env", "MY_TOKEN"], {"MY_TOKEN": "t0ken\n"}, "$MY_TOKEN has whitespace around it"),
], ids=["port 0", "foreign address", "token with a space", "blank token", "non-ASCII token", "token with a newline"])
def test_bad_addresses_and_tokens_are_refused_before_the_model_loads(args, env, message, micro_world, monkeypatch,
                                                                     capsys):
    """The command line in this process (the same ``main`` as the processes above), with a model directory that does
    not exist: the refusal comes first, so it is about the address or the token, not the model."""
    from vopd.cli import main

    monkeypatch.delenv("VOPD_TEACHER_TOKEN", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve-teacher", str(micro_world.root / "no-such-model"), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vopd serve-teacher: error: {message}"), err


# --- Ctrl-C ----------------------------------------------------------------------------------------------------

def _interrupt_a_run(proxy: Proxy, micro_world, tmp_path, overlap: bool) -> tuple[int, str, float]:
    """(exit code, stderr, seconds from SIGINT to exit) of a `vopd train` whose teacher server hangs on /score."""
    proxy.garble["/score"] = HANG
    argv = ["train", f"model.student={micro_world.student}", f"model.teacher={proxy.url}",
            f"data.train={micro_world.train}", f"output_dir={tmp_path / 'run'}", "rollout.max_new_tokens=8",
            "batch_size=4", "micro_batch_size=2", "steps=2", "progress=false", "loss.method=opd",
            "model.teacher_timeout_s=300", "model.teacher_retries=0", f"model.teacher_overlap={str(overlap).lower()}"]
    # A terminal's Ctrl-C: SIGINT raises KeyboardInterrupt (a child of a background job would inherit SIG_IGN).
    code = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"sys.argv = ['vopd', *{argv!r}]; runpy.run_module('vopd', run_name='__main__')")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VOPD_TEACHER_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proxy.seen.wait(120), "the run never asked the teacher"
        time.sleep(1.0)  # the main thread is now waiting for the answer
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _out, err = proc.communicate(timeout=60)
        return proc.returncode, err, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("overlap", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["overlapped scoring", "inline scoring"])  # inline: the main thread's recv, never broken
def test_ctrl_c_ends_a_run_waiting_on_a_hung_server(overlap, proxy, micro_world, tmp_path):
    """Overlapped, the main thread waits on the background thread's answer: before, that thread (a
    ThreadPoolExecutor's, joined at exit) kept the process alive for the request's timeout after Ctrl-C."""
    code, err, seconds = _interrupt_a_run(proxy, micro_world, tmp_path, overlap=overlap)
    assert code == 130 and "vopd train: interrupted" in err and seconds < 10, (code, seconds, err[-2000:])
