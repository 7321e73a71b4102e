"""What each teacher placement says it serves (``Teacher.supports``), and the pre-flight refusing a method a placement
cannot serve before step 1; the shared HTTP transport's request packing. No server runs here: a server's ``/health``
answer is stood in for where a placement needs one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from vopd.check import check_placement, preflight
from vopd.config import load_config
from vopd.errors import UserError
from vopd.loss.methods import METHODS, TABLE, method_spec
from vopd.models import load_model, load_tokenizer
from vopd.teacher.answers import Answers, lacks
from vopd.teacher.client import RemoteTeacher
from vopd.teacher.http import Item, Limits, pack
from vopd.teacher.local import InProcessTeacher, SelfTeacher
from vopd.teacher.reprompt import OwnPromptTeacher
from vopd.teacher.routing import Teachers
from vopd.teacher_config import TEACHER as ONLY
from vopd.teacher.wire import tokenizer_fingerprint
from vopd.train import train

DOCS = Path(__file__).resolve().parents[1] / "docs" / "teacher_server.md"
DEAD = "http://127.0.0.1:9"  # nothing listens: a placement that contacted it would fail with "unreachable"


def _quiet(_msg: str) -> None:
    pass


class LogqOnlyTeacher:
    """A placement that can send only log q(y_t) (e.g. a server's prompt log-probs): no logits at asked ids."""

    full_distribution = False
    tokenizer = None

    def supports(self, spec):
        need = lacks(spec, Answers())
        return None if need is None else f"loss.method={spec.name} needs {need}, which this placement does not send"

    def pairing_checks(self, student, student_tok):
        return ["log q(y_t) only"]

    def close(self):
        pass


def _health(tok, protocol: int) -> dict:
    """A server's /health answer as a protocol-``protocol`` server with the micro world's tokenizer gives it."""
    return {"status": "ok", "protocol": protocol, "model": "teacher", "vocab_size": len(tok),
            "tokenizer_sha256": tokenizer_fingerprint(tok), "dtype": "float32",
            "limits": {"max_batch": 64, "max_tokens": 65536, "max_k": 1024, "max_body_mb": 256.0}}


def _served(teacher) -> list[str]:
    return [name for name in METHODS if teacher.supports(method_spec(name)) is None]


@pytest.fixture(scope="module")
def tok(micro_world):
    return load_tokenizer(str(micro_world.teacher))


@pytest.mark.parametrize("method", METHODS)
def test_a_logq_only_placement_is_refused_at_preflight_for_every_method_but_opd(method, micro_world, tok,
                                                                                  train_overrides):
    cfg = load_config(None, train_overrides + [f"loss.method={method}"])
    student = load_model(str(micro_world.student), role="student", dtype=torch.float32, device=torch.device("cpu"))
    teachers = Teachers({ONLY: LogqOnlyTeacher()})
    if method == "opd":
        lines = preflight(student, tok, teachers, cfg)
        assert "log q(y_t) only" in lines
        return
    spec = method_spec(method)
    need = ("full distribution at every position" if spec.full_distribution else
            "own top-k ids and log-probs at every position" if spec.teacher_topk else
            "logits at the student's top-k ids")
    with pytest.raises(UserError, match=f"^loss.method={method} needs the teacher's {need}, which this placement"):
        preflight(student, tok, teachers, cfg)


def test_an_old_server_is_refused_for_rb_topk_at_preflight_before_anything_is_written(tok, train_overrides,
                                                                                      tmp_path, monkeypatch):
    monkeypatch.setattr(RemoteTeacher, "health", lambda self: _health(tok, 1))
    remote = RemoteTeacher(DEAD)
    assert remote.supports(method_spec("vopd-topk")) is None and remote.supports(method_spec("opd")) is None
    reason = remote.supports(method_spec("rb-topk"))
    assert reason == ("loss.method=rb-topk needs the teacher's log-sum-exp, which the teacher server at "
                      f"{DEAD} sends from protocol 2 on; it speaks protocol 1: update vopd on the server and "
                      "restart it, or use loss.method=vopd-topk")
    cfg = load_config(None, train_overrides + ["loss.method=rb-topk", f"model.teacher={DEAD}"])
    with pytest.raises(UserError, match=r"^loss.method=rb-topk needs the teacher's log-sum-exp.*speaks protocol 1: "
                                        r"update vopd on the server"):
        train(cfg, log=_quiet)
    assert not (tmp_path / "run").exists()  # refused before step 1: nothing was written
    monkeypatch.setattr(RemoteTeacher, "health", lambda self: _health(tok, 2))
    assert RemoteTeacher(DEAD).supports(method_spec("rb-topk")) is None


def test_a_server_without_its_output_layer_refuses_full_vocabulary_methods_without_asking_it():
    remote = RemoteTeacher(DEAD, retries=0)  # the refusal needs no /health: the dead server is never asked
    for name, spec in TABLE.items():
        if spec.full_distribution:
            assert re.match(f"loss.method={name} needs the teacher's full distribution at every position, which a "
                            rf"teacher server \({DEAD}\) sends only as hidden states: set its head "
                            r"\(model.teachers\[\]\.head=DIR",
                            remote.supports(spec) or "")
    assert remote.supports(method_spec("opd")) is None and remote.supports(method_spec("opd-topk")) is None


def test_a_hidden_state_client_needs_a_protocol_3_server_for_every_method(micro_world, tok, monkeypatch):
    for protocol, served in ((2, []), (3, list(METHODS))):
        monkeypatch.setattr(RemoteTeacher, "health", lambda self, p=protocol: _health(tok, p))
        remote = RemoteTeacher(DEAD, head=str(micro_world.teacher))
        assert _served(remote) == served, protocol
    monkeypatch.setattr(RemoteTeacher, "health", lambda self: _health(tok, 2))
    assert "speaks protocol 2, which does not send hidden states" in RemoteTeacher(
        DEAD, head=str(micro_world.teacher)).supports(method_spec("opd"))


def test_a_routed_teacher_is_named_with_its_own_keys(train_overrides):
    cfg = load_config(None, train_overrides + ["loss.method=vopd"])
    with pytest.raises(UserError, match=r"^teacher math: loss.method=vopd needs .* set its head \(model.teachers\[\]\.head=DIR"):
        check_placement(cfg, RemoteTeacher(DEAD), "math")


def _docs_table() -> dict[str, list[str]]:
    """docs/teacher_server.md, "Placements and the methods they serve": placement -> the methods marked served."""
    text = DOCS.read_text(encoding="utf-8").split("## Placements and the methods they serve", 1)[1]
    rows = [line for line in text.split("\n## ", 1)[0].splitlines() if line.startswith("| ")]
    header = [c.strip().strip("`") for c in rows[0].strip("|").split("|")]
    assert header[1:] == list(METHODS), header
    table = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        table[cells[0]] = [m for m, c in zip(METHODS, cells[1:]) if c == "yes"]
    return table


def test_the_docs_table_is_what_supports_says(micro_world, tok, monkeypatch):
    model = load_model(str(micro_world.teacher), role="teacher", dtype=torch.float32, device=torch.device("cpu"))
    placements = {
        "in process (`model.teacher: DIR`)": InProcessTeacher(model, len(tok), tokenizer=tok),
        "the student's initial weights (`model.teacher: self`)": SelfTeacher(model, len(tok)),
    }
    for protocol, head, row in ((1, None, "server, numbers at ids, protocol 1"),
                                (2, None, "server, numbers at ids, protocol 2"),
                                (2, str(micro_world.teacher), "server + `head`, protocol 2"),
                                (3, str(micro_world.teacher), "server + `head`, protocol 3")):
        monkeypatch.setattr(RemoteTeacher, "health", lambda self, p=protocol: _health(tok, p))
        placements[row] = RemoteTeacher(DEAD, head=head)
        assert _served(placements[row]) == _served(OwnPromptTeacher(placements[row], 0))  # it delegates
        assert _docs_table()[row] == _served(placements[row]), row
    monkeypatch.undo()
    from vopd.teacher.stock_vllm import StockVllmTeacher  # supports() asks a stock vLLM server nothing

    for head, row in ((str(micro_world.teacher), "stock vLLM, pooling route (`server: vllm` + `head`)"),
                      (None, "stock vLLM, generate route (`server: vllm`)")):
        placements[row] = StockVllmTeacher([DEAD], vocab_size=len(tok), head=head)
        assert _docs_table()[row] == _served(placements[row]), row
    from vopd.teacher.stock_sglang import StockSglangTeacher

    for head, row in ((str(micro_world.teacher), "stock SGLang, hidden-state route (`server: sglang` + `head`)"),
                      (None, "stock SGLang, log-prob route (`server: sglang`)")):
        placements[row] = StockSglangTeacher([DEAD], vocab_size=len(tok), head=head)
        assert _docs_table()[row] == _served(placements[row]), row
    for row, teacher in placements.items():
        if isinstance(teacher, (InProcessTeacher, SelfTeacher)):
            assert _docs_table()[row] == _served(teacher) == list(METHODS), row
    assert set(_docs_table()) == set(placements)


def test_pack_keeps_order_and_every_limit():
    items = [Item(tokens=n, body=10, answer=1.0) for n in (3, 3, 3, 5, 5, 9, 2)]
    assert pack(items, Limits(max_batch=2, max_tokens=100)) == [[0, 1], [2, 3], [4, 5], [6]]
    assert pack(items, Limits(max_batch=10, max_tokens=10)) == [[0, 1, 2], [3, 4], [5], [6]]  # padded: n x longest
    assert pack(items, Limits(max_batch=10, max_tokens=100, max_body=35)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert pack(items, Limits(max_batch=10, max_tokens=100, max_answer=2.5)) == [[0, 1], [2, 3], [4, 5], [6]]
    assert pack([Item(tokens=50, body=1, answer=0.0)], Limits(max_batch=1, max_tokens=10)) == [[0]]  # alone
    assert pack([], Limits(max_batch=1, max_tokens=1)) == []
