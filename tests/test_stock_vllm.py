"""A stock vLLM server as the teacher (``model.teachers[].server=vllm``), against real vLLM processes (the CPU
build): every method over the pooling route (hidden states + the output layer here) gives the in-process teacher's
loss, gradients and metrics, and a short `vopd train` its weights; ``opd`` over ``prompt_logprobs`` and the teacher's
own top-k (``score_teacher_topk``) give the in-process numbers; the head's probe against the generate server
(``head_reference``) passes the served model's head; k above ``--max-logprobs``, an L2-normalising pooling server, a
head of another width, a head of another model of the same width (the probe), a generate server asked for hidden
states, an unreachable or killed replica each end in one line (a slow or garbled answer, the API key, the config rules: test_stock_vllm_checks.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vopd import distributed as dist
from vopd.config import load_config
from vopd.errors import UserError
from vopd.loss.head import IDENTITY
from vopd.loss.methods import METHODS, method_spec
from vopd.metrics import PhaseTimer
from vopd.step import accumulate_gradients, loss_plan, micro_batch_loss
from vopd.teacher.routing import Teachers
from vopd.teacher.stock_vllm import StockVllmTeacher
from vopd.tools.bench.stock import route_flags, serve_vllm, stop_vllm
from vopd.teacher_config import TEACHER as ONLY
from vopd.train import train

pytest.importorskip("vllm")
pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
PROCS: dict[str, subprocess.Popen] = {}  # the servers' processes, for the tests that kill one (at the end)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher_dir(vllm_teacher_dir) -> Path:
    return vllm_teacher_dir


@pytest.fixture(scope="module")
def servers(teacher_dir, tmp_path_factory):
    """Real vLLM servers of the teacher, started together (vopd.tools.bench.stock.serve_vllm, as the benchmarks
    start theirs): "pooling" (hidden states, use_activation false), "generate" (--max-logprobs 8) and "normalising"
    (the pooling runner's default: L2-normalised rows)."""
    specs = {"pooling": route_flags("pooling"), "generate": route_flags("generate", max_logprobs=8),
             "normalising": ["--runner", "pooling", "--convert", "embed", "--pooler-config", '{"task": "token_embed"}']}
    started = serve_vllm(teacher_dir, specs, tmp_path_factory.mktemp("vllm_logs"), served_name="tiny-teacher",
                         timeout_s=300)
    PROCS.update({name: proc for name, (proc, _url) in started.items()})
    try:
        yield {name: url for name, (_p, url) in started.items()}
    finally:
        stop_vllm(*PROCS.values())


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the server's process group (the API server, its engine core and workers)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def pair(vllm_pair):
    return vllm_pair


def _step(cfg, student, teacher, rollout):
    """(loss, token metrics, gradients, per-token numbers) of one step's gradient over ``rollout``."""
    wrapped = dist.wrap(student, student.config.vocab_size, "ddp", CPU)
    got = accumulate_gradients(cfg, wrapped, Teachers({ONLY: teacher}), rollout, CPU, PhaseTimer(CPU))
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        parts = micro_batch_loss(loss_plan(cfg.loss, IDENTITY), wrapped, Teachers({ONLY: teacher}), rollout, 1.0,
                                 PhaseTimer(CPU))
    return got.loss, got.token_metrics, grads, parts[0].out


def _assert_same_step(cfg, student, remote, local, rollout) -> None:
    loss, metrics, grads, _ = _step(cfg, student, remote, rollout)
    loss_l, metrics_l, grads_l, _ = _step(cfg, student, local, rollout)
    assert loss == pytest.approx(loss_l, rel=1e-5, abs=1e-6)
    assert metrics.keys() == metrics_l.keys()
    for key, value in metrics_l.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert grads.keys() == grads_l.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads_l[n], rtol=1e-4, atol=1e-5, msg=n)


def _config(train_overrides, teacher_dir, method: str, *extra: str):
    return load_config(None, train_overrides + [f"model.teacher={teacher_dir}", f"loss.method={method}",
                                                "batch_size=6", "micro_batch_size=3", "grad_noise=false", *extra])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_over_the_pooling_route_equals_in_process(method, servers, pair, teacher_dir, train_overrides,
                                                                 make_fake_rollout):
    tok, student, local = pair
    rollout = make_fake_rollout(tok)
    with StockVllmTeacher([servers["pooling"]], vocab_size=len(tok), head=str(teacher_dir)) as remote:
        assert remote.full_distribution and remote.supports(method_spec(method)) is None
        scores = remote.score(rollout)
        mine = local.score(rollout)
        live = rollout.loss_mask
        torch.testing.assert_close(scores.hidden[live], mine.hidden[live], rtol=1e-4, atol=1e-5)
        assert not scores.hidden[~live].any()
        _assert_same_step(_config(train_overrides, teacher_dir, method), student, remote, local, rollout)


