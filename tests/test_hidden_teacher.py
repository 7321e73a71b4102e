"""Protocol 3: a teacher server sends its last hidden states, the trainer projects them with the output layer it loaded
from the teacher's checkpoint (fingerprint-checked), and every method equals the in-process teacher. Against real
``vopd serve-teacher`` processes over loopback: fp32 and bf16 servers, a tied + softcapped (Gemma 2) and a scaled,
padded (Granite) teacher; the refusals (wrong head, old server, malformed hidden requests) are one line each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_families import save_pair
from vopd.config import load_config
from vopd.errors import UserError
from vopd.loss.chunked import fused_distillation_loss
from vopd.loss.estimators import LossOutput
from vopd.loss.methods import METHODS, method_spec
from vopd.loss.scores import TeacherHidden
from vopd.models import last_hidden, load_model, load_output_layer, load_tokenizer, output_layer
from vopd.rollout import Rollout
from vopd.teacher.client import RemoteTeacher
from vopd.teacher.local import InProcessTeacher
from vopd.teacher.wire import head_fingerprint

CPU = torch.device("cpu")
K = 6
_FIELDS = ("logp", "logq", "reward", "baseline", "advantage", "kl", "kl_topk", "topk_mass", "ratio")


@pytest.fixture(scope="module")
def families(micro_world, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(student, teacher) directories of a Gemma 2 pair (tied output layer, softcapping) and a Granite pair (logit
    scaling, untied, 7 padding rows past the tokenizer in the teacher's output layer)."""
    root = tmp_path_factory.mktemp("hidden_families")
    tok = load_tokenizer(str(micro_world.teacher))
    return {"gemma2": save_pair(root, "gemma2", tok),
            "granite": save_pair(root, "granite", tok, teacher_rows=len(tok) + 7)}


@pytest.fixture(scope="module")
def servers(launch_teacher_servers, families):
    """fp32 with a small answer limit (hidden requests are split), bf16, and the two family teachers."""
    return launch_teacher_servers({
        "fp32": (["--max-response-mb", "0.005"], None),
        "bf16": (["--dtype", "bfloat16"], None),
        "gemma2": ([], None, families["gemma2"][1]),
        "granite": ([], None, families["granite"][1]),
    })


def _loss(student, tok, rollout: Rollout, scores: TeacherHidden, method: str) -> tuple[LossOutput, list[torch.Tensor]]:
    """The fused loss of ``method`` with the student's real head, and the gradients of its hidden states and weight."""
    with torch.no_grad():
        hidden = last_hidden(student, rollout.input_ids, rollout.attention_mask)[:, :-1]
    head = output_layer(student, len(tok))
    h, w = hidden.clone().requires_grad_(), head.weight.detach().clone().requires_grad_()
    sampled = method_spec(method).sampled
    extra = dict(sampler_logprobs=rollout.sampler_logprobs, ratio_cap=2.0) if sampled else {}
    out = fused_distillation_loss(h, w, rollout.targets, rollout.loss_mask, scores, method=method, top_k=K,
                                  normalizer=40.0, student_transform=head.transform, **extra)
    out.loss.backward()
    return out, [h.grad, w.grad]


def _assert_same(got: tuple[LossOutput, list[torch.Tensor]], ref: tuple[LossOutput, list[torch.Tensor]], atol: float,
                 what: str) -> None:
    torch.testing.assert_close(got[0].loss, ref[0].loss, atol=atol, rtol=0, msg=what)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=what)
    for field in _FIELDS:
        a, b = getattr(got[0], field), getattr(ref[0], field)
        assert (a is None) == (b is None), (what, field)
        if a is not None:
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=f"{what}: {field}")


@pytest.fixture(scope="module")
def pair(micro_world):
    tok = load_tokenizer(str(micro_world.teacher))
    teacher = load_model(str(micro_world.teacher), role="teacher", dtype=torch.float32, device=CPU)
    student = load_model(str(micro_world.student), role="student", dtype=torch.float32, device=CPU)
    return tok, InProcessTeacher(teacher, len(tok)), student


