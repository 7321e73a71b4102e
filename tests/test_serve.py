"""The teacher server as a real process: a remote teacher gives the in-process numbers and losses, and it refuses
what it must (no/wrong token, oversized or malformed requests); a killed server gives one clear error."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
import torch

from vopd.loss.chunked import chunked_distillation_loss
from vopd.errors import UserError
from vopd.models import last_hidden, load_model, load_tokenizer, output_layer
from vopd.loss.chunked import fused_distillation_loss, student_topk_ids
from vopd.loss.scores import TeacherNumbers
from vopd.teacher.client import RemoteTeacher
from vopd.teacher.local import InProcessTeacher
from vopd.teacher.wire import PROTOCOL_VERSION, b64_decode, b64_encode, tokenizer_fingerprint

TOKEN = "s3cret-test-token"
K = 8
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def servers(launch_teacher_servers):
    """Two real server processes: "main", the teacher behind a token with small limits (splitting and 413s are cheap
    to exercise), and "victim", without a token, to be killed."""
    return launch_teacher_servers({
        "main": (["--max-batch", "4", "--max-tokens", "400", "--max-k", "16", "--max-body-mb", "0.05",
                  "--max-response-mb", "0.01"], TOKEN),
        "victim": ([], None),
    })


@pytest.fixture(scope="module")
def server(servers) -> str:
    return servers["main"][1]


@pytest.fixture(scope="module")
def models(micro_world):
    tok = load_tokenizer(str(micro_world.teacher))
    teacher = load_model(str(micro_world.teacher), role="teacher", dtype=torch.float32, device=CPU)
    student = load_model(str(micro_world.student), role="student", dtype=torch.float32, device=CPU)
    return tok, InProcessTeacher(teacher, len(tok)), student


@pytest.fixture(scope="module")
def rollout(models, make_fake_rollout):
    """Six prompts (more than the server's max_batch of 4) with fake completions of different lengths."""
    return make_fake_rollout(models[0])


@pytest.fixture(scope="module")
def student_side(models, rollout):
    tok, _, student = models
    with torch.no_grad():
        hidden = last_hidden(student, rollout.input_ids, rollout.attention_mask)[:, :-1]
        head = output_layer(student, len(tok))
    assert head.bias is None and head.transform.identity
    return hidden.detach().clone(), head.weight.detach().clone()


def test_health_reports_model_vocab_tokenizer_and_limits(server, models, micro_world):
    info = RemoteTeacher(server, token=TOKEN).health()
    assert info["vocab_size"] == len(models[0]) and info["protocol"] == PROTOCOL_VERSION
    assert info["tokenizer_sha256"] == tokenizer_fingerprint(load_tokenizer(str(micro_world.student)))
    assert info["limits"] == {"max_batch": 4, "max_tokens": 400, "max_k": 16, "max_body_mb": 0.05,
                              "max_response_mb": 0.01}


def test_remote_scores_equal_in_process_teacher(server, models, rollout, student_side):
    _, teacher, _ = models
    hidden, weight = student_side
    ids = student_topk_ids(hidden, weight, rollout.loss_mask, K)
    with RemoteTeacher(server, token=TOKEN) as remote:
        got = remote.score(rollout, ids, lse=True)  # 6 sequences: two requests (the server's max_batch is 4)
        plain = remote.score(rollout)
    t = teacher.score(rollout)
    z = t.hidden @ t.weight.T
    mask = rollout.loss_mask
    want_logq = z.log_softmax(-1).gather(-1, rollout.targets.unsqueeze(-1)).squeeze(-1) * mask
    want_logits = z.gather(-1, ids) * mask.unsqueeze(-1)
    torch.testing.assert_close(got.logq, want_logq, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.topk_logits, want_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.lse, z.logsumexp(-1) * mask, atol=1e-5, rtol=0)
    assert plain.topk_logits is None and plain.lse is None
    torch.testing.assert_close(plain.logq, got.logq, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["opd", "vopd-topk", "opd-topk", "rb-topk"])
def test_remote_loss_equals_chunked_loss_with_in_process_teacher(server, models, rollout, student_side, method):
    _, teacher, _ = models
    t = teacher.score(rollout)
    hidden, weight = student_side
    mask = rollout.loss_mask
    extra = dict(sampler_logprobs=rollout.sampler_logprobs, ratio_cap=2.0) if method != "opd-topk" else {}
    ids = student_topk_ids(hidden, weight, mask, K)
    with RemoteTeacher(server, token=TOKEN) as remote:
        scores = remote.score(rollout, ids if method != "opd" else None, lse=method == "rb-topk")
    results = []
    for use_remote in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if use_remote:
            out = fused_distillation_loss(h, w, rollout.targets, mask, scores, method=method, normalizer=40.0,
                                          **extra)
        else:
            out = chunked_distillation_loss(h, w, t.hidden, t.weight, rollout.targets, mask, method=method, top_k=K,
                                            normalizer=40.0, **extra)
        out.loss.backward()
        results.append((out, h.grad, w.grad))
    (ref, ref_gh, ref_gw), (got, gh, gw) = results
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(gh, ref_gh, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=0)
    for field in ("logp", "logq", "reward", "baseline", "advantage", "kl_topk", "topk_mass", "ratio"):
        a, b = getattr(ref, field), getattr(got, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=field)


def test_remote_loss_equals_chunked_with_bias_and_many_chunks():
    """No server: synthetic heads with output biases, a budget of 8 rows per chunk, every method."""
    gen = torch.Generator().manual_seed(1)
    b, t, d, dt, v, k = 3, 9, 5, 6, 40, 6
    hs0, ws0, bs0 = torch.randn(b, t, d, generator=gen), torch.randn(v, d, generator=gen), torch.randn(v, generator=gen)
    ht, wt, bt = torch.randn(b, t, dt, generator=gen), torch.randn(v, dt, generator=gen), torch.randn(v, generator=gen)
    y, mask = torch.randint(0, v, (b, t), generator=gen), torch.rand(b, t, generator=gen) > 0.3
    slp = -3 * torch.rand(b, t, generator=gen)
    zt = ht @ wt.T + bt
    logq = zt.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    for method in ("opd", "vopd-topk", "opd-topk", "rb-topk"):
        grads = []
        for use_remote in (False, True):
            hs, ws, bs = (x.clone().requires_grad_() for x in (hs0, ws0, bs0))
            kw = dict(method=method, student_bias=bs, sampler_logprobs=slp, ratio_cap=1.5, memory_budget_mb=1e-4)
            if use_remote:
                ids = student_topk_ids(hs, ws, mask, k, bias=bs, memory_budget_mb=1e-4)
                numbers = TeacherNumbers(logq, ids, zt.gather(-1, ids), zt.logsumexp(-1))
                out = fused_distillation_loss(hs, ws, y, mask, numbers, **kw)
            else:
                out = chunked_distillation_loss(hs, ws, ht, wt, y, mask, top_k=k, teacher_bias=bt, **kw)
            out.loss.backward()
            grads.append((out.loss.detach(), hs.grad, ws.grad, bs.grad))
        for a, c in zip(*grads):
            torch.testing.assert_close(c, a, atol=1e-5, rtol=0, msg=method)


@pytest.mark.parametrize("method", ["vopd", "opd-full", "vopd-opt"])
def test_full_vocabulary_methods_are_refused(method):
    h, w = torch.randn(1, 3, 4, requires_grad=True), torch.randn(10, 4)
    y, mask = torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="full distribution.*vopd-topk"):
        fused_distillation_loss(h, w, y, mask, TeacherNumbers(torch.zeros(1, 3)), method=method)