def test_pairing_checks_name_the_model_and_the_route(servers, pair, teacher_dir):
    tok, student, _local = pair
    with StockVllmTeacher([servers["pooling"]], vocab_size=len(tok), head=str(teacher_dir)) as remote:
        lines = remote.pairing_checks(student, tok)
    assert "tiny-teacher" in lines[0] and "max_model_len 256" in lines[0] and "same tokenization" in lines[0]
    assert "width 64" in lines[1] and "not L2-normalised" in lines[1]
    assert "checked for its width only" in lines[2] and "head_reference=http://HOST:PORT" in lines[2]


@pytest.fixture(scope="module")
def other_head(teacher_dir, tmp_path_factory) -> Path:
    """Another random model of the served one's shape (width 64): its output layer passes the width check."""
    from vopd.models import load_tokenizer
    from vopd.world.tiny_models import ModelShape, make_model

    root = tmp_path_factory.mktemp("other_head")
    make_model(ModelShape(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=96),
               load_tokenizer(str(teacher_dir)), seed=6).save_pretrained(root)
    return root


def test_the_head_is_checked_against_a_generate_server_of_the_same_model(servers, pair, teacher_dir, other_head):
    """The served model's head gives the generate server's log-probs on the probe (fp32: to ~1e-6); another model's
    head of the same width passes the width check and is refused by the probe, in one line naming both servers and
    the head. Opened from its config entry, as `vopd train` does."""
    from vopd.teacher.base import open_teacher
    from vopd.teacher_config import TeacherConfig

    tok, student, _local = pair
    pooling, generate = servers["pooling"], servers["generate"]
    entry = TeacherConfig(model=pooling, server="vllm", head=str(teacher_dir), head_reference=generate)
    remote = open_teacher(entry, vocab_size=len(tok), device=CPU)
    try:
        line = remote.pairing_checks(student, tok)[-1]
    finally:
        remote.close()
    assert f"log-probs of the generate server at {generate} (tiny-teacher)" in line and "fp32 states" in line
    assert float(line.split("within ")[1].split()[0]) < 1e-4
    with StockVllmTeacher([pooling], vocab_size=len(tok), head=str(other_head), head_reference=generate) as remote:
        with pytest.raises(UserError, match=r"the output layer of .* with the hidden states of the vLLM server at "
                                            r".* nats away from the generate server at .*point model.teachers\[\].head"
                           ) as err:
            remote.pairing_checks(student, tok)
    message = str(err.value)
    assert "\n" not in message and str(other_head) in message and pooling in message and generate in message


def test_opd_over_prompt_logprobs_equals_in_process(servers, pair, teacher_dir, train_overrides, make_fake_rollout):
    tok, student, local = pair
    rollout = make_fake_rollout(tok)
    with StockVllmTeacher([servers["generate"]], vocab_size=len(tok)) as remote:
        assert not remote.full_distribution and remote.supports(method_spec("opd")) is None
        refusal = remote.supports(method_spec("vopd-topk"))
        assert refusal is not None and "--runner pooling" in refusal and "\n" not in refusal
        assert remote.supports(method_spec("vopd")) is not None
        _assert_same_step(_config(train_overrides, teacher_dir, "opd"), student, remote, local, rollout)