def test_health_reports_protocol_3_hidden_size_and_the_head_fingerprint(servers, pair):
    tok, teacher, _ = pair
    info = RemoteTeacher(servers["fp32"][1]).health()
    head = output_layer(teacher.model, len(tok))
    assert info["protocol"] >= 3 and info["hidden_size"] == head.weight.shape[1]
    assert info["head_sha256"] == head_fingerprint(head.weight, head.bias, head.transform)
    assert info["logit_transform"] == {"scale": 1.0, "softcap": None}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_over_hidden_states_equals_the_in_process_teacher(method, servers, pair, micro_world, make_fake_rollout):
    tok, teacher, student = pair
    rollout = make_fake_rollout(tok)
    with RemoteTeacher(servers["fp32"][1], head=str(micro_world.teacher)) as remote:
        assert remote.full_distribution
        scores = remote.score(rollout)  # 37 positions x 48 fp32 values: several requests under a 5 KiB answer limit
    assert isinstance(scores, TeacherHidden)
    _assert_same(_loss(student, tok, rollout, scores, method), _loss(student, tok, rollout, teacher.score(rollout),
                                                                        method), 1e-5, method)


def test_bf16_hidden_states(servers, pair, micro_world, make_fake_rollout):
    """A bf16 server sends bf16 states (auto); an fp32 server asked for bf16 sends its fp32 states rounded once."""
    tok, teacher, student = pair
    rollout = make_fake_rollout(tok)
    ref = teacher.score(rollout)
    live = rollout.loss_mask.bool()
    with RemoteTeacher(servers["fp32"][1], head=str(micro_world.teacher), hidden_dtype="bfloat16") as remote:
        rounded = remote.score(rollout)
    assert isinstance(rounded, TeacherHidden) and rounded.hidden.dtype == torch.bfloat16
    torch.testing.assert_close(rounded.hidden[live].float(), ref.hidden[live].to(torch.bfloat16).float(), atol=1e-5,
                               rtol=2**-8)  # the same value up to one bf16 rounding of a ~1e-6 fp32 difference
    half = InProcessTeacher(load_model(str(micro_world.teacher), role="teacher", dtype=torch.bfloat16, device=CPU),
                            len(tok))
    with RemoteTeacher(servers["bf16"][1], head=str(micro_world.teacher)) as remote:
        lines = remote.pairing_checks(student, tok)
        got = remote.score(rollout)
    assert "hidden states as bfloat16" in lines[-1] and got.weight.dtype == torch.bfloat16
    want = half.score(rollout)
    torch.testing.assert_close(got.hidden[live].float(), want.hidden[live].float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(got.weight, want.weight, atol=0, rtol=0)
    _assert_same(_loss(student, tok, rollout, got, "vopd"), _loss(student, tok, rollout, want, "vopd"), 2e-3, "bf16")


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_tied_softcapped_and_scaled_padded_heads(family, servers, families, make_fake_rollout):
    student_dir, teacher_dir = families[family]
    tok = load_tokenizer(str(teacher_dir))
    student = load_model(str(student_dir), role="student", dtype=torch.float32, device=CPU)
    teacher = InProcessTeacher(load_model(str(teacher_dir), role="teacher", dtype=torch.float32, device=CPU), len(tok))
    head = load_output_layer(str(teacher_dir), vocab_size=len(tok), dtype=torch.float32)
    want = output_layer(teacher.model, len(tok))
    assert head.transform == want.transform and not head.transform.identity
    torch.testing.assert_close(head.weight, want.weight, atol=0, rtol=0)
    rollout = make_fake_rollout(tok)
    with RemoteTeacher(servers[family][1], head=str(teacher_dir)) as remote:
        scores = remote.score(rollout)
    for method in ("vopd", "opd-full"):
        _assert_same(_loss(student, tok, rollout, scores, method),
                     _loss(student, tok, rollout, teacher.score(rollout), method), 1e-5, f"{family} {method}")


def test_another_output_layer_is_refused_by_fingerprint(servers, micro_world, pair, tmp_path):
    tok, _, student = pair
    fake = tmp_path / "fake"
    shutil.copytree(micro_world.teacher, fake)
    weights = load_file(str(fake / "model.safetensors"))
    name = next(k for k in weights if k.endswith(("lm_head.weight", "embed_tokens.weight")))
    weights[name][5, 0] += 1e-3  # one value of the output layer
    save_file(weights, str(fake / "model.safetensors"), metadata={"format": "pt"})
    with RemoteTeacher(servers["fp32"][1], head=str(fake)) as remote:
        with pytest.raises(UserError, match="is not the one the teacher server .* uses .*fingerprint.*teacher_head"):
            remote.pairing_checks(student, tok)
    with pytest.raises(UserError, match="does not exist or is not a directory"):
        RemoteTeacher(servers["fp32"][1], head=str(tmp_path / "nowhere"))


def test_a_protocol_2_server_is_told_to_update(servers, pair, micro_world, monkeypatch, make_fake_rollout):
    tok = pair[0]
    real_health = RemoteTeacher.health
    monkeypatch.setattr(RemoteTeacher, "health", lambda self: {**real_health(self), "protocol": 2})
    with pytest.raises(UserError, match="speaks protocol 2, which does not send hidden states.*update vopd"):
        RemoteTeacher(servers["fp32"][1], head=str(micro_world.teacher)).score(make_fake_rollout(tok))


@pytest.mark.parametrize("body, status, message", [
    ({"hidden": "float16"}, 422, "hidden='float16'; valid values"),
    ({"hidden": "float32", "encoding": "json"}, 422, "base64 only"),
    ({"hidden": "float32", "k": 2, "topk_ids": None}, 422, "leave out k and lse"),
    ({"hidden": "bfloat16", "lse": True}, 422, "leave out k and lse"),
    ({"hidden": "float32", "long": True}, 413, "hidden values"),
])
def test_malformed_hidden_requests_get_one_line_errors(servers, body, status, message):
    long = body.pop("long", False)
    ids = list(range(3, 3 + (60 if long else 6)))
    payload = {"sequences": [{"ids": ids, "start": 1}], "encoding": "base64", **body}
    if payload.get("topk_ids", 0) is None:
        payload.pop("topk_ids")
    r = httpx.post(f"{servers['fp32'][1]}/score", json=payload)
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and "\n" not in r.json()["error"]


def test_config_keys_for_the_head(train_overrides):
    with pytest.raises(UserError, match="model.teacher_head is for a teacher server"):
        load_config(None, train_overrides + ["model.teacher_head=/x"])
    with pytest.raises(UserError, match="model.teacher_heads names 'c'"):
        load_config(None, train_overrides + ["model.teacher=", "model.teachers={a: 'http://h:1'}",
                                             "data.teacher_field=domain", "model.teacher_heads={c: /x}"])
    with pytest.raises(UserError, match="model.teacher_hidden_dtype"):
        load_config(None, train_overrides + ["model.teacher_hidden_dtype=float16"])


def test_training_with_vopd_over_hidden_states_gives_the_in_process_weights(servers, micro_world, train_overrides,
                                                                          tmp_path):
    """`vopd train` end to end with loss.method=vopd (refused over protocol 2): the same weights and metrics as the
    in-process teacher, the step overlapped with scoring (no student ids needed)."""
    from vopd.train import train

    base = train_overrides + ["steps=2", "loss.method=vopd", "optim.eps=1.0"]
    local = train(load_config(None, base + [f"output_dir={tmp_path / 'local'}"]), log=lambda _m: None)
    logs: list[str] = []
    remote = train(load_config(None, base + [f"output_dir={tmp_path / 'remote'}", f"model.teacher={servers['fp32'][1]}",
                                             f"model.teacher_head={micro_world.teacher}"]), log=logs.append)
    assert any("every method exact" in m for m in logs), logs
    a, b = load_file(str(local.output_dir / "final" / "model.safetensors")), \
        load_file(str(remote.output_dir / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    rows = [[json.loads(line) for line in (r.output_dir / "metrics.jsonl").read_text().splitlines()]
            for r in (local, remote)]
    for x, y in zip(*rows):
        for key in ("loss", "kl_estimate", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), key
        assert "teacher_hidden_s" in y and "teacher_hidden_s" not in x  # scored ahead: no student ids needed


def test_the_payload_benchmark_measures_what_the_layout_predicts(micro_world, capsys):
    """`vopd bench teacher-payload` against a real server: the measured answer per token is the layout's (plus a few
    bytes of JSON framing), hidden bf16 is half of fp32, and a hidden state is D/(k+1) times a top-k answer."""
    from vopd.cli import main

    assert main(["bench", "teacher-payload", "--teacher", str(micro_world.teacher), "--batch", "2",
                 "--prompt-len", "8", "--completion-len", "24", "--top-k", "8"]) == 0
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| protocol")}
    measured = {name: float(cells[2]) for name, cells in rows.items() if cells[2].strip() != "-"}
    layout = {name: float(cells[3]) for name, cells in rows.items() if name in measured}
    assert set(measured) == {"ids", "topk", "topk+lse", "hidden-fp32", "hidden-bf16"}
    for name in measured:
        assert layout[name] <= measured[name] <= layout[name] + 8, name
    assert measured["hidden-bf16"] == pytest.approx(measured["hidden-fp32"] / 2, rel=0.02)
    assert measured["topk+lse"] > measured["topk"] > measured["ids"]