def test_rb_topk_needs_the_teacher_lse_and_a_protocol_2_server(server, rollout, monkeypatch):
    h, w = torch.randn(1, 3, 4, requires_grad=True), torch.randn(10, 4)
    y, mask = torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool)
    ids = torch.zeros(1, 3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="needs teacher_lse"):
        fused_distillation_loss(h, w, y, mask, TeacherNumbers(torch.zeros(1, 3), ids, torch.zeros(1, 3, 2)),
                                method="rb-topk")
    real_health = RemoteTeacher.health
    monkeypatch.setattr(RemoteTeacher, "health", lambda self: {**real_health(self), "protocol": 1})
    with pytest.raises(UserError, match="speaks protocol 1.*rb-topk needs"):
        RemoteTeacher(server, token=TOKEN).score(rollout, lse=True)


def test_missing_or_wrong_token_is_refused(server):
    body = {"sequences": [{"ids": [1, 5, 6], "start": 0}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for r in (httpx.get(f"{server}/health", headers=headers), httpx.post(f"{server}/score", json=body,
                                                                             headers=headers)):
            assert r.status_code == 401 and "bearer token" in r.json()["error"]
    with pytest.raises(UserError, match="refused the token"):
        RemoteTeacher(server, token="wrong").health()
    ok = httpx.post(f"{server}/score", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and len(ok.json()["results"][0]["logq"]) == 2


def _post(url: str, payload: object = None, content: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if content is not None:
        return httpx.post(f"{url}/score", content=content, headers=headers)
    return httpx.post(f"{url}/score", json=payload, headers=headers)


def test_oversized_requests_are_refused_with_413(server):
    seq = {"ids": [1, 5, 6, 7], "start": 1}
    cases = {
        "max_batch=4": {"sequences": [seq] * 5},
        "max_tokens=400": {"sequences": [{"ids": [5] * 401, "start": 0}]},
        "max_k=16": {"sequences": [{**seq, "topk_ids": [[1] * 17] * 2}], "k": 17},
    }
    for limit, payload in cases.items():
        r = _post(server, payload)
        assert r.status_code == 413 and limit in r.json()["error"], (limit, r.text)
    r = _post(server, content=b'{"sequences": [' + b" " * 60_000 + b"]}")
    assert r.status_code == 413 and "max_body_mb" in r.json()["error"]
    # The answer is bounded before any scoring (the server's is 10 KiB here): 398 positions x (log q + 16 logits) as
    # base64 is ~35 KiB; log q + lse as JSON text ~18 KiB. A request whose answer fits is served.
    long = {"ids": [5] * 399, "start": 0}
    for extra, size, what in (
        ({"k": 16, "encoding": "base64", "sequences": [{**long, "topk_ids": b64_encode(torch.ones(398, 16).int())}]},
         "0.0344", "17 values as base64"),
        ({"lse": True, "sequences": [long]}, "0.0182", "2 values as json"),
    ):
        r = _post(server, extra)
        assert r.status_code == 413, r.text
        assert f"answer would take ~{size} MiB (398 scored positions x {what}), over this server's limit " \
               "max_response_mb=0.01" in r.json()["error"]
    r = _post(server, {"sequences": [{"ids": [5] * 100, "start": 0}], "encoding": "base64", "lse": True})
    assert r.status_code == 200 and len(b64_decode(r.json()["results"][0]["lse"], torch.float32, 99)) == 99
    # Parsed JSON costs memory per array and value: a body that holds more of them than any valid request is refused
    # before it is parsed.
    r = _post(server, content=b"[" + b"[]," * 15_000 + b"[]]")
    assert r.status_code == 413 and "JSON arrays/objects" in r.json()["error"], r.text


def test_malformed_requests_are_refused_with_a_clear_message(server, models):
    vocab = len(models[0])
    cases = [
        ({"sequences": [{"ids": [1, vocab], "start": 0}]}, 422, f"token id {vocab}, outside"),
        ({"sequences": [{"ids": [1, -3, 4], "start": 0}]}, 422, "token id -3"),
        ({"sequences": [{"ids": [1, 2.5, 4], "start": 0}]}, 422, "integer token ids"),
        ({"sequences": [{"ids": [1, 2, 4], "start": 2}]}, 422, "start=2 is outside the sequence"),
        ({"sequences": [{"ids": [1, 2, 4], "start": -1}]}, 422, "outside the sequence"),
        ({"sequences": [{"ids": [1, 2, 4], "start": 0, "topk_ids": [[1, 2], [3]]}], "k": 2}, 422, "rectangular"),
        ({"sequences": [{"ids": [1, 2, 4], "start": 0, "topk_ids": [[1, 2]]}], "k": 2}, 422, "expected (2, 2)"),
        ({"sequences": [{"ids": [1, 2, 4], "start": 0}], "k": 2}, 422, "topk_ids missing"),
        ({"sequences": [{"ids": [1, 2, 4], "start": 0, "topk_ids": "!!"}], "k": 1, "encoding": "base64"}, 422,
         "base64"),
        ({"sequences": [{"ids": [1, 2], "begin": 0}]}, 422, "unknown field"),
        ({"sequences": [{"ids": [1, 2]}], "lse": 1}, 422, "lse=1 must be true or false"),
        ({"sequences": []}, 422, "non-empty list"),
    ]
    for payload, status, text in cases:
        r = _post(server, payload)
        assert r.status_code == status and text in r.json()["error"], (payload, r.text)
    for body, status in ((b"{not json", 400), (b"[" * 300 + b"]" * 299, 400), (bytes(range(256)), 400),
                         (b'{"k": "\xff"}', 400), (b'{"k": 1e999999}', 422), (b"[" * 300 + b"]" * 300, 422)):
        r = _post(server, content=body)
        assert r.status_code == status and r.json()["error"], (body[:20], r.text)
        assert status != 400 or "not valid JSON" in r.json()["error"]


def test_malformed_json_of_any_shape_gets_a_4xx_never_a_500():
    """Every body, valid JSON or not, ends in the validated request or an ApiError (400, 413 or 422): random nested
    values in every field, deep nesting (400 from the parser's recursion limit), numbers too large for a float."""
    import json
    import random

    from vopd.teacher.wire import ApiError, Limits, parse_request

    limits = Limits(max_batch=8, max_tokens=512, max_k=4, max_body_mb=1, max_response_mb=0.1)
    with pytest.raises(ApiError) as info:
        parse_request(b"[" * 100_000 + b"]" * 100_000, Limits(), 50)  # within the default structure budget
    assert info.value.status == 400 and "nested too deeply" in info.value.message
    with pytest.raises(ApiError) as info:
        parse_request(b'{"sequences": [{"ids": ' + b"[" * 5_000 + b"]" * 5_000 + b"}]}", Limits(), 50)
    assert info.value.status == 400

    rng = random.Random(0)

    def junk(depth: int = 0):
        kind = rng.randrange(9 if depth < 4 else 6)
        return [lambda: rng.randint(-3, 60), lambda: rng.random() * 1e3, lambda: rng.choice([True, False, None]),
                lambda: rng.choice(["", "x", "AAAA", "!!"]), lambda: 2**70, lambda: float("nan"),
                lambda: [junk(depth + 1) for _ in range(rng.randrange(4))],
                lambda: {rng.choice(["ids", "start", "topk_ids", "k", "q"]): junk(depth + 1)
                         for _ in range(rng.randrange(4))},
                lambda: [rng.randint(0, 49) for _ in range(rng.randrange(1, 6))]][kind]()

    statuses = set()
    for _ in range(3000):
        seqs = [{k: junk() for k in rng.sample(["ids", "start", "topk_ids", "extra"], rng.randrange(1, 4))}
                for _ in range(rng.randrange(3))]
        req = {k: v for k, v in (("sequences", seqs if rng.random() < 0.8 else junk()), ("k", junk()),
                                 ("encoding", rng.choice(["json", "base64", junk()])), ("lse", junk()))
               if rng.random() < 0.7}
        body = json.dumps(req if rng.random() < 0.9 else junk()).encode()
        if rng.random() < 0.1:
            body = body[: rng.randrange(len(body) + 1)]  # cut short
        try:
            parse_request(body, limits, 50)
            statuses.add(200)
        except ApiError as exc:
            assert exc.status in (400, 413, 422) and exc.message and "\n" not in exc.message, exc.message
            statuses.add(exc.status)
    assert {400, 422} <= statuses
    for hidden in ([], ["float32"], {"a": 1}, 3, True, "float16"):  # the hidden field of any JSON type: a 422
        body = json.dumps({"sequences": [{"ids": [1, 2]}], "encoding": "base64", "hidden": hidden}).encode()
        with pytest.raises(ApiError, match=r"^hidden=.*valid values: 'float32', 'bfloat16'") as info:
            parse_request(body, limits, 50)
        assert info.value.status == 422


def test_json_and_base64_encodings_agree(server):
    seq = {"ids": [1, 5, 6, 7, 8], "start": 1, "topk_ids": [[5, 6], [7, 8], [1, 2]]}
    a = _post(server, {"sequences": [seq], "k": 2, "lse": True}).json()["results"][0]
    from vopd.teacher.wire import b64_decode, b64_encode

    seq_b = {**seq, "topk_ids": b64_encode(torch.tensor(seq["topk_ids"]))}
    b = _post(server, {"sequences": [seq_b], "k": 2, "encoding": "base64", "lse": True}).json()["results"][0]
    torch.testing.assert_close(b64_decode(b["logq"], torch.float32, 3), torch.tensor(a["logq"]))
    torch.testing.assert_close(b64_decode(b["logits"], torch.float32, 6).reshape(3, 2), torch.tensor(a["logits"]))
    torch.testing.assert_close(b64_decode(b["lse"], torch.float32, 3), torch.tensor(a["lse"]))
    assert "lse" not in _post(server, {"sequences": [seq], "k": 2}).json()["results"][0]  # protocol 1's answer


def test_killed_server_gives_one_clear_error_after_retries(servers, rollout):
    proc, url = servers["victim"]
    remote = RemoteTeacher(url, token="", timeout_s=2, retries=2, backoff_s=0.05)
    assert remote.score(rollout).logq.shape == rollout.targets.shape
    proc.send_signal(signal.SIGKILL)  # mid-run: the client already talked to it
    proc.wait(10)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"unreachable after 3 tries \(last error .*\): restart it and run the "
                                        r"command again \(vopd train: --resume continues from the last checkpoint, "
                                        r"which is kept\)"):
        remote.score(rollout)
    assert time.monotonic() - t0 < 10


def test_non_loopback_host_without_token_is_refused(micro_world, monkeypatch, capsys):
    from vopd.cli import main

    monkeypatch.delenv("VOPD_TEACHER_TOKEN", raising=False)
    assert main(["serve-teacher", str(micro_world.teacher), "--host", "0.0.0.0"]) == 2
    assert "without a token" in capsys.readouterr().err