def test_teacher_topk_is_the_in_process_teachers_own_topk(servers, pair, make_fake_rollout):
    tok, _student, local = pair
    rollout = make_fake_rollout(tok)
    k = 5
    mine = local.score(rollout)
    logp = torch.log_softmax(mine.hidden @ mine.weight.T, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    live = rollout.loss_mask
    with StockVllmTeacher([servers["generate"]], vocab_size=len(tok)) as remote:
        got = remote.score_teacher_topk(rollout, k)
    assert got.lse is None and got.topk_ids is not None and got.topk_logits is not None
    assert got.topk_ids.dtype == torch.long and tuple(got.topk_ids.shape) == tuple(live.shape) + (k,)
    assert torch.equal(got.topk_ids[live], ids[live]) and not got.topk_ids[~live].any()
    torch.testing.assert_close(got.topk_logits[live], values[live], rtol=1e-5, atol=1e-5)
    logq = logp.gather(-1, rollout.targets[..., None]).squeeze(-1)
    torch.testing.assert_close(got.logq[live], logq[live], rtol=1e-5, atol=1e-5)
    assert not got.logq[~live].any()


def test_k_above_max_logprobs_names_the_flag(servers, pair, make_fake_rollout):
    tok, _student, _local = pair
    with StockVllmTeacher([servers["generate"]], vocab_size=len(tok)) as remote:
        with pytest.raises(UserError, match=r"refuses prompt_logprobs=9 .*--max-logprobs 9") as err:
            remote.score_teacher_topk(make_fake_rollout(tok), 9)
    assert "\n" not in str(err.value)


def test_a_server_started_normalising_is_overridden_per_request(servers, pair, teacher_dir, make_fake_rollout):
    """vLLM 0.32 honours the request's ``use_activation: false`` over the server's default (which L2-normalises):
    the states are exact even from a server started without it (a server that still normalises is refused: the
    fake server below)."""
    tok, student, local = pair
    rollout = make_fake_rollout(tok)
    with StockVllmTeacher([servers["normalising"]], vocab_size=len(tok), head=str(teacher_dir)) as remote:
        remote.pairing_checks(student, tok)
        got = remote.score(rollout)
    live = rollout.loss_mask
    torch.testing.assert_close(got.hidden[live], local.score(rollout).hidden[live], rtol=1e-4, atol=1e-5)


def test_a_head_of_another_width_is_refused(servers, pair, micro_world):
    tok, student, _local = pair  # the micro world's teacher: hidden size 48, not the served 64
    with StockVllmTeacher([servers["pooling"]], vocab_size=len(tok), head=str(micro_world.teacher)) as remote:
        with pytest.raises(UserError, match=r"hidden states of width 64, but the output layer of .* takes 48"):
            remote.pairing_checks(student, tok)


def test_a_generate_server_asked_for_hidden_states_is_refused(servers, pair, teacher_dir, make_fake_rollout):
    tok, _student, _local = pair
    with StockVllmTeacher([servers["generate"]], vocab_size=len(tok), head=str(teacher_dir)) as remote:
        with pytest.raises(UserError, match=r"refused a hidden-state \(pooling\) request .*generate server\? .*"
                                            r"--runner pooling"):
            remote.score(make_fake_rollout(tok))


def test_an_unreachable_replica_is_skipped_and_all_unreachable_is_one_line(servers, pair, teacher_dir,
                                                                         make_fake_rollout):
    tok, _student, local = pair
    rollout = make_fake_rollout(tok)
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with StockVllmTeacher([dead, servers["pooling"]], vocab_size=len(tok), head=str(teacher_dir), retries=1,
                          backoff_s=0.01, max_seqs=2) as remote:
        got = remote.score(rollout)
        assert remote.dead == {0}
        metrics = remote.server_metrics()
    assert metrics["0/failovers"] == 1 and metrics["0/requests"] == 0 and metrics["1/requests"] == 3
    assert metrics["1/received_mb"] > 0 and metrics["1/seconds"] > 0
    live = rollout.loss_mask
    torch.testing.assert_close(got.hidden[live], local.score(rollout).hidden[live], rtol=1e-4, atol=1e-5)
    other = f"http://127.0.0.1:{_free_port()}"
    with StockVllmTeacher([dead, other], vocab_size=len(tok), head=str(teacher_dir), retries=0) as remote:
        remote._model = {"name": "tiny-teacher", "max_model_len": 256}  # /v1/models would fail first
        with pytest.raises(UserError, match=r"every vLLM replica of this teacher is unreachable .*--resume"):
            remote.score(rollout)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_vopd_train_over_the_pooling_route_equals_in_process(servers, teacher_dir, train_overrides, tmp_path):
    # As tests/test_remote_train.py: two steps sampled with the same seed, Adam's eps=1 so that rounding between the
    # two paths does not become lr-sized steps; the shorthand model.teacher_server=vllm with a head.
    base = train_overrides + [f"model.teacher={teacher_dir}", "steps=2", "loss.method=vopd", "optim.eps=1.0"]
    local = train(load_config(None, base + [f"output_dir={tmp_path / 'local'}"]), log=lambda _m: None)
    logs: list[str] = []
    remote = train(load_config(None, base + [f"output_dir={tmp_path / 'remote'}", f"model.teacher={servers['pooling']}",
                                             "model.teacher_server=vllm", f"model.teacher_head={teacher_dir}"]),
                   log=logs.append)
    assert any("vLLM teacher" in m and "tiny-teacher" in m for m in logs), logs
    a, b = _weights(local.output_dir / "final"), _weights(remote.output_dir / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    for x, y in zip(_metrics(local.output_dir), _metrics(remote.output_dir)):
        for key in ("loss", "kl_estimate", "grad_norm", "tokens"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), key  # states: ~1e-6 from HF's


def test_vopd_check_takes_a_stock_vllm_teacher(servers, micro_world, capsys):
    from vopd.cli import main

    url = servers["generate"]
    base = ["check", f"model.student={micro_world.student}", f"model.teacher={url}", "model.teacher_server=vllm",
            "rollout.max_new_tokens=12"]
    assert main([*base, "loss.method=opd"]) == 0
    out = capsys.readouterr().out
    assert f"vLLM teacher {url} (tiny-teacher, max_model_len 256" in out and "same tokenization" in out
    assert main([*base, "loss.method=vopd-topk", "loss.top_k=8"]) == 2
    err = capsys.readouterr().err
    assert "loss.method=vopd-topk needs the teacher's logits at the student's top-k ids" in err and "--runner pooling" in err


class _FixedSampler:
    """The same completions in every run (no sampling), killing ``victim`` when step ``kill_at`` samples."""

    def __init__(self, victim: str | None = None, kill_at: int = 2) -> None:
        self.victim, self.kill_at, self.calls = victim, kill_at, 0

    def __call__(self, prompts):
        from vopd.sampling import Samples

        self.calls += 1
        if self.victim is not None and self.calls == self.kill_at:
            _signal_group(PROCS[self.victim], signal.SIGKILL)  # the whole replica dies
            PROCS[self.victim].wait(20)
        completions = [[3 + (sum(p) + 5 * j) % 190 for j in range(5)] for p in prompts]
        return Samples(completions, [[-1.0] * 5 for _ in prompts], [False] * len(prompts))


def test_a_replica_killed_mid_run_is_replaced_by_another(servers, teacher_dir, train_overrides, tmp_path):
    # The "normalising" server serves exact states too (the request overrides its default), so it is a replica.
    base = train_overrides + [f"model.teacher={teacher_dir}", "steps=3", "loss.method=vopd", "optim.eps=1.0",
                              "rollout.check_sync=false", "model.teacher_retries=1", "model.teacher_timeout_s=10"]
    local = train(load_config(None, base + [f"output_dir={tmp_path / 'local'}"]),
                  make_sampler=lambda *_: _FixedSampler(), log=lambda _m: None)
    replicas = f"{servers['normalising']},{servers['pooling']}"
    remote = train(load_config(None, base + [f"output_dir={tmp_path / 'remote'}", f"model.teacher={replicas}",
                                             "model.teacher_server=vllm", f"model.teacher_head={teacher_dir}"]),
                   make_sampler=lambda *_: _FixedSampler("normalising"), log=lambda _m: None)
    assert PROCS["normalising"].poll() is not None  # it was killed at step 2, and the run went on without it
    lines = _metrics(remote.output_dir)
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert lines[-1]["teacher_server/teacher/0/failovers"] == 1  # per-server metrics, as totals
    assert lines[-1]["teacher_server/teacher/1/requests"] > lines[0]["teacher_server/teacher/1/requests"]
    a, b = _weights(local.output_dir / "final"), _weights(remote.output_dir / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_last_replica_killed_ends_the_run_naming_the_checkpoint(servers, teacher_dir, train_overrides,
                                                                    tmp_path):
    from vopd import checkpoint as ckpt

    cfg = load_config(None, train_overrides + [
        f"output_dir={tmp_path / 'run'}", f"model.teacher={servers['pooling']}", "model.teacher_server=vllm",
        f"model.teacher_head={teacher_dir}", "loss.method=vopd", "steps=4", "save_every=1",
        "rollout.check_sync=false", "model.teacher_retries=1", "model.teacher_timeout_s=5"])
    with pytest.raises(UserError, match=r"unreachable after 2 tries .*--resume continues from the last checkpoint"):
        train(cfg, make_sampler=lambda *_: _FixedSampler("pooling"), log=lambda _m: None)
    good = ckpt.latest_valid_checkpoint(cfg.output_dir)
    assert good is not None and good.name == "step-00000001"
    ckpt.verify_checkpoint(good)


def test_teacher_topk_method_over_the_generate_route_equals_in_process(servers, pair, teacher_dir, train_overrides,
                                                                       make_fake_rollout):
    """``vopd-ttopk`` over ``prompt_logprobs: k`` (told once, as the trainer's set-up does: ``prepare_for``): the
    in-process step (loss, gradients, metrics), the teacher's own top-k picked by the server."""
    from vopd.teacher.base import prepare_for

    tok, student, local = pair
    rollout = make_fake_rollout(tok)
    cfg = _config(train_overrides, teacher_dir, "vopd-ttopk", "loss.top_k=8")
    with StockVllmTeacher([servers["generate"]], vocab_size=len(tok)) as remote:
        assert remote.supports(method_spec("vopd-ttopk")) is None
        prepare_for(remote, method_spec("vopd-ttopk"), 8)
        assert remote.own_topk == 8
        _assert_same_step(cfg, student, remote, local, rollout)
